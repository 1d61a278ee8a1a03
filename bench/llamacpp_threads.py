"""llama.cpp's decode beside the gateway's other threads (a benchmark, not a test): greedy tokens/s of
a GGUF file at batch 1 on 1 and on all threads alone, then with OpenMP teams held by other threads
(as the gateway's encoder and worker threads hold them once torch has run there), then beside a
torch matrix-product loop on every core (an encoder run at the same time).

    uv run --extra llamacpp python bench/llamacpp_threads.py --gguf /tmp/g7/llm-q4_0.gguf \\
        --tokenizer ../shared/fixtures/onellm-ref-tiny/tokenizer.model
    PYTHONPATH=DIR uv run python bench/llamacpp_threads.py ...   # a llama_cpp built otherwise, in DIR

Its system info line says whether that llama.cpp was built with OpenMP.
"""

import argparse
import asyncio
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from realsize_llm import decode_timing  # noqa: E402
from server.engines.llamacpp import LlamaCppEngine, import_llama_cpp  # noqa: E402

PROMPT_ROWS = 82  # the image question's


def decode_rate(engine: LlamaCppEngine, prompt: torch.Tensor, tokens: int) -> float:
    return decode_timing(engine, prompt, tokens + 1)["tokens_per_s"]  # the tokens after the prefill's


def hold_openmp_teams(threads: int) -> list[ThreadPoolExecutor]:
    """`threads` threads that have each run a parallel torch op, so each holds an OpenMP team."""
    pools = [ThreadPoolExecutor(1) for _ in range(threads)]
    square = torch.randn(512, 512)
    for pool in pools:
        pool.submit(lambda: square @ square).result()
    return pools


def beside_products(rate_of) -> tuple[float, float]:
    """rate_of() measured while another thread multiplies 1024² matrices on every core; with the
    products' GFLOP/s over the same time."""
    stop, done = threading.Event(), [0]

    def products():
        square = torch.randn(1024, 1024)
        while not stop.is_set():
            square @ square
            done[0] += 1

    thread = threading.Thread(target=products)
    thread.start()
    time.sleep(0.5)
    before, start = done[0], time.perf_counter()
    rate = rate_of()
    gflops = (done[0] - before) * 2 * 1024**3 / (time.perf_counter() - start) / 1e9
    stop.set()
    thread.join()
    return rate, gflops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", type=Path, required=True)
    parser.add_argument("--tokenizer", type=Path, required=True)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--teams", type=int, default=3, help="other threads holding OpenMP teams")
    args = parser.parse_args()

    print(import_llama_cpp().llama_print_system_info().decode().strip())
    rows, engine = [], None
    for threads in (1, torch.get_num_threads()):
        if engine is not None:
            asyncio.run(engine.close())
        engine = LlamaCppEngine(args.gguf, args.tokenizer, max_positions=2048, sequences=1, threads=threads)
        prompt = torch.randn(PROMPT_ROWS, engine.dim) * 0.02  # rows as wide as the file's model
        engine.first_logits(prompt)  # warm-up
        rows.append((f"{threads} thread(s), alone", decode_rate(engine, prompt, args.tokens)))
    pools = hold_openmp_teams(args.teams)
    rows.append((f"{threads} threads, {args.teams} other threads holding OpenMP teams",
                 decode_rate(engine, prompt, args.tokens)))
    rate, gflops = beside_products(lambda: decode_rate(engine, prompt, args.tokens))
    _, alone = beside_products(lambda: time.sleep(2))
    rows.append((f"{threads} threads, beside torch products on every core ({gflops:.0f} GFLOP/s meanwhile, "
                 f"{alone:.0f} alone)", rate))
    for pool in pools:
        pool.shutdown()
    print("| decode | tokens/s |\n|---|---:|")
    for name, rate in rows:
        print(f"| {name} | {rate:.2f} |")


if __name__ == "__main__":
    main()
