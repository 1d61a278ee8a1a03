"""A request that ends early (its client left, its deadline passed) takes its work with it:
what it queued for the decoders never runs and nothing reaches the encoder. In process, with
the real ChatService on the tiny model, as ChatGuard cancels the task serving a request."""

import asyncio
import threading

import numpy as np

import inputs_files as files
from server.api.metrics import Metrics
from server.api.serving import ChatService
from server.api.uploads import Attachment, Chat, Turn
from server.engines.local import LocalEngine
from server.model.repo import load_model


def video(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    return files.video_bytes([rng.integers(0, 256, (240, 320, 3), dtype=np.uint8) for _ in range(10)])


def total(metrics: Metrics, name: str) -> float:
    return sum(s.value for family in metrics.registry.collect() for s in family.samples if s.name == name)


def test_a_cancelled_request_runs_none_of_its_queued_decoding_and_nothing_in_the_encoder(tiny_model):
    model = load_model(tiny_model)
    metrics = Metrics()
    service = ChatService(model, LocalEngine(tiny_model / "llm"), metrics, preprocess_workers=1,
                          prefix_cache_bytes=0, default_max_tokens=8)
    videos = [Attachment("video", {"video": video(seed)}) for seed in range(3)]
    chat = Chat([Turn("user", "What happens?", videos)])

    async def cancel_while_queued():
        # the one decoding worker is held busy, so every video of the request waits in its queue
        release = threading.Event()
        service._preprocess.submit(release.wait)
        request = asyncio.ensure_future(service.prepare(chat, None))
        await asyncio.sleep(0.05)
        request.cancel()
        await asyncio.gather(request, return_exceptions=True)
        assert request.cancelled()
        release.set()
        await asyncio.sleep(0.05)

    asyncio.run(cancel_while_queued())
    service._preprocess.shutdown(wait=True)
    assert total(metrics, "onellm_preprocess_seconds_count") == 0, "queued decoding ran for a cancelled request"
    assert service.batcher.batch_sizes == []
    assert total(metrics, "onellm_encoder_runs_total") == 0
    service.close()
