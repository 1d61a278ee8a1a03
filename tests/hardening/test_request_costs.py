"""What the worst requests cost a real gateway, measured as the peak resident memory they add to
its process (tests/peak_memory.py), against a gateway whose memory budget is small enough that a
cost growing with what the client sends would show.

The files are made here, small on the wire and large when decoded: a FLAC of 8-channel 192 kHz
silence, a file named by more ids than a chat may carry, downloads that stop reading."""

import asyncio
import io
import socket

import httpx
import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from gateway_process import GatewayProcess, flags
from inputs_files import silence_flac
from peak_memory import peak_bytes, peak_growth, reset_peak

MiB = 1 << 20
BUDGET_MB = 512
# what one audio request may add: the decoded span (10.3 s at 192 kHz in float) and the resampler's
# work, not the file's 8 channels x 120 s
AUDIO_BOUND = 64 * MiB


@pytest.fixture(scope="module")
def budgeted(tiny_model, tmp_path_factory):
    server = GatewayProcess(tiny_model, tmp_path_factory.mktemp("budgeted"), flags({
        "memory_budget_mb": BUDGET_MB, "max_file_bytes": 8 * MiB, "body_idle_timeout_s": 3})).start()
    yield server
    assert server.stop() == 0, server.log()[-3000:]
    assert "Traceback" not in server.log(), server.log()[-5000:]


@pytest.fixture(scope="module")
def silent_flac() -> bytes:
    """120 s of 8-channel 192 kHz silence: 180 M samples, about 200 kB of FLAC."""
    return silence_flac(120)


def variant(flac: bytes, seed: int) -> bytes:
    """Other bytes, the same audio (STREAMINFO's MD5 of the samples, which decoders do not check),
    so that no cache or shared run answers for another request."""
    return flac[:26] + np.random.default_rng(seed).bytes(16) + flac[42:]


def small_png() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def audio_question(flac: bytes) -> dict:
    return {"files": {"audio": ("silence.flac", flac)},
            "data": {"prompt": "What can you hear?", "max_tokens": "2", "stream": "false"}}


def test_a_long_many_channel_audio_file_costs_the_span_the_model_reads(budgeted, silent_flac):
    with httpx.Client(base_url=budgeted.url, timeout=300) as client:
        assert client.post("/v1/chat", **audio_question(variant(silent_flac, 0))).status_code == 200  # codecs loaded
        with peak_growth(budgeted.pid) as growth:
            response = client.post("/v1/chat", **audio_question(variant(silent_flac, 1)))
    assert response.status_code == 200, response.text
    assert growth.added <= AUDIO_BOUND, f"{growth.added / MiB:.0f} MiB"


def _stalled_downloads(port: int, file_id: str, count: int) -> list[socket.socket]:
    readers = []
    for _ in range(count):
        reader = socket.create_connection(("127.0.0.1", port))
        reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        reader.sendall(f"GET /v1/files/{file_id}/content HTTP/1.1\r\nHost: gateway\r\n\r\n".encode())
        assert reader.recv(65536).startswith(b"HTTP/1.1 200")
        readers.append(reader)
    return readers


def test_the_worst_requests_at_once_stay_within_the_budget_while_others_are_answered(budgeted, silent_flac):
    """Two long audio files, a chat naming one stored file 40 times, and ten downloads that stop
    reading, all at once, while another client asks small image questions."""
    wav = io.BytesIO()
    sf.write(wav, np.random.default_rng(2).integers(-9000, 9000, 3 * MiB, dtype=np.int16), 16000, format="WAV")
    with httpx.Client(base_url=budgeted.url, timeout=300) as client:
        file_id = client.post("/v1/files", files={"file": ("noise.wav", wav.getvalue())},
                              data={"purpose": "user_data"}).json()["id"]
    many_ids = {"max_tokens": 2, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "What are these?"}, *[{"type": "file", "file": {"file_id": file_id}}] * 40]}]}

    async def at_once() -> tuple[list[int], list[int]]:
        async with httpx.AsyncClient(base_url=budgeted.url, timeout=300) as client:
            done = asyncio.Event()

            async def others() -> list[int]:
                statuses = []
                while not done.is_set() or not statuses:
                    statuses.append((await client.post("/v1/chat", files={"image": ("a.png", small_png())}, data={
                        "prompt": "What is this?", "max_tokens": "2", "stream": "false"})).status_code)
                return statuses

            answered = asyncio.create_task(others())
            readers = await asyncio.to_thread(_stalled_downloads, budgeted.port, file_id, 10)
            worst = await asyncio.gather(
                client.post("/v1/chat", **audio_question(variant(silent_flac, 2))),
                client.post("/v1/chat", **audio_question(variant(silent_flac, 3))),
                client.post("/v1/chat/completions", json=many_ids))
            for reader in readers:
                reader.close()
            done.set()
            return [r.status_code for r in worst], await answered

    start = reset_peak(budgeted.pid)
    worst, others = asyncio.run(at_once())
    added = peak_bytes(budgeted.pid) - start
    assert worst == [200, 200, 400], worst
    assert others and set(others) == {200}, others
    assert added <= BUDGET_MB * MiB, f"{added / MiB:.0f} MiB"
