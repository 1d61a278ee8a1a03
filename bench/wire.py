"""Wire cost of prompt embeddings: bytes and serialisation time of one vLLM request (a benchmark).

    uv run python bench/wire.py

For the tiny model ([L, 128] float32) and OneLLM-7B sizes ([L, 4096] float16), times what the
gateway's vLLM engine (server/engines/vllm.py) does per request before the first byte leaves:
`completion_request` (the embeddings `torch.save`d and base64-encoded), then `request_json`
(the body's bytes); and, for scale, what vLLM does to read them back (base64 decode +
`torch.load`). Prints a markdown table; medians of `--repeats` runs.
"""

import argparse
import base64
import io
import statistics
import time

import torch

from server.engines.base import Sampling
from server.engines.vllm import completion_request, request_json

SHAPES = [("tiny", 128, torch.float32, [115, 300, 600]), ("OneLLM-7B", 4096, torch.float16, [100, 300, 600])]


def median_ms(fn, repeats: int) -> float:
    fn()  # first call allocates
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| model | shape | dtype | raw MiB | body MiB | completion_request ms | body bytes, in all ms | vLLM reads it ms |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for name, dim, dtype, lengths in SHAPES:
        for length in lengths:
            # the gateway's embeddings are a torch.cat of the prompt's pieces: a fresh tensor
            embeddings = torch.cat([torch.randn(1, dim), torch.randn(length - 1, dim)]).to(dtype)
            sampling = Sampling(max_tokens=32)
            body = completion_request(embeddings, sampling, "m", dtype)
            encoded = request_json(body)

            def read_back():
                torch.load(io.BytesIO(base64.b64decode(body["prompt_embeds"])), weights_only=True)

            build = median_ms(lambda: completion_request(embeddings, sampling, "m", dtype), args.repeats)
            send = median_ms(lambda: request_json(completion_request(embeddings, sampling, "m", dtype)), args.repeats)
            raw = embeddings.numel() * embeddings.element_size()
            print(f"| {name} | [{length}, {dim}] | {str(dtype).removeprefix('torch.')} | {raw / 2**20:.3f} | "
                  f"{len(encoded) / 2**20:.3f} | {build:.2f} | {send:.2f} | {median_ms(read_back, args.repeats):.2f} |",
                  flush=True)


if __name__ == "__main__":
    main()
