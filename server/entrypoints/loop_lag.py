"""How late the event loop runs what is due: a ticker sleeps a short interval and records by how much
each wake-up came late. Work done on the loop (a tensor copy waiting for the device, a large body
parsed there) delays every stream the gateway serves, and shows here as lag."""

import asyncio
from typing import Protocol

TICK_S = 0.005  # short enough to see a stall of a few ms, long enough to cost the loop nothing measurable


class Histogram(Protocol):
    def observe(self, amount: float) -> None: ...


async def record_loop_lag(lag: Histogram, tick_s: float = TICK_S) -> None:
    """Runs until cancelled, observing each wake-up's delay (seconds) in `lag`."""
    loop = asyncio.get_running_loop()
    while True:
        due = loop.time() + tick_s
        await asyncio.sleep(tick_s)
        lag.observe(max(0.0, loop.time() - due))
