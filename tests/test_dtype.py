"""The compute dtype: decided from the device, the CPU's flags and --dtype, whatever the weights
were written in; and what the gateway does with the decision."""

import logging
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from server.config import Settings
from server.entrypoints.app import build_engine, create_app
from server.metrics import Metrics
from server.model.dtype import choose_dtype, host_cpu_flags, native_on_cpu
from server.model.onellm import load_model

ZEN5 = frozenset({"fpu", "sse2", "avx2", "avx512f", "avx512_bf16"})  # this machine's, abridged
SAPPHIRE_RAPIDS = frozenset({"avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile"})
AMX_ONLY = frozenset({"avx2", "amx_bf16"})
ZEN3 = frozenset({"fpu", "sse2", "avx2", "fma"})
bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32


@pytest.mark.parametrize("device, flags, stored, expected", [
    ("cpu", ZEN5, fp16, bf16),
    ("cpu", ZEN5, fp32, bf16),
    ("cpu", AMX_ONLY, fp16, bf16),
    ("cpu", SAPPHIRE_RAPIDS, bf16, bf16),
    ("cpu", ZEN3, fp16, fp32),
    ("cpu", ZEN3, bf16, fp32),
    ("cpu", frozenset(), fp32, fp32),
    ("cuda", ZEN3, fp16, fp16),
    ("cuda:1", ZEN5, bf16, bf16),
    ("cuda", ZEN5, fp32, fp32),
], ids=lambda v: v if isinstance(v, str) else None)
def test_auto_follows_the_device_and_the_cpu_not_the_stored_weights(device, flags, stored, expected):
    choice = choose_dtype("auto", device, stored, flags)
    assert choice.dtype == expected and not choice.asked and choice.warning is None


def test_asking_overrides_the_decision():
    for name in ("float32", "bfloat16"):
        choice = choose_dtype(name, "cpu", fp16, ZEN5)
        assert choice.dtype == getattr(torch, name) and choice.asked and choice.warning is None
    assert choose_dtype("float32", "cuda", fp16, ZEN5).dtype == fp32


def test_a_half_dtype_on_a_cpu_without_its_instructions_is_served_with_a_warning_saying_what_it_costs():
    choice = choose_dtype("float16", "cpu", fp32, ZEN5)
    assert choice.dtype == fp16 and choice.asked
    assert "float16" in choice.warning and "GFLOP/s" in choice.warning and "auto" in choice.warning
    assert choose_dtype("float16", "cpu", fp32, SAPPHIRE_RAPIDS).warning is None  # avx512_fp16
    assert choose_dtype("float16", "cuda", fp32, ZEN5).warning is None
    choice = choose_dtype("bfloat16", "cpu", fp16, ZEN3)
    assert choice.dtype == bf16 and choice.warning.startswith("bfloat16 has no native kernels")
    assert "AVX512-BF16" in choice.warning


@pytest.mark.parametrize("dtype, flags, native", [
    (fp32, ZEN3, True), (bf16, ZEN3, False), (bf16, ZEN5, True), (bf16, AMX_ONLY, True),
    (fp16, ZEN5, False), (fp16, SAPPHIRE_RAPIDS, True),
], ids=str)
def test_a_half_dtype_is_native_only_with_its_own_instructions(dtype, flags, native):
    assert native_on_cpu(dtype, flags) == native


def test_an_unknown_dtype_is_refused_by_name():
    with pytest.raises(ValueError, match="'float8'.*auto, float32, float16, bfloat16"):
        choose_dtype("float8", "cpu", fp32, ZEN5)


def test_the_cpu_flags_are_read_from_cpuinfo(tmp_path: Path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu avx512f avx512_bf16\n"
                       "bugs\t\t: sysret_ss_attrs\n\nprocessor\t: 1\nflags\t\t: fpu avx512f avx512_bf16\n")
    assert host_cpu_flags(cpuinfo) == {"fpu", "avx512f", "avx512_bf16"}
    assert host_cpu_flags(tmp_path / "absent") == frozenset()
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd bf16\n")
    assert host_cpu_flags(arm) == frozenset()  # no "flags" line: nothing is assumed


def this_cpu_dtype() -> str:
    """What auto must pick on this machine, read from /proc/cpuinfo here, not by the code under test."""
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    flags = {f for line in text.splitlines() if line.startswith("flags") for f in line.split(":", 1)[1].split()}
    return "bfloat16" if flags & {"avx512_bf16", "amx_bf16"} else "float32"


def test_the_gateway_computes_in_the_dtype_auto_picks_for_this_cpu_and_says_so(tiny_model, caplog):
    caplog.set_level(logging.INFO)
    expected = getattr(torch, this_cpu_dtype())
    with TestClient(create_app(Settings(model=str(tiny_model)))) as client:
        [card] = client.get("/v1/models").json()["data"]
        service = client.app.state.service
        assert card["dtype"] == this_cpu_dtype()
        assert service.model.encoder.tok_embeddings.weight.dtype == expected
        assert next(service.engine.model.parameters()).dtype == expected  # the embedded LLM too
    assert f"computing in {this_cpu_dtype()} on cpu" in caplog.text


def test_asked_float16_is_served_in_float16_with_the_warning_when_this_cpu_lacks_it(tiny_model, caplog):
    native = {"avx512_fp16", "amx_fp16"} & set(Path("/proc/cpuinfo").read_text().split())
    with TestClient(create_app(Settings(model=str(tiny_model), dtype="float16"))) as client:
        assert client.get("/v1/models").json()["data"][0]["dtype"] == "float16"
        assert next(client.app.state.service.engine.model.parameters()).dtype == fp16
    warned = [r for r in caplog.records if r.levelno == logging.WARNING and "GFLOP/s" in r.getMessage()]
    assert len(warned) == (0 if native else 1), caplog.text


def test_embeddings_go_to_vllm_in_the_weights_dtype_unless_one_is_asked_for(tiny_model):
    """vLLM runs on its own device in its own dtype: this CPU's choice for the encoder is no hint of it."""
    settings = Settings(model=str(tiny_model), vllm_url="http://127.0.0.1:9")
    model = load_model(tiny_model, dtype="bfloat16")
    model.compute = choose_dtype("auto", "cpu", model.stored_dtype, ZEN5)  # as a bf16 CPU decides
    [backend] = build_engine(settings, model, Metrics()).backends.values()
    assert backend.dtype == fp32  # make-tiny writes float32
    asked = load_model(tiny_model, dtype="float16")
    [backend] = build_engine(settings, asked, Metrics()).backends.values()
    assert backend.dtype == fp16
