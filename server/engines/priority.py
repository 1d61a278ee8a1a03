"""Which requests come first once they are inside the gateway: online requests before batch lines.

Admission orders the waiting requests; past it, the layers below (the encoder's batches, the
embedded engine's steps) need to know whose work they are doing and whether live traffic is being
served. Both are kept here, in the lowest layer, so that every layer above may read them.
"""

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

# highest first; a batch line is served as BATCH, everything else as ONLINE
ONLINE, BATCH = 0, 1

# the priority of the request the current task serves: set once, where a batch line comes in
# (traffic/admission.py), and read wherever work is queued, without every call in between carrying it
request_priority: ContextVar[int] = ContextVar("onellm_request_priority", default=ONLINE)


class LiveTraffic:
    """How many online requests are being served: the admission counts each for as long as it
    holds its slot, an engine each of its streams (so that it also works alone). Batch work waits
    for none to be left between its steps; it keeps its state meanwhile (the engine its KV cache,
    the encoder its activations). Counted on the event loop; worker threads may wait on it too."""

    def __init__(self):
        self.serving = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._busy = asyncio.Event()
        self._idle_for_threads = threading.Event()
        self._idle_for_threads.set()

    def enter(self) -> None:
        self.serving += 1
        self._idle.clear()
        self._idle_for_threads.clear()
        self._busy.set()

    def leave(self) -> None:
        self.serving -= 1
        if not self.serving:
            self._idle.set()
            self._idle_for_threads.set()
            self._busy.clear()

    def wait_until_idle_in_thread(self, timeout: float) -> bool:
        """Blocks a worker thread (never the event loop) while online requests are served, at most
        `timeout` seconds: False if they still are."""
        return self._idle_for_threads.wait(timeout)

    async def until_idle(self) -> None:
        await self._idle.wait()

    async def until_busy(self) -> None:
        await self._busy.wait()


@contextmanager
def standing_still_while_online(timeout: asyncio.Timeout, live: LiveTraffic) -> Iterator[None]:
    """Within it, `timeout` stands still while online requests are served: a running batch line
    takes no step then, so neither its deadline nor the wait for its engine's next token may count
    that time, or a steady online load would time out every line."""
    watcher = asyncio.ensure_future(_stand_still_while_online(timeout, live))
    try:
        yield
    finally:
        watcher.cancel()


async def _stand_still_while_online(timeout: asyncio.Timeout, live: LiveTraffic) -> None:
    loop = asyncio.get_running_loop()
    while True:
        await live.until_busy()
        if timeout.expired():  # being cancelled: it cannot be moved any more
            return
        if (when := timeout.when()) is not None:  # None: not started yet (a line waiting for its slot)
            timeout.reschedule(None)
            left = when - loop.time()
            await live.until_idle()
            timeout.reschedule(loop.time() + left)
        else:
            await live.until_idle()
