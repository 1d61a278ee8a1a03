"""Each vLLM's own load, read from its /metrics over real HTTP (stand-in vLLMs on loopback whose
/metrics say what the test sets, in vLLM's metric names), and what the gateway's routing does
with it: the parse, a failed or oversized read, a report going stale, and chats moving off a
replica that queues and back when it no longer does."""

import asyncio
import math

import httpx
import pytest
import torch

from server.engines.base import Sampling
from server.engines.replica_load import LoadScraper, ScrapeFailed, parse_load, read_load
from server.engines.replicas import ReplicatedVLLMEngine
from server.engines.routing import ReplicaLoad, Router
from server.metrics import Metrics
from vllm_standin import RECORDED_DELTAS, StandInVLLM, vllm_metrics


@pytest.fixture
def standins():
    servers = [StandInVLLM() for _ in range(2)]
    yield servers
    for server in servers:
        server.stop()


def reported(metrics: Metrics, server: StandInVLLM) -> dict[str, float]:
    return {measure: metrics.registry.get_sample_value("onellm_vllm_backend_reported_load",
                                                       {"backend": server.url, "measure": measure})
            for measure in ("waiting", "running", "kv_cache_usage")}


def test_the_load_of_a_data_parallel_server_is_its_engines_summed_and_its_fullest_kv_cache():
    text = vllm_metrics(waiting=4, running=6, kv_usage=0.3, engines=2)
    text = text.replace('kv_cache_usage_perc{engine="1",model_name="/models/tiny/llm"} 0.3',
                        'kv_cache_usage_perc{engine="1",model_name="/models/tiny/llm"} 0.7')
    assert parse_load(text) == ReplicaLoad(waiting=4, running=6, kv_usage=0.7)


def test_the_kv_usage_gauge_of_older_vllms_is_read_too():
    text = vllm_metrics(waiting=1, running=2, kv_usage=0.5).replace("kv_cache_usage_perc", "gpu_cache_usage_perc")
    assert parse_load(text) == ReplicaLoad(waiting=1, running=2, kv_usage=0.5)


@pytest.mark.parametrize("text", [
    vllm_metrics().replace("vllm:num_requests_waiting", "vllm:other"),  # a gauge missing
    vllm_metrics(waiting=-1),
    vllm_metrics(running=float("nan")),
    "vllm:num_requests_waiting{ 3\n",  # not the text format
])
def test_metrics_without_a_usable_load_are_a_failed_read(text):
    with pytest.raises(ScrapeFailed):
        parse_load(text)


def test_a_read_is_bounded_in_size(standins):
    server = standins[0]
    server.metrics = vllm_metrics() + "# padding\n" * 2000

    async def run():
        async with httpx.AsyncClient() as client:
            assert (await read_load(client, server.url)).running == 0
            with pytest.raises(ScrapeFailed, match="larger than"):
                await read_load(client, server.url, max_bytes=4096)

    asyncio.run(run())


def test_a_failed_read_keeps_the_last_report_for_a_while_then_the_load_is_unknown(standins):
    server = standins[0]
    router = Router([server.url])
    metrics = Metrics()
    scraper = LoadScraper([server.url], router, metrics, interval_s=0.05, stale_after_s=0.3)
    router.started(server.url)

    async def run():
        assert math.isnan(reported(metrics, server)["waiting"])  # nothing read yet
        server.metrics = vllm_metrics(waiting=2, running=5, kv_usage=0.25)
        await scraper.scrape(server.url)
        assert router.load(server.url) == 7
        assert reported(metrics, server) == {"waiting": 2, "running": 5, "kv_cache_usage": 0.25}
        server.metrics = None  # the replica answers 500
        await scraper.scrape(server.url)
        assert router.load(server.url) == 7  # kept: one failure is not enough to forget
        server.stop()  # then nothing listens
        await asyncio.sleep(0.35)
        await scraper.scrape(server.url)
        assert router.load(server.url) == router.in_flight(server.url) == 1  # the gateway's own count
        assert math.isnan(reported(metrics, server)["running"])
        assert metrics.registry.get_sample_value("onellm_vllm_backend_load_scrape_failures_total",
                                                 {"backend": server.url}) == 2
        await scraper.close()

    asyncio.run(run())


def test_chats_leave_a_queueing_replica_and_come_back_when_its_queue_is_gone(standins):
    urls = [s.url for s in standins]
    chat = next(f"chat-{i}" for i in range(1000) if Router(urls).pick(f"chat-{i}") == urls[0])
    engine = ReplicatedVLLMEngine(urls, Metrics(), probe_interval_s=3600.0, load_interval_s=0.05)

    async def served_by(load: ReplicaLoad) -> list[int]:
        standins[0].metrics = vllm_metrics(load.waiting, load.running, load.kv_usage)
        # the background read has taken the new figures in
        while reported(engine.metrics, standins[0])["waiting"] != load.waiting:
            await asyncio.sleep(0.02)
        before = [len(s.posted) for s in standins]
        for _ in range(3):
            deltas = [d async for d in engine.stream(torch.zeros(3, 8), Sampling(), None, chat)]
            assert deltas == RECORDED_DELTAS
        return [len(s.posted) - b for s, b in zip(standins, before)]

    async def run():
        await engine.start()
        assert await engine.ready()
        try:
            assert await asyncio.wait_for(served_by(ReplicaLoad(0, 1, 0.1)), 20) == [3, 0]
            assert await asyncio.wait_for(served_by(ReplicaLoad(5, 8, 0.6)), 20) == [0, 3]
            assert await asyncio.wait_for(served_by(ReplicaLoad(0, 2, 0.6)), 20) == [3, 0]
        finally:
            await engine.close()

    asyncio.run(run())
