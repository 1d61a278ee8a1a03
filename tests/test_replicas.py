"""The engine over several vLLMs, against stand-in vLLM servers on loopback ports: routing,
failover before the first text, no splicing after it, health from probes and failures. (A
prompt that vLLM rejects, which the real one does: tests/vllm/test_engine_live.py.)"""

import asyncio

import pytest
import torch

from server.metrics import Metrics
from server.config import Settings
from server.engines.base import EngineUnavailable, Sampling, Usage
from server.engines.replicas import ReplicatedVLLMEngine
from server.engines.routing import Router
from vllm_standin import (ANSWER, CUT_AFTER_TEXT, CUT_BEFORE_TEXT, FAIL, HOLD, RECORDED_DELTAS, RECORDED_IDS,
                          StandInVLLM)

SLOW_PROBE = 3600.0  # no background probe during the test: health changes only by what requests see


@pytest.fixture
def standins():
    servers = [StandInVLLM() for _ in range(3)]
    yield servers
    for server in servers:
        server.release.set()
        server.stop()


def engine_over(servers, probe_interval_s: float = SLOW_PROBE) -> ReplicatedVLLMEngine:
    return ReplicatedVLLMEngine([s.url for s in servers], Metrics(), probe_interval_s=probe_interval_s)


def chat_on(servers, server: StandInVLLM) -> str:
    """An affinity string whose first choice among `servers` is `server`."""
    router = Router([s.url for s in servers])
    return next(key for key in (f"chat-{i}" for i in range(1000)) if router.pick(key) == server.url)


async def answer(engine, affinity: str | None, usage: Usage | None = None) -> list[str]:
    return [delta async for delta in engine.stream(torch.zeros(3, 8), Sampling(), usage, affinity)]


def sample(engine: ReplicatedVLLMEngine, name: str, server: StandInVLLM | None = None) -> float | None:
    labels = {"backend": server.url} if server else {}
    return engine.metrics.registry.get_sample_value(name, labels)


async def until(condition, timeout: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "the condition did not come true in time"
        await asyncio.sleep(0.02)


def test_a_chat_stays_on_one_backend_and_chats_spread(standins):
    async def run():
        engine = engine_over(standins)
        homes = {}
        for chat in range(30):
            for _turn in range(3):
                before = [len(s.posted) for s in standins]
                assert await answer(engine, f"chat-{chat}") == RECORDED_DELTAS
                served = [i for i, s in enumerate(standins) if len(s.posted) > before[i]]
                assert homes.setdefault(chat, served) == served
        await engine.close()
        return homes

    homes = asyncio.run(run())
    assert all(len(served) == 1 for served in homes.values())
    assert {served[0] for served in homes.values()} == {0, 1, 2}


@pytest.mark.parametrize("fault", [FAIL, CUT_BEFORE_TEXT, "gone"])
def test_a_failure_before_any_text_is_retried_on_another_backend(standins, fault):
    first = standins[0]

    async def run():
        engine = engine_over(standins)
        assert await engine.ready()  # every backend answered its probe
        if fault == "gone":
            first.stop()
        else:
            first.completions = fault
        usage = Usage()
        deltas = await answer(engine, chat_on(standins, first), usage)
        await engine.close()
        return engine, deltas, usage

    engine, deltas, usage = asyncio.run(run())
    assert deltas == RECORDED_DELTAS
    # what the failed attempt recorded is forgotten: ids of one answer only
    assert usage.token_ids == RECORDED_IDS and usage.finish_reason == "length"
    assert sum(len(s.posted) for s in standins[1:]) == 1
    assert sample(engine, "onellm_vllm_retries_total") == 1
    assert sample(engine, "onellm_vllm_backend_failures_total", first) == 1
    assert sample(engine, "onellm_vllm_backend_healthy", first) == 0
    assert sample(engine, "onellm_vllm_backend_requests_total", first) == 1


def failing_answer(standins, mode: str, error_type: type[Exception]):
    """The answer of a chat whose first choice, standins[0], answers with `mode`:
    (the engine, the text received, the error it ended with)."""
    standins[0].completions = mode

    async def run():
        engine = engine_over(standins)
        received = []
        with pytest.raises(error_type) as error:
            async for delta in engine.stream(torch.zeros(3, 8), Sampling(), None, chat_on(standins, standins[0])):
                received.append(delta)
        await engine.close()
        return engine, received, error.value

    return asyncio.run(run())


def test_a_failure_after_text_ends_the_answer_and_is_not_spliced(standins):
    engine, received, _ = failing_answer(standins, CUT_AFTER_TEXT, EngineUnavailable)
    assert received == RECORDED_DELTAS[:1]
    assert [len(s.posted) for s in standins] == [1, 0, 0]
    assert sample(engine, "onellm_vllm_retries_total") == 0
    assert sample(engine, "onellm_vllm_backend_failures_total", standins[0]) == 1


def test_a_request_is_tried_on_two_backends_at_most(standins):
    for server in standins:
        server.completions = FAIL
    engine, _, error = failing_answer(standins, FAIL, EngineUnavailable)
    assert "(500)" in str(error)
    assert sum(len(s.posted) for s in standins) == 2
    assert sample(engine, "onellm_vllm_retries_total") == 1


def test_with_every_backend_gone_requests_fail_fast_and_recover_without_a_restart(standins):
    for server in standins:
        server.stop()

    async def run():
        engine = engine_over(standins)
        assert not await engine.ready()
        with pytest.raises(EngineUnavailable, match="none of the 3 vLLM backends"):
            await answer(engine, "chat-1")
        standins[1].start()  # the same port again
        # nothing is known to answer, so readiness and requests ask the backends at once
        assert await engine.ready()
        assert await answer(engine, "chat-1") == RECORDED_DELTAS
        await engine.close()
        return engine

    engine = asyncio.run(run())
    assert len(standins[1].posted) == 1
    assert [sample(engine, "onellm_vllm_backend_healthy", s) for s in standins] == [0, 1, 0]


def test_the_probe_brings_a_failed_backend_back(standins):
    first = standins[0]
    first.completions = FAIL

    async def run():
        engine = engine_over(standins, probe_interval_s=0.05)
        chat = chat_on(standins, first)
        assert await answer(engine, chat) == RECORDED_DELTAS  # served elsewhere, `first` marked down
        # its failure is counted; its health is not asserted here, as a probe 50 ms later may
        # already have brought it back on a loaded machine
        assert sample(engine, "onellm_vllm_backend_failures_total", first) == 1
        first.completions = ANSWER
        await until(lambda: engine.router.healthy(first.url))  # its /health never stopped answering
        assert await answer(engine, chat) == RECORDED_DELTAS
        await engine.close()

    asyncio.run(run())
    assert len(first.posted) == 2


def test_the_probe_takes_out_a_backend_that_reports_itself_unhealthy(standins):
    first = standins[0]

    async def run():
        engine = engine_over(standins, probe_interval_s=0.05)
        assert await engine.ready()
        first.healthy = False
        await until(lambda: sample(engine, "onellm_vllm_backend_healthy", first) == 0)
        assert await answer(engine, chat_on(standins, first)) == RECORDED_DELTAS
        assert await engine.ready()  # the other two still answer
        await engine.close()
        return engine

    engine = asyncio.run(run())
    assert first.posted == []
    assert sample(engine, "onellm_vllm_retries_total") == 0


def test_requests_in_flight_are_counted_until_they_end(standins):
    first = standins[0]
    first.completions = HOLD

    async def run():
        engine = engine_over(standins)
        chat = chat_on(standins, first)
        held = engine.stream(torch.zeros(3, 8), Sampling(), None, chat)
        assert await anext(held) == RECORDED_DELTAS[0]
        in_flight = (engine.router.in_flight(first.url), sample(engine, "onellm_vllm_backend_in_flight", first))
        first.release.set()
        rest = [delta async for delta in held]
        after = (engine.router.in_flight(first.url), sample(engine, "onellm_vllm_backend_in_flight", first))
        await engine.close()
        return in_flight, rest, after

    in_flight, rest, after = asyncio.run(run())
    assert in_flight == (1, 1)
    assert rest == RECORDED_DELTAS[1:]
    assert after == (0, 0)


def test_a_caller_leaving_mid_answer_frees_the_backend_without_a_failure(standins):
    first = standins[0]
    first.completions = HOLD

    async def run():
        engine = engine_over(standins)
        held = engine.stream(torch.zeros(3, 8), Sampling(), None, chat_on(standins, first))
        await anext(held)
        await held.aclose()
        state = engine.router.in_flight(first.url), engine.router.healthy(first.url)
        await engine.close()
        return engine, state

    engine, state = asyncio.run(run())
    assert state == (0, True)
    assert sample(engine, "onellm_vllm_backend_failures_total", first) == 0


def test_close_stops_the_probe(standins):
    async def run():
        engine = engine_over(standins, probe_interval_s=0.05)
        assert await engine.ready()
        await asyncio.sleep(0.2)
        await engine.close()
        return [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]

    assert asyncio.run(run()) == []


def test_the_same_url_twice_is_one_backend(standins):
    engine = ReplicatedVLLMEngine([standins[0].url, standins[0].url + "/"], Metrics())
    assert list(engine.backends) == [standins[0].url]
    asyncio.run(engine.close())


def test_settings_take_a_comma_separated_list_of_urls():
    settings = Settings.from_env({"ONELLM_VLLM_URL": " http://a:8000, http://b:8000/,,", "ONELLM_ROUTING": "round-robin"})
    assert settings.vllm_urls() == ["http://a:8000", "http://b:8000/"]
    assert settings.routing == "round-robin"
    assert Settings().vllm_urls() == []
