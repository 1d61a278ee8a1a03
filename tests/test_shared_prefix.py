"""Requests that bring the same file at the same time share one decode and one encoder run; a
request that leaves does not take that run from the others, and the run stops once all have left.
In process, with the real ChatService on the tiny model; the one decoding worker is held with
events, so each step happens in a known order."""

import asyncio
import threading
import time

import numpy as np
import pytest
import torch

import inputs_files as files
from server.metrics import Metrics
from server.cache.prefix_cache import PrefixCache
from server.config import Settings
from server.core.service import ChatService, chat_service_for
from server.core.chat import Attachment, Chat, Turn
from server.engines.local import LocalEngine
from server.engines.priority import BATCH, LiveTraffic, request_priority
from server.errors import InputError
from server.model.onellm import load_model


def video(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    return files.video_bytes([rng.integers(0, 256, (48, 64, 3), dtype=np.uint8) for _ in range(4)])


def count(service: ChatService, name: str) -> float:
    """A video series of the service's metrics (0 before its first use)."""
    return service.metrics.registry.get_sample_value(name, {"modality": "video"}) or 0.0


def chat(data: bytes, params: dict | None = None) -> Chat:
    return Chat([Turn("user", "What happens?", [Attachment("video", {"video": data}, params=params or {})])])


@pytest.fixture(scope="module")
def loaded(tiny_model):
    """The model and its LLM, loaded once: nothing here changes them, and each test's service is new."""
    return load_model(tiny_model), LocalEngine(tiny_model / "llm")


@pytest.fixture
def service(loaded):
    model, engine = loaded
    # no cache: only a run in flight is shared
    settings = Settings(preprocess_workers=1, prefix_cache_mb=0, default_max_tokens=8)
    service = chat_service_for(settings, model, engine, Metrics())
    yield service
    service.close()


@pytest.fixture
def hold(service):
    """`hold()` keeps the one decoding worker busy until the event it returns is set; work queued
    after it waits."""
    releases = []

    def hold_worker() -> threading.Event:
        releases.append(threading.Event())
        service.workers.decoding.submit(releases[-1].wait)
        return releases[-1]

    yield hold_worker
    for release in releases:  # a failed test must not leave the worker held: the process would never exit
        release.set()


def queued(service: ChatService) -> int:
    """How many jobs wait for the decoding worker."""
    return service.workers.decoding._work_queue.qsize()


async def until(condition, within: float = 30) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, "the requests did not reach the expected step"
        await asyncio.sleep(0.01)


def test_requests_bringing_the_same_file_at_once_share_one_decode_and_one_encoder_run(service, hold):
    same, other = video(0), video(1)

    async def three_at_once():
        release = hold()
        requests = [asyncio.ensure_future(service.prepare(chat(data), None)) for data in (same, same, other)]
        await until(lambda: queued(service) == 3)  # each has queued its hash behind the held worker
        release.set()
        return await asyncio.gather(*requests)

    first, second, third = asyncio.run(three_at_once())
    assert count(service, "onellm_preprocess_seconds_count") == 2
    assert count(service, "onellm_encoder_runs_total") == 2
    assert count(service, "onellm_prefix_shared_runs_total") == 1
    assert torch.equal(first.embeddings, second.embeddings)
    assert not torch.equal(first.embeddings, third.embeddings)
    assert service.prefixes.runs.runs == {}


def test_an_online_request_does_not_wait_for_a_batch_lines_run_of_the_same_file(loaded):
    """A batch line's decoding and encoding wait while online requests are served: an online request
    waiting for the line's run would wait for itself, so it makes the prefix with a run of its own."""
    model, engine = loaded
    live = LiveTraffic()
    service = chat_service_for(Settings(preprocess_workers=1, prefix_cache_mb=0, default_max_tokens=8), model,
                               engine, Metrics(), live=live)
    data = video(5)

    async def line():
        request_priority.set(BATCH)
        return await service.prepare(chat(data), None)

    async def scenario():
        batch = asyncio.create_task(line())
        await until(lambda: service.prefixes.runs.runs)  # the line's run has started
        live.enter()  # an online request admitted, bringing the same file
        try:
            online = await asyncio.wait_for(service.prepare(chat(data), None), 30)
        finally:
            live.leave()
        return online, await batch

    try:
        online, batch = asyncio.run(scenario())
    finally:
        service.close()
    # one run each, batched alone or together: the same rows within float32's rounding
    torch.testing.assert_close(online.embeddings, batch.embeddings, atol=1e-6, rtol=1e-6)
    assert count(service, "onellm_encoder_runs_total") == 2


def test_a_request_that_leaves_does_not_take_the_shared_run_from_the_other(service, hold):
    data = video(2)

    async def one_leaves():
        release_hashes = hold()
        leaving, staying = (asyncio.ensure_future(service.prepare(chat(data), None)) for _ in range(2))
        await until(lambda: queued(service) == 2)
        release_decode = hold()  # queued after both hashes: the shared decode waits behind it
        release_hashes.set()
        await until(lambda: count(service, "onellm_prefix_shared_runs_total") == 1)
        leaving.cancel()
        await asyncio.gather(leaving, return_exceptions=True)
        # a run is forgotten as its last waiter leaves, before that waiter has finished leaving
        assert not staying.done() and len(service.prefixes.runs.runs) == 1
        release_decode.set()
        shared = await staying
        return leaving, shared, await service.prepare(chat(data), None)  # then alone: a run of its own

    leaving, shared, alone = asyncio.run(one_leaves())
    assert leaving.cancelled()
    assert torch.equal(shared.embeddings, alone.embeddings)
    assert count(service, "onellm_encoder_runs_total") == 2


def test_a_shared_run_stops_when_every_request_waiting_for_it_has_left(service, hold):
    data = video(3)

    async def all_leave_then_one_comes_back():
        release_hashes = hold()
        requests = [asyncio.ensure_future(service.prepare(chat(data), None)) for _ in range(2)]
        await until(lambda: queued(service) == 2)
        release_decode = hold()
        release_hashes.set()
        await until(lambda: count(service, "onellm_prefix_shared_runs_total") == 1)
        for request in requests:
            request.cancel()
        await asyncio.gather(*requests, return_exceptions=True)
        assert all(r.cancelled() for r in requests) and service.prefixes.runs.runs == {}
        release_decode.set()
        await service.off_loop(lambda: None)  # one worker, first in first out: what was queued has run
        assert count(service, "onellm_preprocess_seconds_count") == 0, "decoding ran for nobody"
        assert service.workers.batcher.batch_sizes == []
        return await service.prepare(chat(data), None)  # the same file again: a run of its own

    again = asyncio.run(all_leave_then_one_comes_back())
    assert again.prompt_tokens > 32
    assert count(service, "onellm_encoder_runs_total") == 1


def test_a_bad_file_shared_by_two_requests_is_each_ones_error_under_its_own_name(service, hold):
    broken = video(4)[: 600]
    where = "messages[0].content[1].video_url.url"

    async def both():
        release_hashes = hold()
        requests = [asyncio.ensure_future(service.prepare(chat(broken, params), None))
                    for params in ({}, {"video": where})]
        await until(lambda: queued(service) == 2)
        release_decode = hold()  # the decode fails fast: held until both requests wait for it
        release_hashes.set()
        await until(lambda: count(service, "onellm_prefix_shared_runs_total") == 1)
        release_decode.set()
        return await asyncio.gather(*requests, return_exceptions=True)

    multipart, openai = asyncio.run(both())
    assert isinstance(multipart, InputError) and isinstance(openai, InputError)
    assert multipart is not openai
    assert (multipart.status, multipart.param) == (422, "video")
    assert (openai.status, openai.param) == (422, where)
    assert count(service, "onellm_preprocess_seconds_count") == 1
    assert count(service, "onellm_prefix_shared_runs_total") == 1


def test_the_prefix_cache_counts_what_an_entry_keeps_alive():
    batch = torch.zeros(4, 30, 8)
    cache = PrefixCache(1 << 20)
    cache.put("view", batch[0])  # a view keeps the whole batch
    assert cache.size == batch.numel() * batch.element_size()
    cache.put("own", batch[1].clone())
    assert cache.size == 5 * 30 * 8 * batch.element_size()


@pytest.mark.parametrize("scope", ["tenant", "all"])
def test_requests_of_two_tenants_share_a_run_and_a_prefix_only_when_the_scope_is_all(loaded, scope):
    """A prefix made for one tenant answering another's request sooner would tell that tenant that
    someone sent the same file: by default each tenant's requests make their own (and the engine
    is given a salt of each tenant's), with `cache_scope=all` they share them."""
    model, engine = loaded
    service = chat_service_for(Settings(preprocess_workers=1, prefix_cache_mb=1, default_max_tokens=8,
                                        cache_scope=scope), model, engine, Metrics())
    data = video(6)
    release = threading.Event()

    async def two_tenants_at_once_then_again():
        service.workers.decoding.submit(release.wait)  # holds the one worker until both have queued
        requests = [asyncio.ensure_future(service.prepare(chat(data), None, tenant))
                    for tenant in ("key:a", "key:b")]
        await until(lambda: queued(service) == 2)
        release.set()
        return *await asyncio.gather(*requests), await service.prepare(chat(data), None, "key:b")

    try:
        a, b, b_again = asyncio.run(two_tenants_at_once_then_again())
    finally:
        release.set()
        service.close()
    assert torch.equal(a.embeddings, b.embeddings) and b_again.media == b.media
    shared = scope == "all"
    assert count(service, "onellm_encoder_runs_total") == (1 if shared else 2)
    assert count(service, "onellm_prefix_shared_runs_total") == (1 if shared else 0)
    assert count(service, "onellm_prefix_cache_hits_total") == 1  # b's second request, either way
    assert (a.media == b.media) == shared
    assert b_again.cache_salt == b.cache_salt and (a.cache_salt == b.cache_salt) == shared
    assert (a.cache_salt is None) == shared
