"""Each encoder stage on its own: shapes, batching, determinism, dtypes."""

import pytest
import torch
from safetensors.torch import load_file

from server.model import upm
from server.model.onellm import load_model

# tokens each modality's tokenizer makes (ONELLM.md §3); the trunk adds the class token
TOKENS = {"image": 256, "video": 256, "rgbd": 256, "rgbn": 256, "audio": 1212, "point": 1024, "imu": 391, "fmri": 8}
MODALITIES = sorted(TOKENS)


@pytest.fixture(scope="module")
def model(fixture_model):
    return load_model(fixture_model, dtype=torch.float32)


@pytest.fixture(scope="module")
def inputs(fixture_dir):
    tensors = load_file(fixture_dir / "reference.safetensors")
    return {m: tensors[f"{m}.input"] for m in MODALITIES}


def batch_of_three(x: torch.Tensor) -> torch.Tensor:
    """The reference input and two different variations of it."""
    g = torch.Generator().manual_seed(0)
    return torch.cat([x, x + 0.1 * torch.randn(x.shape, generator=g), x.flip(-1)])


@pytest.mark.parametrize("modality", MODALITIES)
def test_stage_shapes(model, inputs, modality):
    width = model.config["encoder"]["width"]
    dim = model.config["llm"]["dim"]
    features = model.encoder.features(modality, inputs[modality])
    assert features.shape == (1, TOKENS[modality] + 1, width)
    prefix = model.encode(modality, inputs[modality])
    assert prefix.shape == (1, 30, dim)
    assert torch.isfinite(prefix).all()


@pytest.mark.parametrize("modality", MODALITIES)
def test_batch_of_three_equals_three_single_runs(model, inputs, modality):
    x = batch_of_three(inputs[modality])
    batched = model.encode(modality, x)
    assert batched.shape == (3, 30, model.config["llm"]["dim"])
    singles = torch.cat([model.encode(modality, x[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(batched, singles, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(batched[0], batched[1]), "different inputs must give different prefixes"


@pytest.mark.parametrize("modality", ["image", "imu", "fmri"])
def test_fp32_cpu_runs_are_bitwise_deterministic(model, inputs, modality):
    assert torch.equal(model.encode(modality, inputs[modality]), model.encode(modality, inputs[modality]))


@pytest.mark.parametrize("modality", ["image", "fmri"])
def test_the_experts_give_one_prefix_run_side_by_side_or_one_at_a_time(model, inputs, modality, monkeypatch):
    """Small inputs run the UPM's 3 experts block by block together (one norm, attention and
    residual for the three), larger ones one expert at a time: the same prefix either way, and the
    priority hook before each step (the fixture's 8 blocks: 8 steps together, 24 one at a time)."""
    def run() -> tuple[torch.Tensor, int]:
        steps = []
        prefix = model.encoder(modality, inputs[modality], lambda: steps.append(1))
        return prefix, len(steps)

    together, together_steps = run()
    monkeypatch.setattr(upm, "SIDE_BY_SIDE_ROWS", 0)
    apart, apart_steps = run()
    assert apart_steps - together_steps == 24 - 8
    torch.testing.assert_close(together, apart, atol=1e-5, rtol=1e-5)


def test_video_trunk_output_is_the_mean_over_frames(model, inputs):
    video = inputs["video"]  # [1, 15, 3, 224, 224]
    frames = model.encoder.features("image", video[0])  # each frame as an image: [15, 257, W]
    torch.testing.assert_close(model.encoder.features("video", video)[0], frames.mean(0), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_encoder_stays_close_to_fp32(fixture_model, inputs, dtype):
    fp32 = load_model(fixture_model, dtype=torch.float32).encode("image", inputs["image"])
    half = load_model(fixture_model, dtype=dtype).encode("image", inputs["image"])
    assert half.dtype == dtype
    cosine = torch.nn.functional.cosine_similarity(half.float().flatten(), fp32.flatten(), dim=0)
    assert cosine > 0.99
