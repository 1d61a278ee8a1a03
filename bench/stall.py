"""How long other users' token streams stall while the gateway takes in a large upload (a benchmark).

    uv run onellm serve &                       # any gateway; the embedded engine is enough
    uv run python bench/stall.py --url http://127.0.0.1:8080

One client streams long answers and records the gap between consecutive SSE chunks; meanwhile
another sends `--uploads` requests each carrying `--mib` MiB of random bytes as an image, first
as a base64 data URL to /v1/chat/completions, then as a multipart file to /v1/chat. The bytes
are no image, so each request ends with a 415 once they are read and decoded: what is measured
is the work of taking the upload in (body, JSON, base64, hashing), not the encoder. Any work of
that kind done on the event loop shows up as a gap in the stream. Prints a markdown table.
"""

import argparse
import base64
import json
import multiprocessing
import os
import statistics
import threading
import time

import httpx

PROMPT = "Write a very long story about a cat."


class Streamer(threading.Thread):
    """Streams answers one after another until stopped; `gaps` are seconds between chunks of one answer."""

    def __init__(self, url: str, max_tokens: int):
        super().__init__(daemon=True)
        self.url, self.max_tokens = url, max_tokens
        self.gaps: list[float] = []
        self.recording = False
        self.stop = threading.Event()

    def run(self) -> None:
        with httpx.Client(timeout=120) as client:
            while not self.stop.is_set():
                last = None
                with client.stream("POST", f"{self.url}/v1/chat", data={
                        "prompt": PROMPT, "max_tokens": str(self.max_tokens), "seed": "0", "temperature": "1"}) as response:
                    response.raise_for_status()
                    for _ in response.iter_raw():
                        now = time.perf_counter()
                        if last is not None and self.recording:
                            self.gaps.append(now - last)
                        last = now
                        if self.stop.is_set():
                            break


def json_body(data: bytes) -> bytes:
    return json.dumps({"max_tokens": 1, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is it?"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{base64.b64encode(data).decode()}"}}]}]}).encode()


def send_uploads(url: str, kind: str, mib: float, uploads: int, results: multiprocessing.Queue) -> None:
    """In a process of its own, so that building and sending the bodies never holds the
    streamer's GIL: puts "ready", then (status, seconds) for each upload, then None."""
    data = os.urandom(int(mib * 2**20))
    body = json_body(data) if kind == "json" else data
    results.put("ready")
    with httpx.Client(timeout=120) as client:
        for _ in range(uploads):
            start = time.perf_counter()
            if kind == "json":
                response = client.post(f"{url}/v1/chat/completions", content=body,
                                       headers={"content-type": "application/json"})
            else:
                response = client.post(f"{url}/v1/chat", data={"prompt": "What is it?", "max_tokens": "1"},
                                       files={"image": ("big.png", body, "image/png")})
            results.put((response.status_code, time.perf_counter() - start))
    results.put(None)


def measure(streamer: Streamer, url: str, kind: str, mib: float, uploads: int) -> tuple[list[float], list[float], set[int]]:
    """Gaps recorded while `uploads` requests are sent one after another, their latencies and statuses."""
    spawn = multiprocessing.get_context("spawn")
    results = spawn.Queue()
    sender = spawn.Process(target=send_uploads, args=(url, kind, mib, uploads, results))
    sender.start()
    assert results.get(timeout=120) == "ready"
    streamer.gaps.clear()
    streamer.recording = True
    latencies, statuses = [], set()
    while (result := results.get(timeout=600)) is not None:
        statuses.add(result[0])
        latencies.append(result[1])
    streamer.recording = False
    sender.join()
    return list(streamer.gaps), latencies, statuses


def quiet(streamer: Streamer, seconds: float) -> list[float]:
    streamer.gaps.clear()
    streamer.recording = True
    time.sleep(seconds)
    streamer.recording = False
    return list(streamer.gaps)


def row(name: str, gaps: list[float], latencies: list[float] | None, statuses: set[int] | None) -> str:
    ms = sorted(g * 1e3 for g in gaps)
    p99 = ms[min(len(ms) - 1, int(0.99 * len(ms)))]
    upload = f"{statistics.median(latencies) * 1e3:.0f} | {sorted(statuses)}" if latencies else "- | -"
    return f"| {name} | {len(ms)} | {statistics.median(ms):.1f} | {p99:.1f} | {ms[-1]:.1f} | {upload} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8080")
    parser.add_argument("--mib", type=float, default=48, help="size of each upload's file")
    parser.add_argument("--uploads", type=int, default=5, help="uploads per endpoint, one after another")
    parser.add_argument("--max-tokens", type=int, default=1000, help="length of each streamed answer")
    args = parser.parse_args()

    streamer = Streamer(args.url, args.max_tokens)
    streamer.start()
    time.sleep(3)  # the first answer is streaming
    rows = [row("no upload", quiet(streamer, 5), None, None)]
    for name, kind in [("JSON data URL", "json"), ("multipart file", "multipart")]:
        rows.append(row(name, *measure(streamer, args.url, kind, args.mib, args.uploads)))
    streamer.stop.set()
    print(f"{args.uploads} uploads of {args.mib:g} MiB per endpoint, one after another, against {args.url}\n")
    print("| while | chunks | gap p50 ms | gap p99 ms | gap max ms | upload p50 ms | statuses |")
    print("|---|---:|---:|---:|---:|---:|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
