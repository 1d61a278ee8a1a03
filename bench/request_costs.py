"""What single hostile requests cost a gateway in memory (a benchmark, not a test): the peak
resident memory each adds to an `onellm serve` process with its default settings.

    uv run python bench/request_costs.py --model model_repo/tiny

Starts its own gateway (tiny model, embedded engine, defaults), then, one row at a time, sets the
gateway's peak-RSS mark back to its current RSS (/proc/PID/clear_refs) and reads how far the mark
rose (VmHWM) while the request ran:

- audio: a FLAC of 590 s of 8-channel 192 kHz silence (under 1 MB);
- ids: one 8 MB WAV uploaded 60 times (stored once), then one chat naming the 60 file ids;
- downloads: 40 downloads of a 24 MB stored file that read 64 KiB and then stop reading;
- four audio: four of the audio requests at once, while a client asks small image questions.

`--flag NAME=VALUE` passes a flag to `onellm serve` (repeatable), to measure other settings.
"""

import argparse
import asyncio
import io
import socket
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import soundfile as sf
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from gateway_process import GatewayProcess  # noqa: E402
from inputs_files import silence_flac  # noqa: E402
from peak_memory import peak_bytes, reset_peak  # noqa: E402

MB = 1 << 20


def variant(flac: bytes, seed: int) -> bytes:
    """The same FLAC with other bytes, so that no cache knows it: STREAMINFO's MD5 of the audio
    (bytes 26-41), which decoders do not check."""
    return flac[:26] + np.random.default_rng(seed).bytes(16) + flac[42:]


def noise_wav(size: int, seed: int) -> bytes:
    samples = np.random.default_rng(seed).integers(-20000, 20000, size // 2, dtype=np.int16)
    buffer = io.BytesIO()
    sf.write(buffer, samples, 16000, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def small_png() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def measured(gateway: GatewayProcess, work) -> tuple[int, object]:
    """(bytes the gateway's peak RSS rose during `work()`, what `work()` returned)."""
    start = reset_peak(gateway.pid)
    result = work()
    return peak_bytes(gateway.pid) - start, result


def audio_row(client: httpx.Client, flac: bytes, seed: int) -> str:
    response = client.post("/v1/chat", files={"audio": ("silence.flac", variant(flac, seed))},
                           data={"prompt": "What can you hear?", "max_tokens": "4", "stream": "false"})
    return f"{response.status_code} {response.text[:90]}" if response.status_code != 200 else "200"


def ids_row(client: httpx.Client, wav: bytes) -> str:
    ids = [client.post("/v1/files", files={"file": ("a.wav", wav)}, data={"purpose": "user_data"}).json()["id"]
           for _ in range(60)]

    def chat() -> httpx.Response:
        parts = [{"type": "file", "file": {"file_id": i}} for i in ids]
        return client.post("/v1/chat/completions", json={"max_tokens": 4, "messages": [
            {"role": "user", "content": [{"type": "text", "text": "What are these?"}, *parts]}]})
    return chat


def stalled_downloads(gateway: GatewayProcess, file_id: str, count: int, hold_s: float) -> str:
    sockets = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", gateway.port))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        sock.sendall(f"GET /v1/files/{file_id}/content HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        sockets.append(sock)
    statuses = []
    for sock in sockets:
        statuses.append(sock.recv(65536)[:12].decode(errors="replace"))
    time.sleep(hold_s)  # the gateway does whatever it does with readers that stopped
    for sock in sockets:
        sock.close()
    counts = Counter(status.split(" ")[1] if " " in status else "closed" for status in statuses)
    return ", ".join(f"{n} answered {status}" for status, n in sorted(counts.items()))


async def four_audio(url: str, flac: bytes, png: bytes) -> str:
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        async def hostile(seed: int) -> int:
            return (await client.post("/v1/chat", files={"audio": ("silence.flac", variant(flac, seed))},
                                      data={"prompt": "Hear?", "max_tokens": "4", "stream": "false"})).status_code

        async def normal(stop: asyncio.Event) -> list[int]:
            statuses = []
            while not stop.is_set():
                statuses.append((await client.post("/v1/chat", files={"image": ("a.png", png)}, data={
                    "prompt": "What is this?", "max_tokens": "4", "stream": "false"})).status_code)
            return statuses

        stop = asyncio.Event()
        normals = asyncio.create_task(normal(stop))
        hostiles = await asyncio.gather(*(hostile(seed) for seed in range(10, 14)))
        stop.set()
        answered = await normals
    return f"hostile {hostiles}; normal requests meanwhile: {len(answered)}, statuses {sorted(set(answered))}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="model_repo/tiny")
    parser.add_argument("--flag", action="append", default=[], help="NAME=VALUE passed to onellm serve")
    args = parser.parse_args()
    flags = [part for flag in args.flag for part in (f"--{flag.split('=', 1)[0]}", flag.split("=", 1)[1])]
    flac = silence_flac(590)
    with tempfile.TemporaryDirectory() as workdir:
        gateway = GatewayProcess(Path(args.model), Path(workdir), flags).start()
        try:
            with httpx.Client(base_url=gateway.url, timeout=600) as client:
                audio_row(client, flac, 0)  # the first request loads codecs: not counted
                rows = [("audio: 590 s 8-ch 192 kHz FLAC, %d kB" % (len(flac) // 1000),
                         *measured(gateway, lambda: audio_row(client, flac, 1)))]
                chat = ids_row(client, noise_wav(8 * MB, 1))
                added, response = measured(gateway, chat)
                rows.append(("ids: one 8 MB file x 60 ids in one chat", added,
                             f"{response.status_code} {response.json().get('error', {}).get('message', '')[:80]}"))
                big = client.post("/v1/files", files={"file": ("b.wav", noise_wav(24 * MB, 2))},
                                  data={"purpose": "user_data"}).json()["id"]
                rows.append(("downloads: 40 stalled readers of a 24 MB file",
                             *measured(gateway, lambda: stalled_downloads(gateway, big, 40, 5.0))))
                rows.append(("four audio at once, small image questions meanwhile",
                             *measured(gateway, lambda: asyncio.run(four_audio(gateway.url, flac, small_png())))))
        finally:
            gateway.stop()
    print(f"{'request':55} {'peak RSS added':>15}  answer")
    for name, added, answer in rows:
        print(f"{name:55} {added / MB:12.0f} MB  {answer}")


if __name__ == "__main__":
    main()
