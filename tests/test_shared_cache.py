"""The prefix cache that gateways share through a real redis-server: two gateway apps in this process
(each with its own model, engine, local cache and metrics) and one Redis; Redis stopped, paused and
fed values no gateway wrote."""

import asyncio
import logging
import threading
import time

import pytest
import torch
from fastapi.testclient import TestClient

import media
from server.entrypoints.app import create_app
from server.metrics import Metrics
from server.config import Settings
import server.cache.shared_prefixes
from server.cache.redis_client import SharedRedis
from server.cache.shared_prefixes import SharedPrefixCache, tensor_bytes

PREFIX_KEYS = "onellm:prefix:*"


@pytest.fixture(scope="module")
def gateways(tiny_model, redis_server):
    settings = Settings(model=str(tiny_model), cache_url=redis_server.url, preprocess_workers=1)
    with TestClient(create_app(settings)) as a, TestClient(create_app(settings)) as b:
        yield a, b


def sample_of(metrics: Metrics, name: str, **labels) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def sample(client: TestClient, name: str, **labels) -> float:
    return sample_of(client.app.state.metrics, name, **labels)


def redis_errors(client: TestClient) -> float:
    """Failed Redis operations, whichever: a chat's first one is its quota check, then prefix reads."""
    return sum(s.value for family in client.app.state.metrics.registry.collect() for s in family.samples
               if s.name == "onellm_shared_cache_errors_total")


def encoder_runs(client: TestClient) -> float:
    return sample(client, "onellm_encoder_runs_total", modality="image")


def ask(client: TestClient, picture: bytes) -> dict:
    response = client.post("/v1/chat", files=[("image", ("a.png", picture, "image/png"))],
                           data={"prompt": "What is in the picture?", "max_tokens": "4", "stream": "false"})
    assert response.status_code == 200, response.text
    return response.json()


def until(condition, within: float = 15) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, "the condition did not come true in time"
        time.sleep(0.05)


def test_prefixes_of_every_served_dtype_come_back_from_redis_as_they_went_in(redis_server):
    async def round_trip(dtype: torch.dtype) -> torch.Tensor | None:
        metrics = Metrics()
        redis = SharedRedis(redis_server.url, 1.0, metrics)
        await redis.start()
        cache = SharedPrefixCache(redis, f"test:round-trip:{dtype}:", (30, 64), dtype, 60, metrics)
        await cache.put("k", prefix.to(dtype))
        back = await cache.get("k", "image")
        await redis.close()
        assert sample_of(metrics, "onellm_shared_cache_hits_total", modality="image") == 1
        return back

    prefix = torch.randn(30, 64)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        back = asyncio.run(round_trip(dtype))
        assert back.dtype == dtype and back.shape == (30, 64)
        assert torch.equal(back, prefix.to(dtype))


def test_prefixes_become_bytes_and_back_off_the_event_loop(redis_server, monkeypatch):
    # on a GPU the copy to the CPU waits for the device: every token stream would stall meanwhile
    threads = {}

    def recording(name):
        convert = getattr(server.cache.shared_prefixes, name)

        def run(*args):
            threads[name] = threading.get_ident()
            return convert(*args)
        monkeypatch.setattr(server.cache.shared_prefixes, name, run)
    recording("tensor_bytes")
    recording("tensor_from_bytes")

    async def round_trip() -> int:
        metrics = Metrics()
        redis = SharedRedis(redis_server.url, 1.0, metrics)
        await redis.start()
        cache = SharedPrefixCache(redis, "test:threads:", (30, 64), torch.float32, 60, metrics)
        await cache.put("k", torch.ones(30, 64))
        assert torch.equal(await cache.get("k", "image"), torch.ones(30, 64))
        await redis.close()
        return threading.get_ident()

    loop_thread = asyncio.run(round_trip())
    assert set(threads) == {"tensor_bytes", "tensor_from_bytes"}
    assert loop_thread not in threads.values()


@pytest.mark.parametrize("value", [
    b"", b"OLP1", b"not a prefix at all",
    tensor_bytes(torch.zeros(30, 64))[:-1],  # one byte short
    tensor_bytes(torch.zeros(30, 64)) + b"\0",  # one byte more
    tensor_bytes(torch.zeros(29, 64)),  # another shape
    tensor_bytes(torch.zeros(30, 64, dtype=torch.float16)),  # another dtype
    tensor_bytes(torch.full((30, 64), float("nan"))),
], ids=["empty", "header-only", "text", "short", "long", "shape", "dtype", "nan"])
def test_a_value_that_is_not_a_prefix_of_this_model_is_a_miss(redis_server, value):
    async def read() -> torch.Tensor | None:
        metrics = Metrics()
        redis = SharedRedis(redis_server.url, 1.0, metrics)
        await redis.start()
        cache = SharedPrefixCache(redis, "test:bad:", (30, 64), torch.float32, 60, metrics)
        back = await cache.get("k", "image")
        await redis.close()
        assert sample_of(metrics, "onellm_shared_cache_errors_total", operation="invalid_value") == 1
        assert sample_of(metrics, "onellm_shared_cache_hits_total", modality="image") == 0
        return back

    with redis_server.client() as client:
        client.set("test:bad:k", value)
    assert asyncio.run(read()) is None


def test_a_file_encoded_by_one_gateway_is_served_by_the_other_without_its_encoder(gateways):
    a, b = gateways
    picture = media.image("png", seed=1501)
    runs_a, runs_b = encoder_runs(a), encoder_runs(b)
    first = ask(a, picture)
    assert encoder_runs(a) == runs_a + 1
    hits_b = sample(b, "onellm_shared_cache_hits_total", modality="image")
    second = ask(b, picture)
    assert encoder_runs(b) == runs_b  # no decode and no encoder run on B
    assert sample(b, "onellm_shared_cache_hits_total", modality="image") == hits_b + 1
    # the same prefix and prompt, greedy: the same answer
    assert second["choices"][0]["message"]["content"] == first["choices"][0]["message"]["content"]
    assert second["usage"]["prompt_tokens"] == first["usage"]["prompt_tokens"]
    ask(b, picture)  # the next turn on B: from B's local cache, Redis is not asked
    assert sample(b, "onellm_shared_cache_hits_total", modality="image") == hits_b + 1
    assert sample(b, "onellm_prefix_cache_hits_total", modality="image") >= 1


def test_a_corrupt_value_in_redis_is_encoded_again_and_replaced(gateways, redis_server):
    a, b = gateways
    picture = media.image("png", seed=1502)
    with redis_server.client() as client:
        before = set(client.keys(PREFIX_KEYS))
        ask(a, picture)
        (key,) = set(client.keys(PREFIX_KEYS)) - before
        client.set(key, b"\x00" * 100)
        runs_b = encoder_runs(b)
        ask(b, picture)
        assert encoder_runs(b) == runs_b + 1
        assert sample(b, "onellm_shared_cache_errors_total", operation="invalid_value") >= 1
        assert client.get(key) != b"\x00" * 100  # B wrote the prefix it made
        assert client.ttl(key) > 0


def test_gateways_serve_while_redis_is_down_and_share_again_once_it_is_back(gateways, redis_server, caplog):
    a, b = gateways
    caplog.set_level(logging.WARNING, logger="onellm.shared_cache")
    errors = redis_errors(a)
    redis_server.stop()
    try:
        for seed in (1503, 1504):  # neither request fails, and only the first finds out
            ask(a, media.image("png", seed=seed))
        assert sample(a, "onellm_shared_cache_up") == 0
        assert redis_errors(a) == errors + 1
        warnings = [r for r in caplog.records if r.name == "onellm.shared_cache" and r.levelno == logging.WARNING]
        assert len(warnings) == 1, [r.getMessage() for r in warnings]
    finally:
        redis_server.start()
    until(lambda: sample(a, "onellm_shared_cache_up") == 1)
    picture = media.image("png", seed=1505)
    ask(a, picture)
    until(lambda: sample(b, "onellm_shared_cache_up") == 1)
    runs_b = encoder_runs(b)
    ask(b, picture)
    assert encoder_runs(b) == runs_b


def test_a_redis_slower_than_the_timeout_is_left_out_and_used_again_when_it_answers(gateways, redis_server):
    a, _ = gateways
    errors = redis_errors(a)
    runs = encoder_runs(a)
    with redis_server.client() as client:
        client.execute_command("CLIENT", "PAUSE", 10_000, "ALL")  # Redis accepts, and answers nothing for 10 s
    ask(a, media.image("png", seed=1506))
    assert encoder_runs(a) == runs + 1
    assert redis_errors(a) == errors + 1
    assert sample(a, "onellm_shared_cache_up") == 0
    until(lambda: sample(a, "onellm_shared_cache_up") == 1, within=30)


def test_the_cache_settings_come_from_the_environment():
    settings = Settings.from_env({"ONELLM_CACHE_URL": "redis://cache:6380/2", "ONELLM_CACHE_TIMEOUT_MS": "50",
                                  "ONELLM_CACHE_TTL_S": "600"})
    assert (settings.cache_url, settings.cache_timeout_ms, settings.cache_ttl_s) == ("redis://cache:6380/2", 50.0, 600)


def test_a_gateway_whose_redis_is_down_at_start_up_serves_from_its_own_cache(tiny_model):
    from gateway_process import free_port

    settings = Settings(model=str(tiny_model), cache_url=f"redis://127.0.0.1:{free_port()}/0", preprocess_workers=1)
    with TestClient(create_app(settings)) as client:  # nothing listens there
        assert sample(client, "onellm_shared_cache_up") == 0
        picture = media.image("png", seed=1507)
        ask(client, picture)
        ask(client, picture)
        assert encoder_runs(client) == 1
        assert sample(client, "onellm_prefix_cache_hits_total", modality="image") == 1
        assert client.get("/ready").status_code == 200
