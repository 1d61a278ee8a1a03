"""`onellm convert`: folder layout, the Meta -> Hugging Face LLaMA conversion, and input errors."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from transformers import AutoTokenizer, LlamaForCausalLM

from server.tools import llm_folder
from server.cli import main
from server.tools.convert import convert


def meta_llama_logits(weights: dict, tokens: list[int], n_heads: int, eps: float) -> torch.Tensor:
    """Logits of Meta's LLaMA (RoPE on interleaved pairs), written out from its definition."""
    x = weights["tok_embeddings.weight"][tokens]
    length, dim = x.shape
    head_dim = dim // n_heads
    freqs = 1.0 / 10000 ** (torch.arange(0, head_dim, 2).double() / head_dim)
    angles = torch.outer(torch.arange(length).double(), freqs)
    rotation = torch.polar(torch.ones_like(angles), angles)[:, None, :]  # [T, 1, head_dim/2]
    mask = torch.full((length, length), float("-inf")).triu(1)

    def rms_norm(h, weight):
        return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * weight

    def rope(h):  # rotate pairs (2i, 2i+1) of each head as one complex number
        pairs = torch.view_as_complex(h.double().reshape(length, n_heads, head_dim // 2, 2).contiguous())
        return torch.view_as_real(pairs * rotation).reshape(length, n_heads, head_dim).to(h.dtype)

    n_layers = len({k.split(".")[1] for k in weights if k.startswith("layers.")})
    for i in range(n_layers):
        w = {k.removeprefix(f"layers.{i}."): v for k, v in weights.items() if k.startswith(f"layers.{i}.")}
        h = rms_norm(x, w["attention_norm.weight"])
        q, k, v = (h @ w[f"attention.{n}.weight"].T for n in ("wq", "wk", "wv"))
        q, k, v = (t.view(length, n_heads, head_dim) for t in (q, k, v))
        q, k = rope(q), rope(k)
        scores = torch.einsum("thd,shd->hts", q, k) / math.sqrt(head_dim) + mask
        attended = torch.einsum("hts,shd->thd", scores.softmax(-1), v).reshape(length, dim)
        x = x + attended @ w["attention.wo.weight"].T
        h = rms_norm(x, w["ffn_norm.weight"])
        gate, up = F.silu(h @ w["feed_forward.w1.weight"].T), h @ w["feed_forward.w3.weight"].T
        x = x + (gate * up) @ w["feed_forward.w2.weight"].T
    return rms_norm(x, weights["norm.weight"]) @ weights["output.weight"].T


def random_llama(dim=64, n_layers=2, n_heads=4, ffn=96, vocab=50, seed=0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    shapes = {"tok_embeddings.weight": (vocab, dim), "norm.weight": (dim,), "output.weight": (vocab, dim)}
    for i in range(n_layers):
        for n in ("wq", "wk", "wv", "wo"):
            shapes[f"layers.{i}.attention.{n}.weight"] = (dim, dim)
        shapes |= {f"layers.{i}.feed_forward.w1.weight": (ffn, dim), f"layers.{i}.feed_forward.w2.weight": (dim, ffn),
                   f"layers.{i}.feed_forward.w3.weight": (ffn, dim), f"layers.{i}.attention_norm.weight": (dim,),
                   f"layers.{i}.ffn_norm.weight": (dim,)}
    # large enough that attention is far from uniform, so a wrong rotation shows
    weights = {k: torch.randn(shape, generator=generator) * 0.3 for k, shape in shapes.items()}
    return {k: 1 + 0.3 * w if k.endswith("norm.weight") else w for k, w in weights.items()}


def write_llm(llm_dir, weights, n_heads, shard_bytes=llm_folder.SHARD_BYTES):
    vocab, dim = weights["tok_embeddings.weight"].shape
    n_layers = len({k.split(".")[1] for k in weights if k.startswith("layers.")})
    llm_dir.mkdir()
    llm_folder.write_weights(llm_dir, weights, n_layers, n_heads, torch.float32, shard_bytes=shard_bytes)
    config = llm_folder.hf_config(dim=dim, n_layers=n_layers, n_heads=n_heads, vocab_size=vocab, norm_eps=1e-5,
                                  ffn_hidden=weights["layers.0.feed_forward.w1.weight"].shape[0], bos_id=1, eos_id=2,
                                  dtype=torch.float32)
    llm_folder.write_json(llm_dir / "config.json", config)


def hf_logits(llm_dir, tokens: list[int]) -> torch.Tensor:
    model = LlamaForCausalLM.from_pretrained(llm_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0]


def test_permuted_weights_give_metas_logits(tmp_path):
    weights, tokens = random_llama(), [3, 17, 5, 42, 8, 8, 1, 30, 12, 49, 0, 7]
    expected = meta_llama_logits(weights, tokens, n_heads=4, eps=1e-5)
    write_llm(tmp_path / "llm", weights, n_heads=4)
    torch.testing.assert_close(hf_logits(tmp_path / "llm", tokens), expected, atol=1e-4, rtol=1e-4)


def test_unpermuted_weights_would_be_wrong(tmp_path, monkeypatch):
    """The check above can fail: without the permutation HF's logits differ from Meta's."""
    weights, tokens = random_llama(), [3, 17, 5, 42, 8, 8, 1, 30, 12, 49, 0, 7]
    monkeypatch.setattr(llm_folder, "permute_rope", lambda w, n_heads: w)
    write_llm(tmp_path / "llm", weights, n_heads=4)
    difference = (hf_logits(tmp_path / "llm", tokens) - meta_llama_logits(weights, tokens, 4, 1e-5)).abs().max()
    assert difference > 1e-2


def test_sharded_weights_load_the_same(tmp_path):
    weights, tokens = random_llama(), [1, 2, 3, 4, 5]
    write_llm(tmp_path / "llm", weights, n_heads=4, shard_bytes=40_000)
    index = json.loads((tmp_path / "llm" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert not (tmp_path / "llm" / "model.safetensors").exists()
    assert set(index["weight_map"]) == {llm_folder.hf_name(k) for k in weights}
    expected = meta_llama_logits(weights, tokens, n_heads=4, eps=1e-5)
    torch.testing.assert_close(hf_logits(tmp_path / "llm", tokens), expected, atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def converted(fixture_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("convert") / "ref-tiny"
    args = ["convert", "--checkpoint", str(fixture_dir / "consolidated.00-of-01.pth"), "--params",
            str(fixture_dir / "params.json"), "--tokenizer", str(fixture_dir / "tokenizer.model"),
            "--clip-heads", "2", "--out", str(out)]
    assert main(args) == 0
    return out


def test_model_json_sizes_match_the_fixture(converted, fixture_dir):
    config = json.loads((converted / "model.json").read_text())
    assert config["format"] == "onellm-serve/1" and config["name"] == "ref-tiny"
    assert config["random_weights"] is False and config["dtype"] == "float32"
    assert config["source"] == str((fixture_dir / "consolidated.00-of-01.pth").resolve())
    assert config["encoder"] == {"width": 64, "clip_layers": 2, "clip_heads": 2, "clip_patch": 14, "image_size": 224,
                                 "upm_experts": 3, "upm_blocks": 8, "upm_heads": 16, "prefix_tokens": 30,
                                 "norm_eps": 1e-5}
    assert config["llm"] == {"dim": 128, "n_layers": 2, "n_heads": 4, "vocab_size": 32000, "max_positions": 2048,
                             "bos_id": 1, "eos_id": 2, "norm_eps": 1e-5, "ffn_hidden": 512}
    assert config["modalities"] == ["image", "video", "audio", "point", "rgbd", "rgbn", "fmri", "imu"]
    assert config["prompt"]["stop"] == ["###"] and config["prompt"]["roles"] == ["Human", "Assistant"]


def test_encoder_holds_everything_but_the_decoder_and_text_tower(converted, fixture_dir):
    checkpoint = torch.load(fixture_dir / "consolidated.00-of-01.pth", map_location="cpu", mmap=True, weights_only=True)
    with safe_open(converted / "encoder.safetensors", "pt") as f:
        keys = set(f.keys())
        for key in ("tok_embeddings.weight", "clip.visual.conv1.weight", "conv1.fmri.weight", "start_tag.imu",
                    "resample_layers.2.7.feed_forward.w2.weight"):
            assert torch.equal(f.get_tensor(key), checkpoint[f"llma.{key}"])
    decoder = {k for k in keys if k.startswith("layers.") or k in ("norm.weight", "output.weight")}
    text_tower = {k for k in keys if k.startswith("clip.") and not k.startswith("clip.visual.")}
    assert not decoder and not text_tower
    assert "tok_embeddings.weight" in keys and "routers.image.fc1.weight" in keys
    expected = {k.removeprefix("llma.") for k in checkpoint}
    expected = {k for k in expected
                if not k.startswith(("layers.", "norm.", "output.", "clip.")) or k.startswith("clip.visual.")}
    assert keys == expected


def test_llm_folder_loads_and_matches_metas_decoder(converted, fixture_dir):
    checkpoint = torch.load(fixture_dir / "consolidated.00-of-01.pth", map_location="cpu", mmap=True, weights_only=True)
    weights = {k.removeprefix("llma."): v for k, v in checkpoint.items() if k.startswith("llma.")}
    llm = {k: v for k, v in weights.items() if k.startswith(("layers.", "tok_embeddings.", "norm.", "output."))}
    tokenizer = AutoTokenizer.from_pretrained(converted / "llm")
    tokens = tokenizer("###Human: What is in this picture?\n###Assistant:")["input_ids"]
    assert tokens[0] == 1
    expected = meta_llama_logits(llm, tokens, n_heads=4, eps=1e-5)
    torch.testing.assert_close(hf_logits(converted / "llm", tokens), expected, atol=1e-4, rtol=1e-4)
    hf_config = json.loads((converted / "llm" / "config.json").read_text())
    assert hf_config["intermediate_size"] == 512 and hf_config["tie_word_embeddings"] is False
    files = {p.name for p in (converted / "llm").iterdir()}
    assert files == {"config.json", "generation_config.json", "model.safetensors", "tokenizer.model",
                     "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}


def test_half_precision(fixture_dir, tmp_path):
    out = convert(fixture_dir / "consolidated.00-of-01.pth", fixture_dir / "params.json",
                  fixture_dir / "tokenizer.model", tmp_path / "half", clip_heads=2, dtype="float16")
    with safe_open(out / "encoder.safetensors", "pt") as f:
        assert f.get_tensor("clip.visual.conv1.weight").dtype == torch.float16
    assert json.loads((out / "llm" / "config.json").read_text())["torch_dtype"] == "float16"
    assert json.loads((out / "model.json").read_text())["dtype"] == "float16"


def convert_cli(capsys, checkpoint, tokenizer, out, *extra) -> tuple[int, str]:
    code = main(["convert", "--checkpoint", str(checkpoint), "--tokenizer", str(tokenizer), "--out", str(out), *extra])
    return code, capsys.readouterr().err


def test_truncated_checkpoint_is_reported(tmp_path, capsys, fixture_dir):
    whole = tmp_path / "whole.pth"
    torch.save({"llma.tok_embeddings.weight": torch.randn(100, 64)}, whole)
    data = whole.read_bytes()
    (tmp_path / "half.pth").write_bytes(data[: len(data) // 2])
    code, err = convert_cli(capsys, tmp_path / "half.pth", fixture_dir / "tokenizer.model", tmp_path / "out")
    assert code != 0
    assert "truncated or corrupt" in err and "half.pth" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_foreign_checkpoint_names_the_missing_key(tmp_path, capsys, fixture_dir):
    torch.save({"model.embed.weight": torch.randn(10, 4), "model.head.weight": torch.randn(4, 10)}, tmp_path / "x.pth")
    code, err = convert_cli(capsys, tmp_path / "x.pth", fixture_dir / "tokenizer.model", tmp_path / "out")
    assert code != 0
    assert "is not a OneLLM checkpoint: missing key 'llma.tok_embeddings.weight'" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_missing_key_in_an_almost_complete_checkpoint(tmp_path, capsys, fixture_dir):
    checkpoint = torch.load(fixture_dir / "consolidated.00-of-01.pth", map_location="cpu", mmap=True, weights_only=True)
    del checkpoint["llma.clip.visual.conv1.weight"], checkpoint["llma.resample_layers.1.4.ffn_norm.weight"]
    torch.save(checkpoint, tmp_path / "broken.pth")
    code, err = convert_cli(capsys, tmp_path / "broken.pth", fixture_dir / "tokenizer.model", tmp_path / "out",
                            "--params", str(fixture_dir / "params.json"), "--clip-heads", "2")
    assert code != 0
    assert "missing key 'llma.clip.visual.conv1.weight' (and 1 more)" in err


def test_wrong_params_are_reported(tmp_path, capsys, fixture_dir):
    """Forgetting --params on the fixture means LLaMA-2-7B's, which do not fit it."""
    code, err = convert_cli(capsys, fixture_dir / "consolidated.00-of-01.pth", fixture_dir / "tokenizer.model",
                            tmp_path / "out", "--clip-heads", "2")
    assert code != 0
    assert "missing key 'llma.layers.2.attention.wq.weight'" in err


def test_existing_output_needs_force(tmp_path, capsys, fixture_dir):
    (tmp_path / "out").mkdir()
    args = [fixture_dir / "consolidated.00-of-01.pth", fixture_dir / "tokenizer.model", tmp_path / "out",
            "--params", str(fixture_dir / "params.json"), "--clip-heads", "2"]
    code, err = convert_cli(capsys, *args)
    assert code != 0 and "already exists" in err
    code, err = convert_cli(capsys, *args, "--force")
    assert code == 0 and (tmp_path / "out" / "model.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no partial folder left behind


def test_from_hub_downloads_checkpoint_and_tokenizer(tmp_path, fixture_dir, monkeypatch):
    import huggingface_hub

    requested = []

    def fake_download(repo, filename):
        requested.append((repo, filename))
        return str(fixture_dir / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    args = ["convert", "--from-hub", "csuhan/OneLLM-7B", "--params", str(fixture_dir / "params.json"),
            "--clip-heads", "2", "--out", str(tmp_path / "hub")]
    assert main(args) == 0
    assert requested == [("csuhan/OneLLM-7B", "consolidated.00-of-01.pth"), ("csuhan/OneLLM-7B", "tokenizer.model")]
    assert json.loads((tmp_path / "hub" / "model.json").read_text())["source"] == "csuhan/OneLLM-7B"


def test_from_hub_without_tokenizer_says_what_to_pass(tmp_path, fixture_dir, monkeypatch, capsys):
    import huggingface_hub

    def fake_download(repo, filename):
        if filename == "tokenizer.model":
            raise FileNotFoundError(f"{filename} is not in {repo}")
        return str(fixture_dir / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    assert main(["convert", "--from-hub", "csuhan/OneLLM-7B", "--out", str(tmp_path / "hub")]) != 0
    err = capsys.readouterr().err
    assert "could not download tokenizer.model from csuhan/OneLLM-7B" in err and "--tokenizer" in err
