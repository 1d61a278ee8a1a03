"""Which requests come first once they are inside the gateway: online requests before batch lines.

Admission orders the waiting requests; past it, the layers below (the encoder's batches, the
embedded engine's steps) need to know whose work they are doing and whether live traffic is being
served. Both are kept here, in the lowest layer, so that every layer above may read them.
"""

import asyncio
from contextvars import ContextVar

# highest first; a batch line is served as BATCH, everything else as ONLINE
ONLINE, BATCH = 0, 1

# the priority of the request the current task serves: set once, where a batch line comes in
# (traffic/admission.py), and read wherever work is queued, without every call in between carrying it
request_priority: ContextVar[int] = ContextVar("onellm_request_priority", default=ONLINE)


class LiveTraffic:
    """How many online requests are being served: the admission counts each for as long as it
    holds its slot, an engine each of its streams (so that it also works alone). Batch work waits
    for none to be left between its steps; it keeps its state meanwhile (the engine its KV cache)."""

    def __init__(self):
        self.serving = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._busy = asyncio.Event()

    def enter(self) -> None:
        self.serving += 1
        self._idle.clear()
        self._busy.set()

    def leave(self) -> None:
        self.serving -= 1
        if not self.serving:
            self._idle.set()
            self._busy.clear()

    async def until_idle(self) -> None:
        await self._idle.wait()

    async def until_busy(self) -> None:
        await self._busy.wait()
