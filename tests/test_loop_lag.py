"""The event loop's lag: the ticker measures a stall of the loop, and the gateway serves the measure
on /metrics from start-up."""

import asyncio
import time

from fastapi.testclient import TestClient

from server.config import Settings
from server.entrypoints.app import create_app
from server.entrypoints.loop_lag import record_loop_lag


class Observed(list):
    def observe(self, amount: float) -> None:
        self.append(amount)


def test_a_stalled_loop_shows_as_the_ticks_delay():
    lags = Observed()

    async def stall_once():
        ticker = asyncio.create_task(record_loop_lag(lags, tick_s=0.001))
        await asyncio.sleep(0.02)
        time.sleep(0.2)  # work on the loop: nothing else runs meanwhile
        await asyncio.sleep(0.02)
        ticker.cancel()

    asyncio.run(stall_once())
    assert len(lags) > 2
    assert max(lags) >= 0.15  # the stall, less at most one tick
    assert sorted(lags)[len(lags) // 2] < 0.15  # one tick saw it, not every one


def test_the_gateway_serves_its_loop_lag(tiny_model):
    with TestClient(create_app(Settings(model=str(tiny_model)))) as client:
        time.sleep(0.1)
        metrics = client.get("/metrics").text
    counts = [line for line in metrics.splitlines() if line.startswith("onellm_event_loop_lag_seconds_count")]
    assert len(counts) == 1 and float(counts[0].split()[-1]) > 0
