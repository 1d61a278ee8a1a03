"""bench/realsize.py: its FLOP counter counts what hand arithmetic says, and one run on a converted
model's shapes reports every figure it promises."""

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from missing import unavailable
from server.engines import panels
from server.engines.linear import Linear, SelfAttention, linear_add, linear_silu, pack_linears
from server.model.dtype import host_cpu_flags

BENCH = Path(__file__).parents[1] / "bench"
sys.path.insert(0, str(BENCH))
_SPEC = importlib.util.spec_from_file_location("realsize", BENCH / "realsize.py")
realsize = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(realsize)


@pytest.mark.parametrize("rows", [5, 300])  # 5 rows go through oneDNN, 300 through aten's product
def test_a_linear_layer_counts_two_flops_per_multiply_add(rows):
    n_in, n_out = 64, 32
    assert realsize.count_flops(Linear(n_in, n_out), torch.randn(rows, n_in)) == 2 * rows * n_in * n_out


@pytest.mark.skipif(not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()),
                    reason="this CPU's oneDNN has no bfloat16 kernels")
@pytest.mark.parametrize("cpu_flags", [pytest.param(host_cpu_flags(), id="panels", marks=pytest.mark.skipif(
    not panels.usable(host_cpu_flags()), reason="no AVX512-BF16 or no C compiler here: no panels")),
    pytest.param(frozenset(), id="onednn")])
@torch.inference_mode()
def test_a_packed_product_with_an_op_after_it_counts_as_the_product(cpu_flags):
    n_in, n_out, rows = 64, 32, 9
    layer = Linear(n_in, n_out, bias=False).to(torch.bfloat16)
    pack_linears(layer, cpu_flags)
    assert panels.is_panels(layer.weight) == bool(cpu_flags)
    x, other = torch.randn(rows, n_in, dtype=torch.bfloat16), torch.randn(rows, n_out, dtype=torch.bfloat16)
    for op in (lambda: linear_add(x, layer.weight, other), lambda: linear_silu(x, layer.weight)):
        assert realsize.count_flops(op) == 2 * rows * n_in * n_out


@pytest.mark.parametrize("length", [7, 300])  # 7: products through oneDNN, 300: torch's fused op
@torch.inference_mode()
def test_clips_attention_is_counted_as_its_products(length):
    """CLIP's attention: its four projections (2·L·W² each) and its attention (QKᵀ and AV, 2·L²·W
    each) must all be counted, whichever way it runs."""
    width = 32
    attention = SelfAttention(nn.MultiheadAttention(width, 4, batch_first=True))
    x = torch.randn(1, length, width)
    counted = realsize.count_flops(lambda: attention(x, x, x, need_weights=False))
    assert counted == 4 * 2 * length * width**2 + 2 * 2 * length**2 * width


def test_one_run_reports_every_figure(tiny_model, tmp_path):
    if importlib.util.find_spec("llama_cpp") is None:
        unavailable("llama_cpp is not installed: `uv sync --extra llamacpp` (make test does)")

    from server.tools.quantize import quantize

    model = tmp_path / "tiny"
    shutil.copytree(tiny_model, model)
    gguf = quantize(model, "q8_0")
    out = tmp_path / "realsize.json"
    report = realsize.main(["--model", str(model), "--modalities", "image,fmri", "--batches", "1,2",
                            "--answer-tokens", "4", "--read-gib", "0.125", "--gguf", str(gguf), "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert all(report["machine"]["matmul"][d]["gflops"] > 0 for d in realsize.DTYPES)
    assert report["machine"]["read_gb_per_s"] > 0
    for modality in ("image", "fmri"):
        figures = report["encoder"][modality]
        assert figures["gflop_per_prefix"] > 0
        assert all(figures["batches"][b]["prefixes_per_s"] > 0 for b in (1, 2))
    llm = report["llm"]
    assert llm["prefill_gflop"] > 0 and llm["decode"]["tokens"] == 4
    assert llm["image_question"]["prompt_rows"] == 32 + 50 and llm["image_question"]["answer_tokens"] == 4
    assert report["encoder_peak_bytes"] > 0 and llm["peak_bytes"] > 0
    quantized = llm["gguf"][gguf.name]
    assert quantized["prefill_gflop"] == llm["prefill_gflop"] and quantized["decode"]["tokens"] == 4
    assert quantized["decode_pct_of_bandwidth_around"] > 0 and quantized["read_gb_per_s_around"] > 0
    assert quantized["image_question"]["answer_tokens"] == 4 and quantized["peak_bytes"] > 0


def test_the_quantized_llm_is_measured_without_the_full_one(tiny_model, tmp_path):
    """Where the full weights are not run (a CPU whose float32 7B LLM does not fit), the quantized
    file still gets every figure, its prefill set against the same FLOP count."""
    if importlib.util.find_spec("llama_cpp") is None:
        unavailable("llama_cpp is not installed: `uv sync --extra llamacpp` (make test does)")

    from server.tools.quantize import quantize

    model = tmp_path / "tiny"
    shutil.copytree(tiny_model, model)
    gguf = quantize(model, "q8_0")
    report = realsize.main(["--model", str(model), "--modalities", "fmri", "--batches", "1", "--answer-tokens", "2",
                            "--read-gib", "0.125", "--gguf", str(gguf), "--skip-full-llm"])
    llm = report["llm"]
    assert "decode" not in llm and "peak_bytes" not in llm
    quantized = llm["gguf"][gguf.name]
    assert quantized["prefill_gflop"] == llm["prefill_gflop"] > 0 and quantized["prefill_pct_of_matmul"] > 0
    assert quantized["decode"]["tokens"] == 2 and quantized["image_question"]["answer_tokens"] == 2
    assert quantized["peak_bytes"] > 0


def test_a_random_llm_is_built_in_place_and_decodes():
    from realsize_llm import random_llm
    from transformers import LlamaConfig

    from server.engines.base import Sampling
    from server.engines.local import LocalEngine

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         vocab_size=300, max_position_embeddings=64)
    model = random_llm(config, torch.device("cpu"), torch.bfloat16)
    weights = dict(model.named_parameters())
    assert all(p.dtype == torch.bfloat16 and p.isfinite().all() for p in weights.values())
    assert 0.01 < weights["model.layers.0.mlp.up_proj.weight"].float().std() < 0.03
    assert (weights["model.norm.weight"] == 1).all()
    ids = list(LocalEngine.around(model).token_ids(torch.randn(5, 64), Sampling(max_tokens=6, ignore_eos=True)))
    assert len(ids) == 6 and all(0 <= i < 300 for i in ids)


def test_the_prefill_is_counted_without_weights_as_with_them():
    """llama.cpp's prefill is set against the FLOPs torch counts for the same model, counted on the
    meta device (a 7B model in float32 does not fit every host that runs the quantized one)."""
    from realsize_llm import prefill_flops, random_llm
    from transformers import LlamaConfig

    from server.engines.local import LocalEngine

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         vocab_size=300, max_position_embeddings=64)
    engine = LocalEngine.around(random_llm(config, torch.device("cpu"), torch.float32))
    assert prefill_flops(config, 9) == realsize.count_flops(engine.first_logits, torch.randn(9, 64))


def test_the_llm_size_the_memory_check_uses_is_the_models():
    from realsize_llm import llm_bytes
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                         vocab_size=300)
    model = LlamaForCausalLM(config)
    assert llm_bytes(config, torch.float32) == sum(p.numel() * 4 for p in model.parameters())


def test_the_served_benchmark_asks_a_real_server_and_reads_its_memory(tiny_model, tmp_path):
    """bench/realsize_serve.py on the tiny model: `onellm serve` in its own process answers each
    image question in full over HTTP, then the chat's next turn, then a new image's question, and the
    server's own peak memory is read."""
    spec = importlib.util.spec_from_file_location("realsize_serve", BENCH / "realsize_serve.py")
    serve_bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(serve_bench)

    out = tmp_path / "served.json"
    report = serve_bench.main(["--model", str(tiny_model), "--questions", "2", "--answer-tokens", "4",
                               "--new-images", "1", "--out", str(out), "--workdir", str(tmp_path)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert report["served"]["id"] == tiny_model.name and report["served"]["llm_weights"] == "full"
    assert len(report["questions"]) == 2 and len(report["new_images"]) == 1
    for question in report["questions"] + report["new_images"]:
        assert 0 < question["first_token_s"] <= question["seconds"]
        assert question["prompt_tokens"] > 30 and 1 <= question["answer_tokens"] <= 4
    first, again = report["questions"]
    assert first["encoder_s"] > 0 and first["preprocess_s"] > 0  # the server's own figures for this answer
    assert again["encoder_s"] == 0  # the same image: its prefix was cached
    assert report["new_images"][0]["encoder_s"] > 0
    follow_up = report["follow_up"]  # the first turn, its answer and a new question
    assert follow_up["prompt_tokens"] > report["questions"][0]["prompt_tokens"] + report["questions"][0]["answer_tokens"]
    # the server process's own figure: it holds torch and the model
    assert report["peak_bytes"] >= report["peak_bytes_ready"] > 200 * 2**20


def test_llm_layers_builds_part_of_the_full_llm_and_leaves_the_quantized_files_whole():
    """--llm-layers shrinks only the float32 LLM that is built; the prefill FLOPs of the GGUF files,
    which hold all of 7B's layers, are still counted on the whole config."""
    import realsize_llm

    args = realsize.parse_args(["--llm-layers", "3"])
    assert realsize_llm.full_llm_config(args).num_hidden_layers == 3
    assert realsize_llm.llm_config(args).num_hidden_layers == 32
    assert realsize_llm.full_llm_config(realsize.parse_args([])).num_hidden_layers == 32
