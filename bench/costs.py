"""CPU cost of one request by stage, and the throughput no server can pass on this machine's CPU
(a benchmark, not a test).

    uv run python bench/costs.py --model model_repo/tiny

For each modality of the load benchmark's mix (real files made as it makes them), the CPU time
of decoding the upload, of the encoder at batch 1 and of generating `--max-tokens` tokens in
process, measured with one torch thread, where CPU time is spent with the least overhead. Every
server of this model does the decoding and the encoder work of each new attachment, so
cores / (decode + encoder CPU time per request) bounds its requests/s on CPU, whatever it
batches, as long as batching does not make the encoder cheaper per row (bench/encoder.py
measures whether it does).
"""

import argparse
import asyncio
import os
import statistics
import time

import torch

from media import MIX, make_item
from server.engines.base import Sampling, Usage
from server.engines.local import LocalEngine
from server.config import Settings
from server.media.modalities import preprocess
from server.media.modalities.base import Decoding
from server.model.onellm import load_model


def cpu_ms(work):
    start = time.process_time()
    result = work()
    return result, (time.process_time() - start) * 1e3


async def generate(engine: LocalEngine, embeddings: torch.Tensor, max_tokens: int) -> None:
    async for _ in engine.stream(embeddings, Sampling(max_tokens=max_tokens), Usage()):
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="model_repo/tiny")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--dtype", choices=["auto", "float32", "float16", "bfloat16"], default="float32",
                        help="what the encoder and the LLM compute in (the gateway's default is auto)")
    parser.add_argument("--files", type=int, default=3, help="files measured per modality, after one warm-up")
    args = parser.parse_args()

    torch.set_num_threads(1)
    model = load_model(args.model, dtype=args.dtype)
    engine = LocalEngine(model.path / "llm", dtype=model.dtype)
    print(f"{args.model}, {model.dtype}, CPU time with 1 torch thread, {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.2f}\n")
    print("| modality | decode (ms) | encoder, batch 1 (ms) | generate (ms) |")
    print("|---|---:|---:|---:|")
    limits = Settings().decoder_limits()
    means = []
    for modality in MIX:
        rows = []
        for seed in range(args.files + 1):  # the first file warms up allocations and kernels
            item = make_item(modality, 600_000 + seed)
            inputs, decode = cpu_ms(lambda: preprocess(modality, item.files, Decoding(limits, **item.options)))
            prefix, encode = cpu_ms(lambda: model.encode(modality, inputs.unsqueeze(0))[0])
            embeddings = model.embeddings(model.prompt_ids([("user", item.text)]), [(modality, prefix)])
            _, gen = cpu_ms(lambda: asyncio.run(generate(engine, embeddings, args.max_tokens)))
            rows.append((decode, encode, gen))
        mean = [statistics.fmean(r[i] for r in rows[1:]) for i in range(3)]
        means.append(mean)
        print(f"| {modality} | {mean[0]:.1f} | {mean[1]:.1f} | {mean[2]:.1f} |", flush=True)
    decode, encode, gen = (statistics.fmean(m[i] for m in means) for i in range(3))
    print(f"| **mean of the mix** | {decode:.1f} | {encode:.1f} | {gen:.1f} |\n")
    bound = os.cpu_count() * 1e3 / (decode + encode)
    print(f"bound on any server's requests/s here: {os.cpu_count()} cores / {decode + encode:.1f} ms = {bound:.2f}")


if __name__ == "__main__":
    main()
