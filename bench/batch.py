"""Batch API benchmark (a benchmark, not a test): a batch's lines per second against the online
saturation throughput of the same gateway in the same run, and what a running batch does to
online clients' time to first token.

    uv run python bench/batch.py --model model_repo/tiny --out docs/bench-batch.json
    uv run python bench/batch.py --model model_repo/tiny --vllm --out docs/bench-batch-vllm.json

Starts its own gateway (tests/gateway_process.py) on the model folder; with `--vllm`, first a vLLM
(.venv-vllm, started by tests/vllm_server.py as the vLLM tier starts one) serving the folder's
llm/, and the gateway over it, computing in float32 as vLLM does. Then, on that one gateway:

1. saturation: `--concurrency` clients send the mix back to back, streaming (bench/load.py's client);
   requests/s at the best level;
2. idle: online clients arriving at a modest rate (`--online-share` of (1)), nobody else: TTFT;
3. batch: `--lines` lines cycling through all eight modalities, inline data URLs in one JSONL file
   uploaded with purpose=batch, nothing else running: lines/s from the create to `completed`,
   and its ratio to (1);
4. batch + online: another batch of as many lines while (2)'s clients arrive at the same rate: their
   TTFT against (2)'s.

In (1) and (3) it also reads the encoder's share of the time and, per modality, its mean batch and
milliseconds per input (the gateway's histograms): what the batch's lines/s is bound by here.
Every request and line carries files of its own seed, so the prefix cache never answers one.
`--flag NAME=VALUE` passes a flag to `onellm serve` (repeatable), e.g. batch-max-in-flight=8.
"""

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from load import (content_parts, chat_body, encoder_use, machine, mean_encoder_batch, percentiles, run_level, scrape,
                  stream, summarize)
from media import IMU_RATE, MIX, Item, make_item, mixed

REPO = Path(__file__).resolve().parents[1]
sys.path.append(str(REPO / "tests"))  # appended: bench/media.py, not tests/media.py, is `media` here
from gateway_process import GatewayProcess  # noqa: E402

SEEDS = {"warmup": 700_000, "saturation": 710_000, "idle": 720_000, "batch": 730_000, "busy": 740_000,
         "beside": 750_000}
POLL_S = 0.5
FINAL = ("completed", "failed", "expired", "cancelled")


def line_body(item: Item, max_tokens: int) -> dict:
    return {"messages": [{"role": "user", "content": content_parts(item)}], "max_tokens": max_tokens,
            "temperature": 0, "imu_sample_rate": IMU_RATE}


def input_file(items: list[Item], max_tokens: int) -> bytes:
    return b"".join(json.dumps({"custom_id": f"{i}-{item.modality}", "method": "POST", "url": "/v1/chat/completions",
                                "body": line_body(item, max_tokens)}).encode() + b"\n"
                    for i, item in enumerate(items))


async def in_flight(client: httpx.AsyncClient) -> float:
    for row in (await client.get("/metrics")).text.splitlines():
        if row.startswith("onellm_batch_lines_in_flight "):
            return float(row.split()[1])
    return 0.0


async def run_batch(client: httpx.AsyncClient, items: list[Item], max_tokens: int,
                    started: asyncio.Event | None = None) -> dict:
    """Uploads the lines, creates the batch, polls it to its end; `started` is set once it is in progress."""
    data = input_file(items, max_tokens)
    upload = (await client.post("/v1/files", files={"file": ("lines.jsonl", data)}, data={"purpose": "batch"})).json()
    begin = time.perf_counter()
    batch = (await client.post("/v1/batches", json={"input_file_id": upload["id"], "completion_window": "24h",
                                                    "endpoint": "/v1/chat/completions"})).json()
    samples = []
    while batch["status"] not in FINAL:
        await asyncio.sleep(POLL_S)
        batch = (await client.get(f"/v1/batches/{batch['id']}")).json()
        if batch["status"] == "in_progress" and started is not None:
            started.set()
        samples.append(await in_flight(client))
    wall = time.perf_counter() - begin
    counts = batch["request_counts"]
    return {"lines": len(items), "input_mb": round(len(data) / 1e6, 1), "status": batch["status"],
            "completed": counts["completed"], "failed": counts["failed"], "wall_s": round(wall, 2),
            "lines_per_s": round(counts["completed"] / wall, 3),
            "output_tokens_per_line": round(batch["usage"]["output_tokens"] / max(counts["completed"], 1), 2),
            "mean_lines_in_flight": round(sum(samples) / max(len(samples), 1), 2)}


async def online_at_rate(url: str, count: int, first_seed: int, interval: float, max_tokens: int,
                         until: asyncio.Event | None = None) -> dict:
    """Streaming requests over the mix started every `interval` s (open loop: one does not wait for
    another) until `count` are sent or `until` is set; their TTFT."""
    async with httpx.AsyncClient(timeout=600) as client:
        sent, begin = [], time.perf_counter()
        for i in range(count):
            item = make_item(MIX[i % len(MIX)], first_seed + i)  # made as it is sent: the count may be large
            await asyncio.sleep(max(0.0, begin + i * interval - time.perf_counter()))
            if until is not None and until.is_set():
                break
            body = chat_body([{"role": "user", "content": content_parts(item)}], max_tokens)
            sent.append(asyncio.create_task(stream(client, f"{url}/v1/chat/completions", body)))
        results = await asyncio.gather(*sent)
    ok = [r for r in results if r.error is None]
    return {"requests": len(results), "errors": len(results) - len(ok), "interval_s": round(interval, 3),
            "ttft_ms": percentiles([r.ttft for r in ok], (50, 95)),
            "latency_ms": percentiles([r.latency for r in ok], (50, 95))}


async def saturation(url: str, levels: list[int], requests: int, max_tokens: int) -> dict:
    runs = []
    for level, concurrency in enumerate(levels):
        items = mixed(requests, SEEDS["saturation"] + level * requests)
        bodies = [chat_body([{"role": "user", "content": content_parts(item)}], max_tokens) for item in items]
        runs.append(summarize(*await run_level(bodies, f"{url}/v1/chat/completions", concurrency), concurrency))
        print(f"saturation c={concurrency}: {runs[-1]['requests_per_s']} requests/s, errors {runs[-1]['errors']}")
    return {"levels": runs, "best": max(runs, key=lambda s: s["requests_per_s"])}


async def measure(url: str, args) -> dict:
    async with httpx.AsyncClient(timeout=600) as client:
        before, begin = await scrape(client, url), time.perf_counter()
        found = {"saturation": await saturation(url, args.concurrency, args.requests, args.max_tokens)}
        after, wall = await scrape(client, url), time.perf_counter() - begin
        found["saturation"]["mean_encoder_batch"] = mean_encoder_batch(before, after)
        found["saturation"]["encoder"] = encoder_use(before, after, wall)  # over every level
    interval = 1 / (args.online_share * found["saturation"]["best"]["requests_per_s"])
    found["idle"] = await online_at_rate(url, args.online, SEEDS["idle"], interval, args.max_tokens)
    print(f"idle online: {found['idle']}")
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        before = await scrape(client, url)
        found["batch"] = await run_batch(client, mixed(args.lines, SEEDS["batch"]), args.max_tokens)
        after = await scrape(client, url)
        found["batch"]["mean_encoder_batch"] = mean_encoder_batch(before, after)
        found["batch"]["encoder"] = encoder_use(before, after, found["batch"]["wall_s"])
        found["ratio_to_saturation"] = round(
            found["batch"]["lines_per_s"] / found["saturation"]["best"]["requests_per_s"], 3)
        print(f"batch alone: {found['batch']}, ratio {found['ratio_to_saturation']}")
        started, ended = asyncio.Event(), asyncio.Event()
        batch = asyncio.create_task(run_batch(client, mixed(args.lines, SEEDS["busy"]), args.max_tokens, started))
        batch.add_done_callback(lambda _: ended.set())
        await started.wait()
        found["beside_batch"] = await online_at_rate(url, 10 * args.lines, SEEDS["beside"], interval,
                                                     args.max_tokens, ended)
        found["batch_with_online"] = await batch
    print(f"online beside the batch: {found['beside_batch']}\nthat batch: {found['batch_with_online']}")
    return found


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def run(args, workdir: Path) -> dict:
    flags = [part for flag in args.flag for part in (f"--{flag.split('=', 1)[0]}", flag.split("=", 1)[1])]
    vllm, model = None, Path(args.model)
    if args.vllm:
        from vllm_server import VLLMServer
        vllm = VLLMServer(model, workdir / "vllm.log")
        vllm.start()
        flags = ["--vllm-url", vllm.url, "--dtype", "float32", *flags]
    try:
        gateway = GatewayProcess(model, workdir, flags).start()
        try:
            asyncio.run(online_at_rate(gateway.url, len(MIX), SEEDS["warmup"], 0.0, args.max_tokens))  # first calls
            load_before = uptime()
            found = asyncio.run(measure(gateway.url, args))
            return {"engine": "vllm" if vllm else "embedded", "model": str(model.name), "flags": flags,
                    "uptime_before": load_before, "uptime_after": uptime(), **found}
        finally:
            gateway.stop()
    finally:
        if vllm is not None:
            vllm.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--model", default="model_repo/tiny", help="model folder (the embedded engine)")
    parser.add_argument("--vllm", action="store_true", help="generate on vLLM (its CPU build) instead of in-process")
    parser.add_argument("--lines", type=int, default=512, help="lines of each batch")
    parser.add_argument("--concurrency", default="8,16", type=lambda s: [int(c) for c in s.split(",")],
                        help="saturation levels; the best one counts")
    parser.add_argument("--requests", type=int, default=64, help="requests per saturation level")
    parser.add_argument("--online", type=int, default=24, help="online requests at the modest rate, idle")
    parser.add_argument("--online-share", type=float, default=0.2, help="the modest rate, as a share of saturation")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--flag", action="append", default=[], help="NAME=VALUE passed to onellm serve")
    parser.add_argument("--out", help="JSON results file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        results = {"machine": machine(), "args": vars(args), **run(args, Path(workdir))}
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
