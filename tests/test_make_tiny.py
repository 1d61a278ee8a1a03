"""`onellm make-tiny`: a converted-layout random model, deterministic for a seed, built offline."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, LlamaForCausalLM

from server.cli import main
from server.tools.checkpoint import MODALITIES


def tensors(folder) -> dict[str, torch.Tensor]:
    return load_file(folder / "encoder.safetensors") | load_file(folder / "llm" / "model.safetensors")


@pytest.fixture(scope="module")
def second_build(tmp_path_factory):
    """Another make-tiny with the default seed, in a fresh folder."""
    out = tmp_path_factory.mktemp("again") / "tiny"
    assert main(["make-tiny", "--out", str(out)]) == 0
    return out


def test_layout(tiny_model):
    assert {p.name for p in tiny_model.iterdir()} == {"model.json", "encoder.safetensors", "llm"}
    assert {p.name for p in (tiny_model / "llm").iterdir()} == {
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.model", "tokenizer.json",
        "tokenizer_config.json", "special_tokens_map.json"}


def test_model_json_says_random(tiny_model):
    config = json.loads((tiny_model / "model.json").read_text())
    assert config["format"] == "onellm-serve/1" and config["name"] == "tiny"
    assert config["random_weights"] is True
    assert config["modalities"] == list(MODALITIES)
    assert config["encoder"] | {"width": 64, "clip_layers": 2, "clip_heads": 2, "upm_experts": 3, "upm_blocks": 8,
                                "prefix_tokens": 30} == config["encoder"]
    assert config["llm"] | {"dim": 128, "n_layers": 2, "n_heads": 4, "bos_id": 1, "eos_id": 2} == config["llm"]
    assert 512 <= config["llm"]["vocab_size"] <= 2000


def test_encoder_weights(tiny_model):
    weights = load_file(tiny_model / "encoder.safetensors")
    config = json.loads((tiny_model / "model.json").read_text())
    assert weights["tok_embeddings.weight"].shape == (config["llm"]["vocab_size"], 128)
    assert weights["conv1.fmri.weight"].shape == (8 * 64, 15724)
    assert not any(k.startswith(("layers.", "clip.token_embedding", "clip.ln_final")) for k in weights)
    assert "norm.weight" not in weights and "output.weight" not in weights
    assert torch.equal(weights["clip.visual.ln_pre.weight"], torch.ones(64))
    assert torch.equal(weights["clip.visual.ln_pre.bias"], torch.zeros(64))
    assert weights["resample_layers.0.0.attention.wq.weight"].std().item() == pytest.approx(0.02, rel=0.1)


def test_llm_loads(tiny_model):
    model = LlamaForCausalLM.from_pretrained(tiny_model / "llm")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model / "llm")
    ids = tokenizer("###Human: What is in this image?\n###Assistant:", return_tensors="pt")["input_ids"]
    assert ids[0, 0].item() == 1
    with torch.no_grad():
        assert model(ids).logits.shape == (1, ids.shape[1], len(tokenizer))


def test_same_seed_same_model(tiny_model, second_build):
    again = second_build
    first, second = tensors(tiny_model), tensors(again)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    for name in ("llm/tokenizer.model", "llm/tokenizer.json", "llm/config.json"):
        assert (tiny_model / name).read_bytes() == (again / name).read_bytes()


def test_other_seed_other_weights(tiny_model, tmp_path):
    assert main(["make-tiny", "--out", str(tmp_path / "tiny"), "--seed", "1"]) == 0
    first, other = tensors(tiny_model), tensors(tmp_path / "tiny")
    assert not torch.equal(first["clip.visual.conv1.weight"], other["clip.visual.conv1.weight"])


def test_says_it_is_random(tmp_path, capsys):
    # how long it takes: bench/timings.py make-tiny
    assert main(["make-tiny", "--out", str(tmp_path / "tiny")]) == 0
    assert "random" in capsys.readouterr().out.lower()
