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


def json_upload(client: httpx.Client, url: str, body: bytes) -> httpx.Response:
    return client.post(f"{url}/v1/chat/completions", content=body, headers={"content-type": "application/json"})


def multipart_upload(client: httpx.Client, url: str, data: bytes) -> httpx.Response:
    return client.post(f"{url}/v1/chat", data={"prompt": "What is it?", "max_tokens": "1"},
                       files={"image": ("big.png", data, "image/png")})


def measure(streamer: Streamer, send, uploads: int) -> tuple[list[float], list[float], set[int]]:
    """Gaps recorded while `uploads` requests are sent one after another, their latencies and statuses."""
    streamer.gaps.clear()
    streamer.recording = True
    latencies, statuses = [], set()
    with httpx.Client(timeout=120) as client:
        for _ in range(uploads):
            start = time.perf_counter()
            statuses.add(send(client).status_code)
            latencies.append(time.perf_counter() - start)
    streamer.recording = False
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

    raw = os.urandom(int(args.mib * 2**20))
    body = json_body(raw)  # built before the streamer starts: this process's own work must not stall it
    streamer = Streamer(args.url, args.max_tokens)
    streamer.start()
    time.sleep(3)  # the first answer is streaming
    rows = [row("no upload", quiet(streamer, 5), None, None)]
    for name, send in [("JSON data URL", lambda c: json_upload(c, args.url, body)),
                       ("multipart file", lambda c: multipart_upload(c, args.url, raw))]:
        rows.append(row(name, *measure(streamer, send, args.uploads)))
    streamer.stop.set()
    print(f"{args.uploads} uploads of {args.mib:g} MiB per endpoint, one after another, against {args.url}\n")
    print("| while | chunks | gap p50 ms | gap p99 ms | gap max ms | upload p50 ms | statuses |")
    print("|---|---:|---:|---:|---:|---:|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
