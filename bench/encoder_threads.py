"""Encoder throughput on the gateway's threads (a benchmark, not a test): one run at a time on every
core, as online batches run, and on one core, against one run per core at once on one core each, as
batch lines' run.

    uv run python bench/encoder_threads.py --model model_repo/tiny

The model is loaded on the main thread and the runs go on worker threads, as in the gateway: the
process then holds more OpenMP threads than cores, and libgomp wakes a run's other cores through
the kernel for every operation. Inputs are random tensors of each modality's preprocessed shape,
batch 1. Prints a markdown table of prefixes per second.
"""

import argparse
import time
from concurrent.futures import ThreadPoolExecutor

import torch
from encoder import INPUT_SHAPES

from server.core.workers import one_core_threads
from server.model.onellm import load_model


def prefixes_per_second(encoder, modality: str, seconds: float) -> float:
    x = torch.randn(1, *INPUT_SHAPES[modality])
    encoder(modality, x)  # warm-up
    runs, start = 0, time.perf_counter()
    while runs < 2 or time.perf_counter() - start < seconds:
        encoder(modality, x)
        runs += 1
    return runs / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="model_repo/tiny")
    parser.add_argument("--modalities", default=",".join(INPUT_SHAPES))
    parser.add_argument("--seconds", type=float, default=3.0, help="time per measurement")
    args = parser.parse_args()

    encoder = load_model(args.model, dtype="float32").encoder
    cores = torch.get_num_threads()
    every_core = ThreadPoolExecutor(1)
    one_core_each = one_core_threads(cores, "one-core")
    print(f"encoder {args.model}, float32, {cores} cores, torch {torch.__version__}, batch 1\n")
    print(f"| modality | one run on {cores} cores | one run on one core | {cores} runs at once, one core each |")
    print("|---|---:|---:|---:|")
    for m in args.modalities.split(","):
        alone = every_core.submit(prefixes_per_second, encoder, m, args.seconds).result()
        one_core = one_core_each.submit(prefixes_per_second, encoder, m, args.seconds).result()
        side_by_side = sum(f.result() for f in [one_core_each.submit(prefixes_per_second, encoder, m, args.seconds)
                                                for _ in range(cores)])
        print(f"| {m} | {alone:.2f} | {one_core:.2f} | {side_by_side:.2f} |", flush=True)


if __name__ == "__main__":
    main()
