"""Load benchmark of a running gateway (a benchmark, not a test): throughput and latency under
N concurrent streaming clients, side by side with the way OneLLM's authors served the model.

    # the full run behind docs/benchmarks.md: sweep, baseline, vLLM direct, follow-up turns, chats
    uv run python bench/load.py --url http://127.0.0.1:8180 --model model_repo/tiny \\
        --concurrency 1,2,4,8,16 --baseline --direct http://127.0.0.1:8100 --turns 8 \\
        --chats 32 --chat-turns 4 --out docs/bench-load.json --chart docs/bench-load.png
    # a four-turn video chat, resending the video every turn against sending its uuid (embedded engine)
    uv run onellm serve --model model_repo/tiny --port 8180 &
    uv run python bench/load.py --url http://127.0.0.1:8180 --references 5 --video-mb 0,5,50 \\
        --out docs/bench-references.json
    # gateway memory over 1000 requests
    uv run python bench/load.py --url http://127.0.0.1:8180 --soak 1000 --pid <gateway pid> \\
        --out docs/bench-soak.json

Each request is one user turn with one attachment, cycling through all eight modalities (real
PNG, MP4, WAV, .npy files made here, bytes unique to each request so that the gateway's prefix
cache never answers), streamed with greedy decoding and `max_tokens` (the API has no
`ignore_eos`: the actual token counts are reported).

- sweep: for each concurrency c, that many clients send requests back to back.
- `--baseline`: the same requests as the largest sweep level, served as the authors' demo did:
  in this process, one at a time, the encoder at batch 1, the LLM in transformers token by
  token (`LocalEngine`), no HTTP.
- `--direct URL`: the same prompt embeddings, computed here, sent straight to vLLM's
  `/v1/completions` (as server/engines/vllm.py does), at every concurrency; and a serial pass
  that splits each request's TTFT into vLLM, the encoder and what the gateway adds.
- `--turns K`: K video chats of two turns, the second resending the video: encoder runs and
  prefix-cache hits from the gateway's /metrics, vLLM's prefix-cache counters, TTFT of each turn.
- `--chats N`: N chats of `--chat-turns` turns over the mix, every turn resending the chat with
  its attachment, held by as many clients as the largest level; with `--baseline` the same chats
  served the authors' way, which encodes the attachment again at every turn.
- `--references N`: for each size in `--video-mb`, N chats of `--chat-turns` turns over one video,
  once resending the video every turn and once sending it in turn 1 and only the uuid the gateway
  returned (`X-Media-UUIDs`) after: per turn, the request body's bytes, TTFT and total time.
"""

import argparse
import asyncio
import base64
import io
import json
import os
import platform
import re
import statistics
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import av
import httpx
import numpy as np
import torch

from media import IMU_RATE, MIX, Item, make_item, mixed
from server.engines.base import Sampling, Usage
from server.engines.vllm import completion_request
from server.config import Settings
from server.media.modalities import preprocess
from server.media.modalities.base import Decoding
from server.model.onellm import OneLLM, load_model

FOLLOW_UP = "Tell me more."
# each phase draws its files from its own seed range, so no two phases send the same bytes
SEEDS = {"warmup": 0, "sweep": 100_000, "overhead": 200_000, "turns": 300_000, "soak": 400_000, "chats": 500_000,
         "references": 600_000}


@dataclass
class Result:
    """One streamed answer, timed on the client."""

    ttft: float = 0.0  # seconds from sending to the first text
    gaps: list[float] = field(default_factory=list)  # seconds between successive text chunks
    latency: float = 0.0
    tokens: int = 0
    text: str = ""
    error: str | None = None
    prompt_tokens: int = 0
    media: str = ""  # the X-Media-UUIDs header: the uuids of the prompt's attachments


# ---------------------------------------------------------------- requests


def content_parts(item: Item) -> list[dict]:
    """The item as OpenAI content parts, as the gateway's JSON endpoint takes them."""
    parts = [{"type": "text", "text": item.text}]
    for name, data in item.files.items():
        b64 = base64.b64encode(data).decode("ascii")
        if name == "image":
            parts.append({"type": "image_url", "image_url": {"url": f"data:image/png;base64,{b64}"}})
        elif name == "video":
            parts.append({"type": "video_url", "video_url": {"url": f"data:video/mp4;base64,{b64}"}})
        elif name == "audio":
            parts.append({"type": "input_audio", "input_audio": {"data": b64, "format": "wav"}})
        else:
            parts.append({"type": f"input_{name}", f"input_{name}": {"data": b64}})
    return parts


def chat_body(messages: list[dict], max_tokens: int) -> bytes:
    return json.dumps({"messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                       "stream_options": {"include_usage": True}, "imu_sample_rate": IMU_RATE}).encode()


async def stream(client: httpx.AsyncClient, url: str, body: bytes) -> Result:
    """POST a streaming request (gateway chat or vLLM completions) and time its text chunks."""
    result, stamps = Result(), []
    start = time.perf_counter()
    try:
        async with client.stream("POST", url, content=body, headers={"Content-Type": "application/json"}) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return result
            result.media = response.headers.get("x-media-uuids", "")
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    result.error = str(event["error"])
                if event.get("usage"):
                    result.tokens = event["usage"]["completion_tokens"]
                    result.prompt_tokens = event["usage"]["prompt_tokens"]
                for choice in event.get("choices") or []:
                    text = (choice.get("delta") or {}).get("content") or choice.get("text")
                    if text:
                        stamps.append(time.perf_counter())
                        result.text += text
    except httpx.HTTPError as e:
        result.error = repr(e)
    result.latency = time.perf_counter() - start
    if stamps:
        result.ttft = stamps[0] - start
        result.gaps = list(np.diff(stamps))
    elif result.error is None:
        result.error = "no text"
    return result


async def run_clients(concurrency: int, work) -> float:
    """`concurrency` clients sharing one connection pool, each running `await work(client)`;
    returns the wall time."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(work(client) for _ in range(concurrency)))
        return time.perf_counter() - start


async def run_chats(items: list[Item], url: str, concurrency: int, chat_turns: int,
                    max_tokens: int) -> tuple[list[Result], float]:
    """`concurrency` clients each hold chats back to back: every turn resends the whole chat, the
    attachment included, as an OpenAI client does; returns every turn's result and the wall time."""
    pending, results = list(items), []

    async def hold_chats(client: httpx.AsyncClient) -> None:
        while pending:
            messages = [{"role": "user", "content": content_parts(pending.pop(0))}]
            for _ in range(chat_turns):
                results.append(await stream(client, url, chat_body(messages, max_tokens)))
                messages += [{"role": "assistant", "content": results[-1].text}, {"role": "user", "content": FOLLOW_UP}]

    return results, await run_clients(concurrency, hold_chats)


async def run_level(requests: list[bytes], url: str, concurrency: int) -> tuple[list[Result], float]:
    """`concurrency` clients send the requests back to back; returns the results and the wall time."""
    pending = list(enumerate(requests))
    results: list[Result | None] = [None] * len(requests)

    async def send_requests(client: httpx.AsyncClient) -> None:
        while pending:
            i, body = pending.pop(0)
            results[i] = await stream(client, url, body)

    return results, await run_clients(concurrency, send_requests)


# ---------------------------------------------------------------- figures


def percentiles(values: list[float], qs: tuple[int, ...], scale: float = 1000.0) -> dict:
    if not values:
        return {}
    return {f"p{q}": round(float(np.percentile(values, q)) * scale, 2) for q in qs}


def summarize(results: list[Result], wall: float, concurrency: int | None) -> dict:
    ok = [r for r in results if r.error is None]
    tokens = [r.tokens for r in ok]
    summary = {
        "concurrency": concurrency, "requests": len(results), "errors": len(results) - len(ok),
        "wall_s": round(wall, 3), "requests_per_s": round(len(ok) / wall, 3),
        "output_tokens": sum(tokens), "output_tokens_per_s": round(sum(tokens) / wall, 2),
        "tokens_per_request": {"min": min(tokens, default=0), "mean": round(statistics.fmean(tokens), 2) if tokens else 0,
                               "max": max(tokens, default=0)},
        "ttft_ms": percentiles([r.ttft for r in ok], (50, 95, 99)),
        "itl_ms": percentiles([g for r in ok for g in r.gaps], (50, 95)),
        # chunks can carry several tokens when the client reads late: per request, the time per
        # token after the first is the steadier figure
        "tpot_ms": percentiles([(r.latency - r.ttft) / (r.tokens - 1) for r in ok if r.tokens > 1], (50, 95)),
        "latency_ms": percentiles([r.latency for r in ok], (50, 95)),
    }
    if len(ok) < len(results):
        summary["first_error"] = next(r.error for r in results if r.error is not None)
    return summary


def line(name: str, s: dict) -> str:
    ttft, itl, tpot = s["ttft_ms"], s["itl_ms"], s["tpot_ms"]
    return (f"{name:>9} c={str(s['concurrency']):>3}  {s['requests_per_s']:6.2f} req/s  {s['output_tokens_per_s']:7.1f} tok/s  "
            f"TTFT p50/p95/p99 {ttft.get('p50', 0):7.1f}/{ttft.get('p95', 0):7.1f}/{ttft.get('p99', 0):7.1f} ms  "
            f"ITL p50/p95 {itl.get('p50', 0):5.1f}/{itl.get('p95', 0):5.1f} ms  "
            f"TPOT p50/p95 {tpot.get('p50', 0):5.1f}/{tpot.get('p95', 0):5.1f} ms  "
            f"tokens/request {s['tokens_per_request']['mean']}  errors {s['errors']}")


# ---------------------------------------------------------------- metrics scraping


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {'name{labels}': value}."""
    values = {}
    for row in text.splitlines():
        if row and not row.startswith("#"):
            name, _, value = row.rpartition(" ")
            values[name] = float(value)
    return values


async def scrape(client: httpx.AsyncClient, base_url: str) -> dict[str, float]:
    return parse_metrics((await client.get(f"{base_url}/metrics")).text)


def total(metrics: dict[str, float], name: str, **labels) -> float:
    """Sum of the series called `name` whose labels include `labels`."""
    wanted = [f'{k}="{v}"' for k, v in labels.items()]
    return sum(v for key, v in metrics.items()
               if re.fullmatch(rf"{re.escape(name)}(\{{.*\}})?", key) and all(w in key for w in wanted))


def spent(before: dict[str, float], after: dict[str, float], name: str, **labels) -> float:
    """How much a counter (or a histogram's _sum or _count) grew between two scrapes."""
    return total(after, name, **labels) - total(before, name, **labels)


def mean_encoder_batch(before: dict[str, float], after: dict[str, float]) -> float | None:
    """Inputs per encoder batch between two scrapes, every modality; None where none ran."""
    batches = spent(before, after, "onellm_encoder_batch_size_count")
    return round(spent(before, after, "onellm_encoder_batch_size_sum") / batches, 2) if batches else None


def encoder_use(before: dict[str, float], after: dict[str, float], wall_s: float) -> dict:
    """The encoder between two scrapes `wall_s` apart: the seconds it spent running batches per
    second of that time (over 1 where batch lines' runs went side by side), and for each modality
    its mean batch and its encoder milliseconds per input."""
    by_modality = {}
    for modality in MIX:
        if inputs := spent(before, after, "onellm_encoder_batch_size_sum", modality=modality):
            batches = spent(before, after, "onellm_encoder_batch_size_count", modality=modality)
            seconds = spent(before, after, "onellm_encoder_batch_seconds_sum", modality=modality)
            by_modality[modality] = {"mean_batch": round(inputs / batches, 2),
                                     "ms_per_input": round(1000 * seconds / inputs, 1)}
    return {"busy": round(spent(before, after, "onellm_encoder_batch_seconds_sum") / wall_s, 3),
            "by_modality": by_modality}


# ---------------------------------------------------------------- in-process work


def prompt_embeddings(model: OneLLM, item: Item, history: list[tuple[str, str]] = ()) -> torch.Tensor:
    """The prompt embeddings the gateway builds for a chat opening with `item` (its text the first
    user turn, then `history`), with the encoder at batch 1."""
    inputs = preprocess(item.modality, item.files, Decoding(Settings().decoder_limits(), **item.options))
    prefix = model.encode(item.modality, inputs.unsqueeze(0))[0]
    return model.embeddings(model.prompt_ids([("user", item.text), *history]), [(item.modality, prefix)])


def completions_body(embeddings: torch.Tensor, served: str, max_tokens: int, salt: str) -> bytes:
    """vLLM's request for these embeddings, as the gateway's engine builds it. `cache_salt` keeps
    these requests from reusing KV blocks of the gateway's requests for the same embeddings."""
    body = completion_request(embeddings, Sampling(max_tokens=max_tokens), served, embeddings.dtype)
    return json.dumps({**body, "cache_salt": salt}).encode()


async def baseline(model: OneLLM, items: list[Item], max_tokens: int, chat_turns: int = 1) -> tuple[list[Result], float]:
    """The authors' way: one request at a time, batch-1 encoder, transformers token by token.
    With chat_turns > 1 each item opens a chat of that many turns, the attachment encoded anew
    at every turn (there is no cache)."""
    from server.engines.local import LocalEngine
    engine = LocalEngine(model.path / "llm", dtype=model.dtype)

    async def serve(item: Item, history: list[tuple[str, str]] = ()) -> Result:
        result, stamps, usage = Result(), [], Usage()
        start = time.perf_counter()
        embeddings = prompt_embeddings(model, item, history)
        async for delta in engine.stream(embeddings, Sampling(max_tokens=max_tokens), usage):
            stamps.append(time.perf_counter())
            result.text += delta
        result.latency = time.perf_counter() - start
        result.tokens = usage.completion_tokens
        result.ttft = stamps[0] - start if stamps else result.latency
        result.gaps = list(np.diff(stamps))
        return result

    for m in MIX:  # first calls of each modality allocate and pick kernels: not what is measured
        await serve(make_item(m, SEEDS["warmup"]))
    results, start = [], time.perf_counter()
    for item in items:
        history = []
        for _ in range(chat_turns):
            results.append(await serve(item, history))
            history += [("assistant", results[-1].text), ("user", FOLLOW_UP)]
    wall = time.perf_counter() - start
    await engine.close()
    return results, wall


# ---------------------------------------------------------------- phases


async def served_model(vllm: str) -> str:
    async with httpx.AsyncClient() as client:
        return (await client.get(f"{vllm}/v1/models")).json()["data"][0]["id"]


async def overhead(args, model: OneLLM) -> dict:
    """Serial requests through the gateway, each followed by the same embeddings straight to vLLM:
    per request, gateway overhead = gateway TTFT - direct TTFT - (decode + encoder time).

    The decode and encoder time comes from the gateway's own histograms, read before and after
    each request: timing the encoder here instead would be wrong, as vLLM's CPU worker
    busy-polls a core for a second after each request and stalls torch's threads in this
    process (up to 1 s per encode, measured)."""
    items = mixed(2 * len(MIX), SEEDS["overhead"])
    served = await served_model(args.direct)
    bodies = [completions_body(prompt_embeddings(model, item), served, args.max_tokens, f"overhead-{i}")
              for i, item in enumerate(items)]
    rows = []
    async with httpx.AsyncClient(timeout=600) as client:
        for item, body in zip(items, bodies):
            before = await scrape(client, args.url)
            via_gateway = await stream(client, f"{args.url}/v1/chat/completions",
                                       chat_body([{"role": "user", "content": content_parts(item)}], args.max_tokens))
            after = await scrape(client, args.url)
            stage = sum(spent(before, after, f"{h}_sum")
                        for h in ("onellm_preprocess_seconds", "onellm_encoder_batch_seconds"))
            direct = await stream(client, f"{args.direct}/v1/completions", body)
            for r in (via_gateway, direct):
                if r.error:
                    raise SystemExit(f"overhead pass failed: {r.error}")
            rows.append({"modality": item.modality, "gateway_ttft_ms": round(via_gateway.ttft * 1e3, 2),
                         "direct_ttft_ms": round(direct.ttft * 1e3, 2), "encoder_ms": round(stage * 1e3, 2),
                         "overhead_ms": round((via_gateway.ttft - direct.ttft - stage) * 1e3, 2)})
    column = lambda name: [r[name] / 1e3 for r in rows]  # noqa: E731 - percentiles() takes seconds
    return {"requests": rows, **{f"{name}_p50_p95": percentiles(column(name), (50, 95))
                                 for name in ("gateway_ttft_ms", "direct_ttft_ms", "encoder_ms", "overhead_ms")}}


async def turns(args) -> dict:
    """Video chats of two turns; the second resends the video with the history."""
    rows = []
    async with httpx.AsyncClient(timeout=600) as client:
        for k in range(args.turns):
            item = make_item("video", SEEDS["turns"] + k)
            first_turn = [{"role": "user", "content": content_parts(item)}]
            first = await stream(client, f"{args.url}/v1/chat/completions", chat_body(first_turn, args.max_tokens))
            gateway_before = await scrape(client, args.url)
            vllm_before = await scrape(client, args.direct) if args.direct else {}
            history = [*first_turn, {"role": "assistant", "content": first.text},
                       {"role": "user", "content": FOLLOW_UP}]
            second = await stream(client, f"{args.url}/v1/chat/completions", chat_body(history, args.max_tokens))
            gateway_after = await scrape(client, args.url)
            vllm_after = await scrape(client, args.direct) if args.direct else {}
            for r in (first, second):
                if r.error:
                    raise SystemExit(f"turns pass failed: {r.error}")
            rows.append({
                "first_ttft_ms": first.ttft * 1e3, "follow_up_ttft_ms": second.ttft * 1e3,
                "follow_up_encoder_runs": spent(gateway_before, gateway_after, "onellm_encoder_runs_total", modality="video"),
                "follow_up_prefix_cache_hits": spent(gateway_before, gateway_after, "onellm_prefix_cache_hits_total",
                                                     modality="video"),
                "follow_up_vllm_prefix_queries": spent(vllm_before, vllm_after, "vllm:prefix_cache_queries_total"),
                "follow_up_vllm_prefix_hits": spent(vllm_before, vllm_after, "vllm:prefix_cache_hits_total"),
            })
    first = statistics.median(r["first_ttft_ms"] for r in rows)
    follow = statistics.median(r["follow_up_ttft_ms"] for r in rows)
    return {"chats": rows, "first_ttft_ms_p50": round(first, 2), "follow_up_ttft_ms_p50": round(follow, 2),
            "ratio_p50": round(first / follow, 2),
            "follow_up_encoder_runs": sum(r["follow_up_encoder_runs"] for r in rows),
            "follow_up_prefix_cache_hits": sum(r["follow_up_prefix_cache_hits"] for r in rows)}


async def vllm_prefix_cache(args, model: OneLLM) -> dict:
    """Does vLLM's prefix cache serve prompt-embedding requests? The same embeddings sent twice,
    then a longer prompt that starts with them (a follow-up turn), each read off vLLM's counters."""
    served = await served_model(args.direct)
    item = make_item("video", SEEDS["turns"] + 10_000)
    first = prompt_embeddings(model, item)
    longer = prompt_embeddings(model, item, [("assistant", "A gradient slides to the right."), ("user", FOLLOW_UP)])
    shared = int(next((i for i in range(min(len(first), len(longer))) if not torch.equal(first[i], longer[i])),
                      min(len(first), len(longer))))
    salt = f"prefix-probe-{time.time_ns()}"  # blocks cached by an earlier run against this vLLM do not count
    rows = []
    async with httpx.AsyncClient(timeout=600) as client:
        for name, embeddings in (("first", first), ("same again", first), ("follow-up", longer)):
            before = await scrape(client, args.direct)
            r = await stream(client, f"{args.direct}/v1/completions",
                             completions_body(embeddings, served, args.max_tokens, salt))
            after = await scrape(client, args.direct)
            rows.append({"request": name, "prompt_tokens": embeddings.shape[0], "ttft_ms": round(r.ttft * 1e3, 2),
                         "queries": spent(before, after, "vllm:prefix_cache_queries_total"),
                         "hits": spent(before, after, "vllm:prefix_cache_hits_total"),
                         "error": r.error})
    return {"shared_prefix_rows": shared, "requests": rows}


async def chats(args, model: OneLLM | None) -> dict:
    """Chats of --chat-turns turns over the mix, through the gateway at the largest concurrency
    and, with --baseline, served the authors' way: the workload where reuse across turns counts."""
    c = max(args.concurrency)
    items = mixed(args.chats, SEEDS["chats"], args.mix)
    gateway = summarize(*await run_chats(items, f"{args.url}/v1/chat/completions", c, args.chat_turns,
                                         args.max_tokens), c)
    print(line("chats", gateway), flush=True)
    out = {"chats": args.chats, "turns": args.chat_turns, "gateway": gateway}
    if args.baseline:
        out["baseline"] = summarize(*await baseline(model, items, args.max_tokens, args.chat_turns), None)
        out["speedup"] = round(gateway["requests_per_s"] / out["baseline"]["requests_per_s"], 2)
        print(line("chats base", out["baseline"]), flush=True)
        print(f"chats: gateway at c={c} / baseline: {out['speedup']}x turns/s", flush=True)
    return out


LINK_BITS_PER_S = 10e6  # the 10 Mbit/s link, for the computed upload times


def sized_mp4(megabytes: float, seed: int, width: int = 320, height: int = 240, fps: int = 25) -> bytes:
    """An H.264 MP4 of at least `megabytes` MB (10^6 bytes): frames of uniform noise, which x264
    cannot shrink, so the file gets large at a frame size the gateway decodes quickly. zerolatency
    turns off x264's lookahead, which held back ~40 frames and overshot the size by 40 %."""
    rng = np.random.default_rng(seed)
    out = io.BytesIO()
    with av.open(out, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps, options={"crf": "10", "preset": "ultrafast",
                                                                    "tune": "zerolatency"})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        while out.tell() < megabytes * 1e6:
            frame = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return out.getvalue()


def video_item(megabytes: float, seed: int) -> Item:
    """0 MB: the 2-second 64x48 clip the other phases send, to compare with --turns."""
    if megabytes == 0:
        return make_item("video", seed)
    return Item("video", {"video": sized_mp4(megabytes, seed)}, "What happens in this video?")


async def video_chat(client: httpx.AsyncClient, base_url: str, item: Item, by_reference: bool, turns: int,
                     max_tokens: int) -> list[dict]:
    """One chat over `item`'s video; from turn 2 on, the opening message carries the video's uuid
    instead of its bytes when `by_reference`. One row per turn."""
    opening = content_parts(item)
    messages, rows = [{"role": "user", "content": opening}], []
    for turn in range(1, turns + 1):
        body = chat_body(messages, max_tokens)
        before = await scrape(client, base_url)
        r = await stream(client, f"{base_url}/v1/chat/completions", body)
        after = await scrape(client, base_url)
        if r.error:
            raise SystemExit(f"references pass failed at turn {turn}: {r.error}")
        delta = partial(spent, before, after)
        rows.append({
            "turn": turn, "body_bytes": len(body), "ttft_ms": round(r.ttft * 1e3, 2),
            "latency_ms": round(r.latency * 1e3, 2),
            # the gateway's own TTFT starts once the body is in and parsed: the rest of the
            # client's is the body's way in
            "gateway_ttft_ms": round(delta("onellm_time_to_first_token_seconds_sum") * 1e3, 2),
            "prompt_tokens": r.prompt_tokens, "completion_tokens": r.tokens, "media": r.media,
            "encoder_runs": delta("onellm_encoder_runs_total", modality="video"),
            "prefix_cache_hits": delta("onellm_prefix_cache_hits_total", modality="video"),
            "references_served": delta("onellm_media_references_total", outcome="served"),
        })
        if by_reference and turn == 1:
            messages[0] = {"role": "user", "content": [opening[0], {"type": "video_url", "uuid": r.media}]}
        messages += [{"role": "assistant", "content": r.text}, {"role": "user", "content": FOLLOW_UP}]
    return rows


def per_turn(rows: list[dict]) -> list[dict]:
    """Medians over the chats, turn by turn, and what the bytes would take on a 10 Mbit/s link."""
    summary = []
    for turn in sorted({r["turn"] for r in rows}):
        of_turn = [r for r in rows if r["turn"] == turn]
        median = lambda name: round(statistics.median(r[name] for r in of_turn), 2)  # noqa: E731
        summary.append({"turn": turn, "chats": len(of_turn), "body_bytes": median("body_bytes"),
                        "ttft_ms_p50": median("ttft_ms"), "latency_ms_p50": median("latency_ms"),
                        "gateway_ttft_ms_p50": median("gateway_ttft_ms"),
                        "prompt_tokens_p50": median("prompt_tokens"),
                        "computed_10mbit_upload_s": round(median("body_bytes") * 8 / LINK_BITS_PER_S, 3),
                        "encoder_runs": sum(r["encoder_runs"] for r in of_turn),
                        "prefix_cache_hits": sum(r["prefix_cache_hits"] for r in of_turn),
                        "references_served": sum(r["references_served"] for r in of_turn),
                        "same_uuid_as_turn_1": all(r["media"] == r["turn_1_media"] for r in of_turn)})
    return summary


async def references(args) -> dict:
    """--references chats per video size and way of sending it. The two ways alternate which goes
    first, so that drift in the machine's load falls on both; every chat has a video of its own,
    so that turn 1 always decodes and encodes."""
    out = {"sizes": []}
    async with httpx.AsyncClient(timeout=600) as client:
        # the first chat's calls allocate and pick kernels: not what is measured
        await video_chat(client, args.url, make_item("video", SEEDS["warmup"]), True, args.chat_turns, args.max_tokens)
        for n, megabytes in enumerate(args.video_mb):
            rows = {"resend": [], "reference": []}
            for rep in range(args.references):
                order = ("resend", "reference") if rep % 2 == 0 else ("reference", "resend")
                for way in order:
                    item = video_item(megabytes, SEEDS["references"] + 1000 * n + 2 * rep + (way == "reference"))
                    chat = await video_chat(client, args.url, item, way == "reference", args.chat_turns,
                                            args.max_tokens)
                    rows[way] += [{**r, "chat": rep, "video_bytes": len(item.files["video"]),
                                   "turn_1_media": chat[0]["media"]} for r in chat]
            videos = [r["video_bytes"] for r in rows["resend"] + rows["reference"]]
            size = {"video_mb": megabytes, "video_bytes_min_max": [min(videos), max(videos)],
                    **{way: {"turns": per_turn(r), "rows": r} for way, r in rows.items()}}
            for way in rows:
                for t in size[way]["turns"]:
                    print(f"references {megabytes:>4} MB {way:>9} turn {t['turn']}: body {t['body_bytes']:>11,.0f} B  "
                          f"TTFT p50 {t['ttft_ms_p50']:8.1f} ms (gateway's {t['gateway_ttft_ms_p50']:7.1f})  "
                          f"total p50 {t['latency_ms_p50']:8.1f} ms  encoder runs {t['encoder_runs']:.0f}", flush=True)
            out["sizes"].append(size)
    return out


def rss_kib(pid: int) -> int:
    for row in Path(f"/proc/{pid}/status").read_text().splitlines():
        if row.startswith("VmRSS:"):
            return int(row.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


async def soak(args) -> dict:
    """`--soak N` requests of unique files, the gateway's RSS read every `--soak-every` of them."""
    every, samples = args.soak_every, [(0, rss_kib(args.pid))]
    url = f"{args.url}/v1/chat/completions"
    for start in range(0, args.soak, every):
        items = mixed(min(every, args.soak - start), SEEDS["soak"] + start, args.mix)
        bodies = [chat_body([{"role": "user", "content": content_parts(i)}], args.max_tokens) for i in items]
        results, _ = await run_level(bodies, url, args.soak_concurrency)
        if errors := [r.error for r in results if r.error]:
            raise SystemExit(f"soak: {len(errors)} errors, the first: {errors[0]}")
        samples.append((start + len(items), rss_kib(args.pid)))
        print(f"soak {samples[-1][0]:5d} requests  RSS {samples[-1][1] / 1024:7.1f} MiB", flush=True)
    # the first batch of requests loads what a gateway loads once (kernels, decoders' tables)
    reference = next(kib for n, kib in samples if n >= args.soak_warmup)
    after = [kib for n, kib in samples if n >= args.soak_warmup]
    return {"requests": args.soak, "concurrency": args.soak_concurrency, "pid": args.pid,
            "samples_kib": samples, "reference_after_requests": args.soak_warmup, "reference_mib": round(reference / 1024, 1),
            "final_mib": round(samples[-1][1] / 1024, 1), "min_mib": round(min(after) / 1024, 1),
            "max_mib": round(max(after) / 1024, 1),
            "max_change_pct": round(100 * max(abs(k - reference) for k in after) / reference, 2)}


# ---------------------------------------------------------------- output


def machine() -> dict:
    cpu = next((row.split(":", 1)[1].strip() for row in Path("/proc/cpuinfo").read_text().splitlines()
                if row.startswith("model name")), platform.processor())
    mem_kib = int(next(row.split()[1] for row in Path("/proc/meminfo").read_text().splitlines()
                       if row.startswith("MemTotal")))
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gib": round(mem_kib / (1 << 20), 1),
            "python": platform.python_version(), "torch": torch.__version__, "torch_threads": torch.get_num_threads()}


def chart(results: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), dpi=90)
    for name, style in (("gateway", "o-"), ("direct", "s--")):
        levels = results.get(name) or []
        c = [s["concurrency"] for s in levels]
        label = "gateway (encoder + vLLM)" if name == "gateway" else "vLLM direct (embeddings precomputed)"
        left.plot(c, [s["requests_per_s"] for s in levels], style, label=label)
        right.plot(c, [s["ttft_ms"]["p50"] for s in levels], style, label=f"{name} p50")
        right.plot(c, [s["ttft_ms"]["p95"] for s in levels], style, alpha=0.5, label=f"{name} p95")
    if base := results.get("baseline"):
        left.axhline(base["requests_per_s"], color="grey", linestyle=":", label="baseline (serial, in-process)")
        right.axhline(base["ttft_ms"]["p50"], color="grey", linestyle=":", label="baseline p50")
    if chats := results.get("chats"):
        c, turns = chats["gateway"]["concurrency"], chats["turns"]
        left.plot([c], [chats["gateway"]["requests_per_s"]], "*", markersize=10, label=f"gateway, {turns}-turn chats (turns/s)")
        if base := chats.get("baseline"):
            left.plot([c], [base["requests_per_s"]], "x", color="grey", label=f"baseline, {turns}-turn chats")
    left.set(xscale="log", yscale="log", xlabel="concurrent clients", ylabel="requests/s", title="Throughput")
    right.set(xscale="log", yscale="log", xlabel="concurrent clients", ylabel="ms", title="Time to first token")
    for ax in (left, right):
        ax.set_xticks(results["args"]["concurrency"], labels=[str(c) for c in results["args"]["concurrency"]])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--url", default="http://127.0.0.1:8080", help="the gateway")
    parser.add_argument("--model", default="model_repo/tiny", help="model folder, for --baseline and --direct")
    parser.add_argument("--concurrency", default="1,2,4,8,16", type=lambda s: [int(c) for c in s.split(",")])
    parser.add_argument("--requests", type=int, default=32, help="requests per level (at least 3 per client)")
    parser.add_argument("--mix", default=",".join(MIX), type=lambda s: tuple(s.split(",")),
                        help="modalities the requests cycle through (default all eight)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0, help="shifts every file's seed: a second run against the "
                        "same gateway needs another, or its prefix cache answers")
    parser.add_argument("--baseline", action="store_true", help="also serve the largest level's requests serially in-process")
    parser.add_argument("--direct", metavar="URL", help="vLLM server the gateway uses, to measure the gateway's share")
    parser.add_argument("--turns", type=int, default=0, help="video chats of two turns to run")
    parser.add_argument("--chats", type=int, default=0, help="chats of the mix to hold at the largest concurrency "
                        "(with --baseline, also served the authors' way)")
    parser.add_argument("--chat-turns", type=int, default=4, help="turns of each of --chats")
    parser.add_argument("--references", type=int, default=0, help="chats per video size, each way (resending "
                        "the video, sending its uuid), of --chat-turns turns")
    parser.add_argument("--video-mb", default=[5.0], type=lambda s: [float(m) for m in s.split(",")],
                        help="video sizes for --references, MB (10^6 bytes); 0: the small clip of --turns")
    parser.add_argument("--soak", type=int, default=0, help="requests to send while watching the gateway's RSS")
    parser.add_argument("--pid", type=int, help="the gateway's process id, for --soak")
    parser.add_argument("--soak-concurrency", type=int, default=8)
    parser.add_argument("--soak-every", type=int, default=50, help="requests between RSS readings")
    parser.add_argument("--soak-warmup", type=int, default=100, help="requests before the reference RSS reading")
    parser.add_argument("--out", help="JSON results file")
    parser.add_argument("--chart", help="PNG chart of throughput and TTFT against concurrency")
    args = parser.parse_args()
    for phase in SEEDS:
        SEEDS[phase] += args.seed

    results = {"machine": machine(), "load_average_start": os.getloadavg(),
               "args": {k: v for k, v in vars(args).items() if k not in ("out", "chart")}}
    if args.soak:
        if not args.pid:
            parser.error("--soak needs --pid, the gateway's process id")
        results["soak"] = await soak(args)
        print(json.dumps({k: v for k, v in results["soak"].items() if k != "samples_kib"}))
    elif args.references:
        results["references"] = await references(args)
    else:
        chat_url = f"{args.url}/v1/chat/completions"
        warm = [chat_body([{"role": "user", "content": content_parts(i)}], args.max_tokens)
                for i in mixed(2 * len(MIX), SEEDS["warmup"])]
        if errors := [r.error for r in (await run_level(warm, chat_url, len(MIX)))[0] if r.error]:
            raise SystemExit(f"warm-up failed: {errors[0]}")

        levels = {}
        for n, c in enumerate(args.concurrency):
            levels[c] = mixed(max(args.requests, 3 * c), SEEDS["sweep"] + 10_000 * n, args.mix)
        results["gateway"] = []
        async with httpx.AsyncClient() as client:
            for c, items in levels.items():
                bodies = [chat_body([{"role": "user", "content": content_parts(i)}], args.max_tokens) for i in items]
                before = await scrape(client, args.url)
                summary = summarize(*await run_level(bodies, chat_url, c), c)
                after = await scrape(client, args.url)
                summary["mean_encoder_batch"] = mean_encoder_batch(before, after)
                results["gateway"].append(summary)
                print(line("gateway", summary), f"encoder batch {summary['mean_encoder_batch']}", flush=True)

        model = load_model(args.model) if args.baseline or args.direct else None
        if args.direct:
            served = await served_model(args.direct)
            results["direct"] = []
            for c, items in levels.items():
                bodies = [completions_body(prompt_embeddings(model, i), served, args.max_tokens, f"direct-{c}")
                          for i in items]
                results["direct"].append(summarize(*await run_level(bodies, f"{args.direct}/v1/completions", c), c))
                print(line("direct", results["direct"][-1]), flush=True)
            results["overhead"] = await overhead(args, model)
            print("overhead (ms, p50/p95):", {k: v for k, v in results["overhead"].items() if k != "requests"}, flush=True)
            results["vllm_prefix_cache"] = await vllm_prefix_cache(args, model)
            print("vLLM prefix cache:", results["vllm_prefix_cache"], flush=True)
        if args.turns:
            results["turns"] = await turns(args)
            print("turns:", {k: v for k, v in results["turns"].items() if k != "chats"}, flush=True)
        if args.baseline:
            largest = max(levels)
            results["baseline"] = summarize(*await baseline(model, levels[largest], args.max_tokens), None)
            results["baseline"]["same_requests_as_concurrency"] = largest
            print(line("baseline", results["baseline"]), flush=True)
            top = next(s for s in results["gateway"] if s["concurrency"] == largest)
            results["speedup_at_largest_concurrency"] = round(top["requests_per_s"] / results["baseline"]["requests_per_s"], 2)
            print(f"gateway at c={largest} / baseline: {results['speedup_at_largest_concurrency']}x requests/s")
        if args.chats:
            results["chats"] = await chats(args, model)
    results["load_average_end"] = os.getloadavg()
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    if args.chart and "gateway" in results:
        chart(results, args.chart)


if __name__ == "__main__":
    asyncio.run(main())
