"""A request that ends early (its client left, its deadline passed, one of its attachments was
refused) takes its work with it: what it queued for the decoders never runs and nothing reaches
the encoder. In process, with the real ChatService on the tiny model, as ChatGuard cancels the
task serving a request; and over a real gateway."""

import asyncio
import io
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

import inputs_files as files
import media
from gateways import PROJECT_KEYS
from server.metrics import Metrics
from server.config import Settings
from server.core.service import chat_service_for
from server.core.chat import Attachment, Chat, Turn
from server.engines.local import LocalEngine
from server.model.onellm import load_model


def video(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    return files.video_bytes([rng.integers(0, 256, (240, 320, 3), dtype=np.uint8) for _ in range(10)])


def total(metrics: Metrics, name: str) -> float:
    return sum(s.value for family in metrics.registry.collect() for s in family.samples if s.name == name)


def queued(pool: ThreadPoolExecutor) -> int:
    """How many jobs wait in `pool` for a worker."""
    return pool._work_queue.qsize()


async def until(condition) -> None:
    async with asyncio.timeout(60):
        while not condition():
            await asyncio.sleep(0.01)  # polling the state, not waiting it out


def test_a_cancelled_request_runs_none_of_its_queued_decoding_and_nothing_in_the_encoder(tiny_model):
    model = load_model(tiny_model)
    metrics = Metrics()
    service = chat_service_for(Settings(preprocess_workers=1, prefix_cache_mb=0, default_max_tokens=8), model,
                               LocalEngine(tiny_model / "llm"), metrics)
    videos = [Attachment("video", {"video": video(seed)}) for seed in range(3)]
    chat = Chat([Turn("user", "What happens?", videos)])
    pool = service.workers.decoding

    async def cancel_while_decodes_are_queued():
        # the one decoding worker is held twice: while the videos' hashes queue behind it, then,
        # once they have run, while the videos' decodes queue behind it
        hashes_wait, decodes_wait = threading.Event(), threading.Event()
        pool.submit(hashes_wait.wait)
        request = asyncio.ensure_future(service.prepare(chat, None))
        await until(lambda: queued(pool) == len(videos))
        holding_decodes = pool.submit(decodes_wait.wait)
        hashes_wait.set()
        await until(lambda: holding_decodes.running() and queued(pool) == len(videos))
        request.cancel()
        await asyncio.gather(request, return_exceptions=True)
        assert request.cancelled()
        decodes_wait.set()
        # one worker, first in first out: once this has run, so has all that was still queued
        await asyncio.get_running_loop().run_in_executor(pool, lambda: None)

    asyncio.run(cancel_while_decodes_are_queued())
    assert total(metrics, "onellm_preprocess_seconds_count") == 0, "queued decoding ran for a cancelled request"
    assert service.workers.batcher.batch_sizes == []
    assert total(metrics, "onellm_encoder_runs_total") == 0
    service.close()


def slow_mesh(vertices: int = 300_000) -> bytes:
    """A 24 MB OBJ triangle soup that the decoder takes seconds to parse (~2.5 s on a busy 2-core machine)."""
    rng = np.random.default_rng(2502)
    out = io.BytesIO()
    np.savetxt(out, rng.random((vertices, 3)), fmt="v %.6f %.6f %.6f")
    np.savetxt(out, rng.integers(1, vertices + 1, (2 * vertices, 3)), fmt="f %d %d %d")
    return out.getvalue()


def metric(gateway, headers: dict, name: str, **labels) -> float:
    text = httpx.get(f"{gateway.url}/metrics", headers=headers, timeout=30).text
    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
               if s.name == name and labels.items() <= s.labels.items())


def test_a_request_whose_other_attachment_is_refused_stops_the_slow_ones_decode_and_encoder_run(projects):
    """Over a real gateway with two decoding workers: a new mesh (seconds to decode) and a file that
    is no image, in one request. The 4xx comes while the mesh decodes; after it, the mesh never
    reaches the encoder, and the decoding pool serves the next request."""
    headers = {"Authorization": f"Bearer {PROJECT_KEYS['old']}"}
    decodes, encodes = (metric(projects, headers, name, modality="point")
                        for name in ("onellm_preprocess_seconds_count", "onellm_encoder_runs_total"))
    refused = httpx.post(f"{projects.url}/v1/chat", headers=headers, timeout=120,
                         files=[("point", ("mesh.obj", slow_mesh())), ("image", ("a.png", b"no image at all"))],
                         data={"prompt": "What is it?", "max_tokens": "2"})
    assert 400 <= refused.status_code < 500 and refused.json()["error"]["param"] == "image", refused.text
    assert metric(projects, headers, "onellm_preprocess_seconds_count", modality="point") == decodes, \
        "the mesh was decoded before the refusal: nothing left to stop"
    deadline = time.monotonic() + 120
    while metric(projects, headers, "onellm_preprocess_seconds_count", modality="point") == decodes:
        assert time.monotonic() < deadline, "the mesh's decode never ended"
        time.sleep(0.05)  # polling the state, not waiting it out
    following = httpx.post(f"{projects.url}/v1/chat", headers=headers, timeout=120,
                           files=[("image", ("b.png", media.image("png", seed=2503)))],
                           data={"prompt": "What is it?", "max_tokens": "2"})
    assert following.status_code == 200, following.text
    assert metric(projects, headers, "onellm_encoder_runs_total", modality="point") == encodes


def long_imu_csv(rows: int = 1_000_000) -> bytes:
    """A million rows of accelerometer and gyroscope readings: about a second of parsing."""
    out = io.BytesIO()
    np.savetxt(out, np.random.default_rng(2504).random((rows, 6)), fmt="%.2f", delimiter=",")
    return out.getvalue()


def test_a_client_that_leaves_mid_decode_stops_the_decode_itself(projects):
    """The decode already running in a pool thread, not only the work queued after it: it stops at
    its next check (counted in onellm_decodes_cancelled_total), and nothing reaches the encoder."""
    headers = {"Authorization": f"Bearer {PROJECT_KEYS['old']}"}
    cancelled, encodes = (metric(projects, headers, name, modality="imu")
                          for name in ("onellm_decodes_cancelled_total", "onellm_encoder_runs_total"))
    boundary = "leaving-client"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\nHow do I move?\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"imu\"; filename=\"walk.csv\"\r\n"
            f"Content-Type: text/csv\r\n\r\n").encode() + long_imu_csv() + f"\r\n--{boundary}--\r\n".encode()
    with socket.create_connection(("127.0.0.1", projects.port)) as client:
        client.sendall(f"POST /v1/chat HTTP/1.1\r\nHost: gateway\r\nAuthorization: {headers['Authorization']}\r\n"
                       f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
                       f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        deadline = time.monotonic() + 120
        while metric(projects, headers, "onellm_decodes_running") == 0:
            assert time.monotonic() < deadline, "the CSV's decode never started"
            time.sleep(0.01)
    deadline = time.monotonic() + 120
    while metric(projects, headers, "onellm_decodes_cancelled_total", modality="imu") == cancelled:
        assert time.monotonic() < deadline, "the running decode was not stopped"
        time.sleep(0.05)
    assert metric(projects, headers, "onellm_decodes_running") == 0
    assert metric(projects, headers, "onellm_encoder_runs_total", modality="imu") == encodes
