"""Decoding OneLLM-7B's LLM on quantized weights: llama.cpp against torch's own weight-only
kernels, side by side on this machine (a benchmark, not a test).

    uv run --extra llamacpp python bench/quantized.py --scratch /tmp/onellm-7b-gguf \\
        --tokenizer ../shared/fixtures/onellm-ref-tiny/tokenizer.model --out docs/bench-quantized.json

One run measures:
1. the machine's read bandwidth (the sum of a 2 GiB bfloat16 tensor), before and after each row;
2. torch, batch 1: the matrices one decode step of LLaMA-2-7B multiplies (32 blocks of 7, and the
   output), weight-only int8 (`torch._weight_int8pack_mm`, a scale per row) and int4
   (`torch._weight_int4pack_mm_for_cpu`, groups of 128), optionally bfloat16: the time of the
   matrices alone, a lower bound of a torch decode step;
3. llama.cpp: GGUF files of LLaMA-2-7B's shapes with random weights, written by `onellm quantize`'s
   writer (q8_0, q4_0, q4_k; kept in --scratch for the next run), served by the embedded llama.cpp engine:
   the prefill of 100 embedding rows (the image question's prompt is 82), then 32 greedy tokens.
Each figure is also given as a share of the bandwidth: bytes a token reads ÷ seconds ÷ bandwidth.
"""

import argparse
import asyncio
import json
import platform
import sys
import time
from functools import partial
from pathlib import Path

import gguf
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from server.engines.base import Sampling  # noqa: E402
from server.engines.llamacpp import LlamaCppEngine  # noqa: E402
from server.tools.quantize import write_gguf  # noqa: E402

# LLaMA-2-7B (OneLLM-7B's LLM)
CONFIG = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
          "num_key_value_heads": 32, "vocab_size": 32000, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
          "rope_theta": 10000.0, "bos_token_id": 1, "eos_token_id": 2}
PROMPT_ROWS, TOKENS = 100, 32


def read_bandwidth() -> float:
    """Bytes per second of torch's sum over a 2 GiB bfloat16 tensor (best of 3), in memory allocated
    anew each time: on this virtual machine one allocation reads at 31-36 GB/s and, now and then, one
    at 55-60, so each row is set against the bandwidth measured just before and after it."""
    x = torch.ones(1 << 30, dtype=torch.bfloat16)
    x.sum()
    best = min(timed(lambda: x.sum()) for _ in range(3))
    return x.numel() * 2 / best


def timed(f) -> float:
    start = time.perf_counter()
    f()
    return time.perf_counter() - start


def matrix_shapes() -> list[tuple[int, int]]:
    """[out, in] of every matrix a decode step multiplies, in order."""
    d, h = CONFIG["hidden_size"], CONFIG["intermediate_size"]
    block = [(d, d)] * 4 + [(h, d), (h, d), (d, h)]
    return block * CONFIG["num_hidden_layers"] + [(CONFIG["vocab_size"], d)]


def torch_matrices(kind: str) -> tuple[list, int]:
    """The step's matrices in `kind` with random values, as (multiply-by-x function, bytes) pairs."""
    steps, total = [], 0
    for n, k in matrix_shapes():
        if kind == "bfloat16":
            w = torch.randn(n, k, dtype=torch.bfloat16)
            steps.append(lambda x, w=w: torch.nn.functional.linear(x, w))
            total += w.nbytes
        elif kind == "int8":
            w, scales = torch.randint(-127, 128, (n, k), dtype=torch.int8), torch.rand(n, dtype=torch.bfloat16)
            steps.append(lambda x, w=w, s=scales: torch._weight_int8pack_mm(x, w, s))
            total += w.nbytes + scales.nbytes
        else:
            group = 128
            packed = torch._convert_weight_to_int4pack_for_cpu(torch.randint(0, 16, (n, k), dtype=torch.int32), 1)
            scales_zeros = torch.rand(k // group, n, 2, dtype=torch.bfloat16)
            steps.append(lambda x, w=packed, sz=scales_zeros: torch._weight_int4pack_mm_for_cpu(x, w, group, sz))
            total += packed.nbytes + scales_zeros.nbytes
    return steps, total


def torch_step_seconds(kind: str, repeats: int = 5) -> tuple[float, int]:
    """Best time of one pass over the step's matrices at batch 1, and the bytes they hold."""
    steps, total = torch_matrices(kind)
    xs = {k: torch.randn(1, k, dtype=torch.bfloat16) for k in {k for _, k in matrix_shapes()}}
    shapes = matrix_shapes()

    def one_pass():
        for (_, k), step in zip(shapes, steps):
            step(xs[k])

    one_pass()
    return min(timed(one_pass) for _ in range(repeats)), total


def random_tensor(name: str) -> torch.Tensor:
    d, h, v = CONFIG["hidden_size"], CONFIG["intermediate_size"], CONFIG["vocab_size"]
    if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
        return torch.ones(d)
    shape = {"embed_tokens": (v, d), "lm_head": (v, d), "gate_proj": (h, d), "up_proj": (h, d),
             "down_proj": (d, h)}
    rows_cols = next((s for key, s in shape.items() if key in name), (d, d))
    return torch.randn(rows_cols) * 0.02


def gguf_file(scratch: Path, weight_type: str, tokenizer: Path) -> Path:
    path = scratch / f"llama-2-7b-shapes-{weight_type}.gguf"
    if not path.is_file():
        scratch.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        write_gguf(partial, CONFIG, tokenizer, weight_type, random_tensor)
        partial.rename(path)
    return path


def bytes_per_token(path: Path) -> int:
    """Every tensor of the file is read once a token but the embedding table, of which one row is."""
    tensors = gguf.GGUFReader(path).tensors
    return sum(int(t.n_bytes) for t in tensors if t.name != "token_embd.weight")


def llama_cpp_run(path: Path, tokenizer: Path, repeats: int = 3) -> dict:
    """Best prefill and best decode of `repeats` answers."""
    engine = LlamaCppEngine(path, tokenizer, max_positions=CONFIG["max_position_embeddings"], sequences=1)

    def new_prompt():  # rows no earlier prompt began with: the engine would reuse them
        return torch.randn(PROMPT_ROWS, CONFIG["hidden_size"]) * 0.02

    engine.first_logits(new_prompt())  # warm-up: threads, buffers of the prompt's size
    prefills, decodes = [], []
    for _ in range(repeats):
        ids = engine.token_ids(new_prompt(), Sampling(max_tokens=TOKENS + 1, stop=(), ignore_eos=True))
        prefills.append(timed(lambda: next(ids)))
        decodes.append(timed(lambda: [None for _ in ids]))
    asyncio.run(engine.close())
    return {"prefill_s": min(prefills), "decode_tokens_per_s": TOKENS / min(decodes)}


def around(measure) -> tuple[dict, float]:
    """measure()'s row, and the read bandwidth measured just before and after it (their mean)."""
    before = read_bandwidth()
    row = measure()
    return row, (before + read_bandwidth()) / 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scratch", type=Path, required=True, help="folder for the GGUF files (15 GB for the three; reused)")
    parser.add_argument("--tokenizer", type=Path, required=True, help="LLaMA-2's tokenizer.model (32000 pieces)")
    parser.add_argument("--torch", default="int8,int4", help="torch kinds to time: bfloat16,int8,int4")
    parser.add_argument("--gguf", default="q8_0,q4_0,q4_k")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    print(f"LLaMA-2-7B shapes, {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}\n")
    print("| weights | kernels | bytes a token reads (GB) | prefill of 100 rows (s) | decode (tokens/s) "
          "| read bandwidth around it (GB/s) | of bandwidth ÷ bytes |")
    print("|---|---|---:|---:|---:|---:|---:|")
    measures = [(kind, "torch (matrices only)", partial(torch_row, kind)) for kind in filter(None, args.torch.split(","))]
    measures += [(weight_type, "llama.cpp (whole step)", partial(llama_cpp_row, args.scratch, weight_type, args.tokenizer))
                 for weight_type in filter(None, args.gguf.split(","))]
    rows = []
    for weights, kernels, measure in measures:
        row, bandwidth = around(measure)
        row.update(weights=weights, kernels=kernels, bandwidth_bytes_per_s=bandwidth,
                   of_bandwidth=row["decode_tokens_per_s"] * row["bytes"] / bandwidth)
        rows.append(row)
        prefill = f"{row['prefill_s']:.2f}" if row["prefill_s"] is not None else "–"
        print(f"| {weights} | {kernels} | {row['bytes'] / 1e9:.2f} | {prefill} | {row['decode_tokens_per_s']:.2f} | "
              f"{bandwidth / 1e9:.1f} | {row['of_bandwidth']:.0%} |", flush=True)
    if args.out:
        args.out.write_text(json.dumps({"threads": torch.get_num_threads(), "torch": torch.__version__,
                                        "rows": rows}, indent=1) + "\n")


def torch_row(kind: str) -> dict:
    seconds, total = torch_step_seconds(kind)
    return {"bytes": total, "prefill_s": None, "decode_tokens_per_s": 1 / seconds}


def llama_cpp_row(scratch: Path, weight_type: str, tokenizer: Path) -> dict:
    path = gguf_file(scratch, weight_type, tokenizer)
    return {"bytes": bytes_per_token(path), **llama_cpp_run(path, tokenizer)}


if __name__ == "__main__":
    main()
