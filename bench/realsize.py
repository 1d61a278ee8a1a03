"""OneLLM-7B at real size on any device: every figure against this device's own limits, in one run.

    uv run python bench/realsize.py --out docs/bench-realsize.json                # CPU, the device's dtype
    uv run python bench/realsize.py --device cuda --dtype float16                 # a GPU
    uv run python bench/realsize.py --model model_repo/tiny --skip-llm            # a converted model's shapes
    uv run python bench/realsize.py --llm-layers 8 --gguf DIR/llm-q4_k.gguf       # float32 7B does not fit: 8 of its layers

Random weights of OneLLM-7B's shapes (the real checkpoint cannot be fetched here): the encoder of
bench/encoder.py and LLaMA-2-7B built in memory. The run measures the device's matmul rate per dtype
and its read bandwidth first, then reports against them: encoder prefixes/s per modality and batch
(FLOPs counted, not estimated), LLM prefill rows/s, decode tokens/s at batch 1 against bandwidth ÷
bytes per token, one image question end to end, and the peak memory of each part.
"""

import argparse
import ctypes
import gc
import json
import math
import platform
import sys
import time
from functools import partial
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).parent))  # run as a script or loaded by a test, the siblings import
from encoder import INPUT_SHAPES, random_7b_encoder  # noqa: E402
from realsize_llm import llm_figures  # noqa: E402
from realsize_memory import PeakMemory  # noqa: E402

from server.engines import panels  # noqa: E402
from server.model.dtype import decide_dtype, host_cpu_flags, native_on_cpu  # noqa: E402
from server.model.onellm import load_model, place  # noqa: E402

DTYPES = ("bfloat16", "float32", "float16")
CPU_FLAGS = host_cpu_flags()


def onednn_linear_flops(x_shape, *_, out_shape, **__) -> int:
    return 2 * math.prod(x_shape) * out_shape[-1]  # x [..., in] -> [..., out], with or without a fused op after it


def fused_attention_flops(query_shape, *_, **__) -> int:
    b, n, w = query_shape  # self-attention: q, k, v and the output projections, then QKᵀ and AV
    return 2 * b * n * w * 4 * w + 2 * 2 * b * n * n * w


def count_flops(fn, *args) -> int:
    """Floating-point operations of fn(*args), counted op by op from the shapes torch sees.

    The counter knows aten's products and attention; the oneDNN product server/engines/linear.py
    calls, and the fused op its SelfAttention runs on plain weights of many rows, are taught to it
    here. The products on panels (server/engines/panels.py) call C without torch seeing them: they
    are counted as they are made."""
    on_panels = 0
    product = panels.product

    def counted(x, weight, *rest, **kwargs):
        nonlocal on_panels
        on_panels += 2 * x.numel() * weight.shape[0] * weight.shape[2]  # rows × K × N, N = panels × 32
        return product(x, weight, *rest, **kwargs)

    panels.product = counted
    try:
        with FlopCounterMode(display=False,
                             custom_mapping={torch.ops.mkldnn._linear_pointwise: onednn_linear_flops,
                                             torch.ops.aten._native_multi_head_attention: fused_attention_flops}) as counter:
            fn(*args)
    finally:
        panels.product = product
    return counter.get_total_flops() + on_panels


def release_freed_heap() -> None:
    """Hands back to the system what building the encoder in float32 freed: glibc keeps freed heap
    (some GB here) otherwise, which the LLM would then need on top."""
    gc.collect()
    if platform.system() == "Linux":
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def synchronizer(device: torch.device):
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def timed(fn, device: torch.device, seconds: float) -> float:
    """Seconds per call of fn, after one warm-up call, over at least one call and `seconds`."""
    sync = synchronizer(device)
    fn()
    sync()
    runs, start = 0, time.perf_counter()
    while runs < 1 or time.perf_counter() - start < seconds:
        fn()
        runs += 1
    sync()
    return (time.perf_counter() - start) / runs


def matmul_rate(device: torch.device, dtype: torch.dtype, seconds: float) -> dict:
    """GFLOP/s of one square matrix product: large enough to reach the kernel's rate, except for a
    half dtype this CPU has no instructions for, whose rate is so low that a small one says enough
    (a 2048² bfloat16 product takes 14 s on an AVX2 CPU)."""
    slow = device.type == "cpu" and not native_on_cpu(dtype, CPU_FLAGS)
    n = 256 if slow else 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device).to(dtype)
    per_call = timed(lambda: a @ a, device, 0 if slow else seconds)
    return {"n": n, "gflops": 2 * n**3 / per_call / 1e9}


def read_bandwidth(device: torch.device, seconds: float, gib: float = 2.0) -> float:
    """GB/s of summing a bfloat16 tensor much larger than any cache: each byte read once per pass."""
    x = torch.ones(int(gib * 2**30) // 2, dtype=torch.bfloat16, device=device)
    per_call = timed(lambda: x.sum(), device, seconds)
    return x.numel() * 2 / per_call / 1e9


def encoder_figures(encoder, modalities: list[str], batches: list[int], device, dtype, matmul_gflops: float,
                    seconds: float) -> dict:
    """Per modality: FLOPs of one prefix, and per batch the prefixes/s and its % of the matmul rate,
    both the run's and the one measured just before and after the timing: on a machine shared with
    other jobs the rate moves, and only the latter compares the two under the same load."""
    results = {}
    for modality in modalities:
        one = torch.randn(1, *INPUT_SHAPES[modality], device=device, dtype=dtype)
        flops = count_flops(encoder, modality, one)
        rows = {}
        for batch in batches:
            before = matmul_rate(device, dtype, 0)["gflops"]
            per_call = timed(partial(encoder, modality, one.expand(batch, *one.shape[1:]).contiguous()),
                             device, seconds)  # the batch's input is freed with the partial
            around = (before + matmul_rate(device, dtype, 0)["gflops"]) / 2
            rate = batch / per_call
            rows[batch] = {"prefixes_per_s": rate, "seconds_per_call": per_call,
                           "pct_of_matmul": 100 * rate * flops / 1e9 / matmul_gflops,
                           "matmul_gflops_around": around, "pct_of_matmul_around": 100 * rate * flops / 1e9 / around}
        results[modality] = {"gflop_per_prefix": flops / 1e9, "batches": rows}
        print(f"  {modality}: {flops / 1e9:.1f} GFLOP/prefix; " + "; ".join(
            f"batch {b}: {r['prefixes_per_s']:.2f}/s ({r['pct_of_matmul']:.0f} %; {r['pct_of_matmul_around']:.0f} % of"
            f" {r['matmul_gflops_around']:.0f} measured around it)" for b, r in rows.items()),
            flush=True)
    return results


def machine_figures(device: torch.device, seconds: float, read_gib: float) -> dict:
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    rates = {name: matmul_rate(device, getattr(torch, name), seconds) for name in DTYPES}
    figures = {"device": str(device), "where": where, "torch": torch.__version__, "matmul": rates,
               "read_gb_per_s": read_bandwidth(device, seconds, read_gib)}
    print(f"{where}: matmul " + ", ".join(f"{k} {v['gflops']:.1f}" for k, v in rates.items())
          + f" GFLOP/s; read {figures['read_gb_per_s']:.1f} GB/s", flush=True)
    return figures


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=DTYPES, default=None,
                        help="compute dtype (default: what `onellm serve` picks: bfloat16 on a CPU that has "
                             "it natively, else float32; float16 on a GPU)")
    parser.add_argument("--model", help="a converted model folder: its shapes (random LLM weights) instead of 7B")
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--modalities", default=",".join(m for m in INPUT_SHAPES if m != "rgbn"),
                        help="rgbn is left out by default: the same computation as rgbd")
    parser.add_argument("--seconds", type=float, default=0.0,
                        help="least time per timed figure (default 0: one timed call after a warm-up)")
    parser.add_argument("--read-gib", type=float, default=2.0, help="size of the tensor read for the bandwidth")
    parser.add_argument("--prefill-rows", type=int, default=100)
    parser.add_argument("--answer-tokens", type=int, default=32)
    parser.add_argument("--skip-llm", action="store_true")
    parser.add_argument("--llm-layers", type=int, default=0,
                        help="build only this many of the full-weights LLM's layers (where 7B's do not fit)")
    parser.add_argument("--skip-full-llm", action="store_true",
                        help="only the quantized files of --gguf: the full weights' figures are not made")
    parser.add_argument("--gguf", default="", help="PATH[,PATH]: quantized LLM files for server.engines.llamacpp")
    parser.add_argument("--out", help="write the figures as JSON here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    # OneLLM-7B's weights are float16, which a GPU keeps
    dtype = decide_dtype(args.dtype or "auto", str(device), torch.float16).dtype
    start = time.perf_counter()
    memory = PeakMemory(device)
    report = {"machine": machine_figures(device, args.seconds, args.read_gib), "dtype": str(dtype).removeprefix("torch."),
              "shapes": args.model or "OneLLM-7B (random weights)"}
    matmul = report["machine"]["matmul"][report["dtype"]]["gflops"]
    encoder = load_model(args.model, device, dtype).encoder if args.model else place(random_7b_encoder(), device, dtype)
    release_freed_heap()
    with memory.phase("encoder, running (its fp32 build not counted)") as peak:
        report["encoder"] = encoder_figures(encoder, args.modalities.split(","), [int(b) for b in args.batches.split(",")],
                                            device, dtype, matmul, args.seconds)
    report["encoder_peak_bytes"] = peak.bytes
    if not args.skip_llm:
        report["llm"] = llm_figures(encoder, args, device, dtype, report["machine"], memory)
    report["seconds"] = time.perf_counter() - start
    print(f"whole run: {report['seconds']:.0f} s")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    return report


if __name__ == "__main__":
    main()
