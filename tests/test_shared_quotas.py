"""The cluster-wide quotas' counts in a real redis-server: the sliding window at its edge, leases
counted, renewed while held and lapsing when their gateway stops renewing them, and a Redis
outage that falls back to each gateway's own counts and ends when Redis is back. Each SharedQuotas
here stands for one gateway."""

import asyncio
import logging
import time

import pytest

from server.cache.redis_client import SharedRedis
from server.metrics import Metrics
from server.traffic.shared_quotas import SharedQuotas, Verdict

ADMITTED = Verdict(None)


def sample(metrics: Metrics, name: str) -> float:
    return metrics.registry.get_sample_value(name) or 0.0


async def gateway(redis_server, ttl_s: float = 30.0) -> SharedQuotas:
    metrics = Metrics()
    redis = SharedRedis(redis_server.url, 1.0, metrics)
    await redis.start()
    return SharedQuotas(redis, ttl_s, metrics)


async def stop(quotas: SharedQuotas) -> None:
    await quotas.close()
    await quotas.redis.close()


def redis_now_ms(redis_server) -> int:
    with redis_server.client() as client:
        seconds, micros = client.time()
    return seconds * 1000 + micros // 1000


def test_a_start_exactly_one_window_old_no_longer_counts(redis_server):
    caller, starts = "edge", "onellm:quota:starts:edge"
    now_ms = redis_now_ms(redis_server)
    # a start at every millisecond of the second after the edge as it is now: the check comes
    # within that second, and must keep exactly those younger than one window at its own time
    with redis_server.client() as client:
        client.zadd(starts, {f"old{k}": now_ms - 60_000 + k for k in range(1000)})

    async def scenario():
        quotas = await gateway(redis_server)
        verdict, _ = await quotas.admit(caller, 0, 5000)
        await stop(quotas)
        return verdict

    assert asyncio.run(scenario()) == ADMITTED
    with redis_server.client() as client:
        scores = [score for _, score in client.zrange(starts, 0, -1, withscores=True)]
    checked_at = max(scores)  # the start just admitted, stamped with the check's time
    assert checked_at - now_ms < 1000, "the check came too late for this test's second of starts"
    kept = scores[:-1]
    expected = [now_ms - 60_000 + k for k in range(1000) if now_ms - 60_000 + k > checked_at - 60_000]
    assert kept == expected


def test_a_full_window_waits_until_its_oldest_start_leaves(redis_server):
    caller = "full"
    now_ms = redis_now_ms(redis_server)
    with redis_server.client() as client:
        # 9 starts 0.4 s inside the window
        client.zadd(f"onellm:quota:starts:{caller}", {f"in{i}": now_ms - 60_000 + 400 for i in range(9)})

    async def scenario():
        quotas = await gateway(redis_server)
        tenth, _ = await quotas.admit(caller, 0, 10)
        eleventh, _ = await quotas.admit(caller, 0, 10)
        await asyncio.sleep(eleventh.wait_s + 0.05)
        after_the_edge, _ = await quotas.admit(caller, 0, 10)
        await stop(quotas)
        return tenth, eleventh, after_the_edge

    tenth, eleventh, after_the_edge = asyncio.run(scenario())
    assert tenth == ADMITTED
    assert eleventh.limit == "key_requests_per_minute" and 0 < eleventh.wait_s <= 0.4
    assert after_the_edge == ADMITTED  # the 9 left the window; the 10th and this one remain
    with redis_server.client() as client:
        assert client.zcard(f"onellm:quota:starts:{caller}") == 2


def test_leases_are_counted_across_gateways_and_a_released_one_is_free_at_once(redis_server):
    async def scenario():
        a, b = await gateway(redis_server), await gateway(redis_server)
        held = [await quotas.admit("counted", 3, 0) for quotas in (a, b, a)]
        refused, _ = await b.admit("counted", 3, 0)
        await a.release(held[0][1])
        after_release, _ = await b.admit("counted", 3, 0)
        for quotas in (a, b):
            await stop(quotas)
        return [verdict for verdict, _ in held], refused, after_release

    held, refused, after_release = asyncio.run(scenario())
    assert held == [ADMITTED] * 3
    assert refused.limit == "key_max_concurrent"
    assert after_release == ADMITTED


def test_leases_live_while_renewed_and_lapse_within_the_ttl_once_their_gateway_stops(redis_server):
    ttl_s = 1.0

    async def scenario():
        a, b = await gateway(redis_server, ttl_s), await gateway(redis_server, ttl_s)
        for _ in range(2):
            assert (await a.admit("lapsing", 2, 0))[0] == ADMITTED
        await asyncio.sleep(3 * ttl_s)  # three lease lifetimes: only renewal keeps them
        while_renewed, _ = await b.admit("lapsing", 2, 0)
        await a.close()  # a's gateway dies: nobody renews nor releases its leases
        stopped = time.monotonic()
        right_after, _ = await b.admit("lapsing", 2, 0)
        while (await b.admit("lapsing", 2, 0))[0] != ADMITTED:
            assert time.monotonic() - stopped < 10 * ttl_s, "the dead gateway's leases never lapsed"
            await asyncio.sleep(0.05)
        lapsed_after = time.monotonic() - stopped
        for quotas in (a, b):
            await stop(quotas)
        return while_renewed, right_after, lapsed_after

    while_renewed, right_after, lapsed_after = asyncio.run(scenario())
    assert while_renewed.limit == "key_max_concurrent"
    assert right_after.limit == "key_max_concurrent"
    assert lapsed_after <= ttl_s + 2  # renewed at most ttl/3 before, plus a loaded machine's delays


def test_leases_redis_lost_are_written_back_by_the_next_renewal(redis_server):
    ttl_s = 1.0

    async def scenario():
        quotas = await gateway(redis_server, ttl_s)
        for _ in range(2):
            assert (await quotas.admit("evicted", 2, 0))[0] == ADMITTED
        with redis_server.client() as client:
            client.delete("onellm:quota:leases:evicted")  # as allkeys-lru may
            deadline = time.monotonic() + 10 * ttl_s
            while client.zcard("onellm:quota:leases:evicted") != 2:
                assert time.monotonic() < deadline, "the lost leases were never written back"
                await asyncio.sleep(0.05)
        refused, _ = await quotas.admit("evicted", 2, 0)
        await stop(quotas)
        return refused

    assert asyncio.run(scenario()).limit == "key_max_concurrent"


def test_an_outage_falls_back_to_the_gateways_own_counts_with_one_warning_and_ends_when_redis_is_back(
        redis_server, caplog):
    async def until_up(quotas: SharedQuotas) -> None:
        deadline = time.monotonic() + 20
        while not quotas.redis.up:
            assert time.monotonic() < deadline, "Redis was never used again"
            await asyncio.sleep(0.05)

    async def scenario():
        quotas = await gateway(redis_server)
        before, _ = await quotas.admit("outage", 5, 0)
        redis_server.stop()
        during = [await quotas.admit("outage", 5, 0) for _ in range(3)]
        fallbacks, up = sample(quotas.metrics, "onellm_shared_quota_fallbacks_total"), \
            sample(quotas.metrics, "onellm_shared_quotas_up")
        redis_server.start()
        await until_up(quotas)
        await asyncio.sleep(0.2)  # the leases are written back as Redis returns, after `up`
        with redis_server.client() as client:
            restored = client.zcard("onellm:quota:leases:outage")
        after, _ = await quotas.admit("outage", 5, 0)
        refused, _ = await quotas.admit("outage", 5, 0)
        up_after = sample(quotas.metrics, "onellm_shared_quotas_up")
        await stop(quotas)
        return before, during, fallbacks, up, restored, after, refused, up_after

    with caplog.at_level(logging.INFO, logger="onellm.quotas"):
        before, during, fallbacks, up, restored, after, refused, up_after = asyncio.run(scenario())
    assert before == ADMITTED
    # Redis did not answer: the caller decides with its own counts, and each lease is still held
    assert [verdict for verdict, _ in during] == [None] * 3 and all(lease is not None for _, lease in during)
    assert fallbacks == 3 and up == 0
    warnings = [r for r in caplog.records if r.name == "onellm.quotas" and r.levelno == logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    # the restarted Redis was empty: the 4 requests still held were written back into it
    assert restored == 4
    assert after == ADMITTED and refused.limit == "key_max_concurrent" and up_after == 1
    assert any("answers again" in r.getMessage() for r in caplog.records if r.name == "onellm.quotas")


@pytest.mark.parametrize("limits", [(0, 0), (2, 0), (0, 2)])
def test_a_zero_limit_is_no_limit(redis_server, limits):
    max_concurrent, per_minute = limits

    async def scenario():
        quotas = await gateway(redis_server)
        verdicts = [(await quotas.admit(f"zero-{limits}", max_concurrent, per_minute))[0] for _ in range(3)]
        await stop(quotas)
        return verdicts

    verdicts = asyncio.run(scenario())
    assert verdicts[:2] == [ADMITTED] * 2
    assert verdicts[2] == ADMITTED if limits == (0, 0) else verdicts[2].limit is not None
