"""The life of a chat request: admitted, once its body has arrived, into a bounded number of
slots (429 past the queue, callers served in turn), ended by a deadline (504) or by the client
leaving, whichever comes first.

Ending a request cancels the task serving it: its preprocessing future, its place in the
encoder's batch queue and its engine stream (the vLLM engine closes the upstream response
when its generator is closed) all go with it.
"""

import asyncio
from collections import deque
from collections.abc import Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass

from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server import tracing
from server.engines.priority import BATCH, ONLINE, LiveTraffic, request_priority, standing_still_while_online
from server.traffic.access import caller_of, is_batch_line, metric_key, send_error
from server.metrics import Metrics
from server.errors import InputError, RequestError, TimedOut
from server.traffic.routes import kind_of

# a short fixed hint: a slot frees as soon as any answer ends, and clients back off on repeats
RETRY_AFTER_S = 1


class Overloaded(Exception):
    pass


class Admission:
    """`max_concurrent` requests run; up to `max_queued` more wait their turn; any more are refused
    at once. Waiters are served by caller in turn (round robin over the callers that have one
    waiting, each caller's own first come first served), so a caller with many waiting cannot
    push another's request behind all of its own.

    Batch lines come after online traffic: one gets a slot only when no online request waits, and
    while online requests run at most `batch_beside_online` lines do (default none: batches fill
    what online traffic leaves idle; the lines already running finish, none is cut). On a CPU one
    request can keep every core busy, so a free slot is no sign of idle compute: a line started
    beside an online request halves that request's speed. Batch lines are not counted in
    `max_queued`; the batch runner bounds how many of them wait. `live` counts the online requests
    holding a slot, for the batch lines already running to yield to them below admission."""

    def __init__(self, max_concurrent: int, max_queued: int, batch_beside_online: int = 0,
                 live: LiveTraffic | None = None):
        self.max_concurrent = max_concurrent
        self.live = live or LiveTraffic()
        self.max_queued = max_queued
        self.batch_beside_online = batch_beside_online
        self._free = max_concurrent
        self._running = [0, 0]  # slots held, per priority
        # per priority: callers with waiters, in the order their turns come (a dict keeps insertion order)
        self._queues: tuple[dict[str, deque[asyncio.Future]], ...] = ({}, {})

    @property
    def waiting(self) -> int:
        return self.waiting_at(ONLINE)

    def waiting_at(self, priority: int) -> int:
        return sum(len(queue) for queue in self._queues[priority].values())

    @asynccontextmanager
    async def slot(self, caller: str = "", priority: int = ONLINE):
        ahead = self._queues[ONLINE] or (priority == BATCH and self._queues[BATCH])
        if self._free and not ahead and self._may_run(priority):
            self._take(priority)
        else:
            if priority == ONLINE and self.waiting >= self.max_queued:
                raise Overloaded
            turn = asyncio.get_running_loop().create_future()
            self._queues[priority].setdefault(caller, deque()).append(turn)
            try:
                await turn  # the slot is taken for it when its turn is handed out
            except asyncio.CancelledError:
                if turn.done() and not turn.cancelled():
                    self._release(priority)  # handed the slot as it was cancelled: the next one gets it
                else:
                    self._forget(self._queues[priority], caller, turn)
                raise
        try:
            yield
        finally:
            self._release(priority)

    def _may_run(self, priority: int) -> bool:
        return priority == ONLINE or not self._running[ONLINE] or self._running[BATCH] < self.batch_beside_online

    def _take(self, priority: int) -> None:
        self._free -= 1
        self._running[priority] += 1
        if priority == ONLINE:
            self.live.enter()

    def _release(self, priority: int) -> None:
        self._free += 1
        self._running[priority] -= 1
        if priority == ONLINE:
            self.live.leave()
        # online waiters first; then batch lines, as many as may run now (the last online request
        # ending can let several start)
        for waiting_priority, queues in enumerate(self._queues):
            while self._free and queues and self._may_run(waiting_priority):
                caller = next(iter(queues))
                queue = queues.pop(caller)
                turn = queue.popleft()
                if queue:
                    queues[caller] = queue  # to the back of the round
                if not turn.done():
                    self._take(waiting_priority)
                    turn.set_result(None)

    @staticmethod
    def _forget(queues: dict[str, deque[asyncio.Future]], caller: str, turn: asyncio.Future) -> None:
        queue = queues.get(caller)
        if queue is not None and turn in queue:
            queue.remove(turn)
            if not queue:
                del queues[caller]


class _ClientWatch:
    """Passes the request body to the app, then listens for the client leaving. ASGI gives
    one receive channel; once the body is read, only this watch reads it and the app's
    later receive() calls learn of the disconnect from the watch."""

    def __init__(self, receive: Receive):
        self._receive = receive
        self.body_read = asyncio.Event()
        self.left = asyncio.Event()

    async def receive(self) -> Message:
        if self.body_read.is_set():
            await self.left.wait()
            return {"type": "http.disconnect"}
        message = await self._receive()
        if message["type"] == "http.disconnect":
            self.left.set()
        elif not message.get("more_body", False):
            self.body_read.set()
        return message

    async def until_left(self) -> None:
        await self.body_read.wait()
        await self._receive()  # nothing but the disconnect (or the response's end) comes now
        self.left.set()


class _Response:
    """What has been sent of the response so far."""

    def __init__(self, send: Send):
        self._send = send
        self.started = self.streaming = self.complete = False

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.started = True
            self.streaming = dict(message.get("headers", [])).get(b"content-type", b"").startswith(
                b"text/event-stream")
        elif message["type"] == "http.response.body" and not message.get("more_body", False):
            self.complete = True
        await self._send(message)


@dataclass
class _Holding:
    """What a request holds once admitted (its slot, in `held`), its deadline, and whether it is a batch line."""
    held: AsyncExitStack
    deadline: asyncio.Timeout
    batch_line: bool


class ChatGuard:
    """ASGI middleware around the chat endpoints: admission, request timeout, disconnects.
    `stream_error` frames the error that ends a stream the deadline cut, in the stream's wire format."""

    def __init__(self, app: ASGIApp, admission: Admission, timeout_s: float, metrics: Metrics,
                 stream_error: Callable[[RequestError], str]):
        self.app = app
        self.admission = admission
        self.timeout_s = timeout_s
        self.metrics = metrics
        self.stream_error = stream_error

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if kind_of(scope) != "chat":
            return await self.app(scope, receive, send)
        response = _Response(send)
        batch_line = is_batch_line(scope)
        try:
            # a batch line's deadline starts once it has its slot: it may wait behind online traffic for long
            async with asyncio.timeout(None if batch_line else self.timeout_s) as deadline, AsyncExitStack() as held:
                if batch_line:
                    held.enter_context(standing_still_while_online(deadline, self.admission.live))
                await self._until_done_or_gone(scope, receive, response, _Holding(held, deadline, batch_line))
        except Overloaded:
            self.metrics.rejected.labels("overloaded").inc()
            self.metrics.refusals.labels("max_queued", metric_key(scope)).inc()
            await send_error(send, InputError(
                429, f"the server is at capacity ({self.admission.max_concurrent} requests running, "
                     f"{self.admission.max_queued} waiting: max_concurrent, max_queued); retry shortly",
                headers={"Retry-After": str(RETRY_AFTER_S)}))
        except TimeoutError:
            self.metrics.rejected.labels("timeout").inc()
            error = TimedOut(f"the request took longer than {self.timeout_s:g} s (request_timeout_s)")
            if not response.started:
                await send_error(send, error, close=True)
            elif response.streaming and not response.complete:
                body = self.stream_error(error).encode()
                await send({"type": "http.response.body", "body": body, "more_body": False})
        except ClientDisconnect:
            pass  # the client left during its upload: there is no one to answer

    def _admitting(self, receive: Receive, holding: "_Holding", caller: str) -> Receive:
        """`receive`, which once the body's last part has come waits for a slot before handing it
        on: uploads, however slow, hold no slot; the slot is held until the response ends."""

        async def admitted_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request" and not message.get("more_body", False):
                priority = BATCH if holding.batch_line else ONLINE
                with tracing.span("admission", {"onellm.batch_line": holding.batch_line}):
                    await holding.held.enter_async_context(self.admission.slot(caller, priority))
                if holding.deadline.when() is None:
                    holding.deadline.reschedule(asyncio.get_running_loop().time() + self.timeout_s)
            return message

        return admitted_receive

    async def _until_done_or_gone(self, scope: Scope, receive: Receive, response: _Response,
                                  holding: "_Holding") -> None:
        watch = _ClientWatch(receive)
        # admitted after the watch has seen the body's end, so a client leaving while queued is noticed
        admitted = self._admitting(watch.receive, holding, caller_of(scope))
        # the serving task starts with a copy of this context: its work below knows its priority
        marked = request_priority.set(BATCH if holding.batch_line else ONLINE)
        serving = asyncio.ensure_future(self.app(scope, admitted, response.send))
        request_priority.reset(marked)
        watching = asyncio.ensure_future(watch.until_left())
        try:
            await asyncio.wait({serving, watching}, return_when=asyncio.FIRST_COMPLETED)
        finally:  # done, the client left, or the deadline cancelled this wait
            watching.cancel()
            if not serving.done() and not response.complete:
                serving.cancel()
            await asyncio.wait({serving})
        if not serving.cancelled():
            serving.result()  # the app's own exception, if it raised one
