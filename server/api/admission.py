"""The life of a chat request: admitted into a bounded number of slots (429 past the queue),
ended by a deadline (504) or by the client leaving, whichever comes first.

Ending a request cancels the task serving it: its preprocessing future, its place in the
encoder's batch queue and its engine stream (the vLLM engine closes the upstream response
when its generator is closed) all go with it.
"""

import asyncio
import json
from contextlib import asynccontextmanager

from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.access import send_error
from server.api.metrics import Metrics
from server.errors import InputError

CHAT_PATHS = {"/v1/chat", "/v1/chat/completions"}
# a short fixed hint: a slot frees as soon as any answer ends, and clients back off on repeats
RETRY_AFTER_S = 1


def sse_error(error: InputError) -> str:
    """How a stream that has started reports a failure: an `error` event, then the usual end."""
    return f"event: error\ndata: {json.dumps(error.body())}\n\ndata: [DONE]\n\n"


class Overloaded(Exception):
    pass


class Admission:
    """`max_concurrent` requests run; up to `max_queued` more wait their turn, first come first
    served; any more are refused at once."""

    def __init__(self, max_concurrent: int, max_queued: int):
        self.max_concurrent = max_concurrent
        self.max_queued = max_queued
        self.waiting = 0
        self._slots = asyncio.Semaphore(max_concurrent)

    @asynccontextmanager
    async def slot(self):
        if self._slots.locked() and self.waiting >= self.max_queued:
            raise Overloaded
        self.waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self.waiting -= 1
        try:
            yield
        finally:
            self._slots.release()


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


class ChatGuard:
    """ASGI middleware around the chat endpoints: admission, request timeout, disconnects."""

    def __init__(self, app: ASGIApp, admission: Admission, timeout_s: float, metrics: Metrics):
        self.app = app
        self.admission = admission
        self.timeout_s = timeout_s
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in CHAT_PATHS or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        response = _Response(send)
        try:
            async with asyncio.timeout(self.timeout_s), self.admission.slot():
                await self._until_done_or_gone(scope, receive, response)
        except Overloaded:
            self.metrics.rejected.labels("overloaded").inc()
            # the body was not read: the connection cannot carry another request
            await send_error(send, InputError(
                429, f"the server is at capacity ({self.admission.max_concurrent} requests running, "
                     f"{self.admission.max_queued} waiting: max_concurrent, max_queued); retry shortly",
                headers={"Retry-After": str(RETRY_AFTER_S)}), close=True)
        except TimeoutError:
            self.metrics.rejected.labels("timeout").inc()
            error = InputError(504, f"the request took longer than {self.timeout_s:g} s (request_timeout_s)")
            if not response.started:
                await send_error(send, error, close=True)
            elif response.streaming and not response.complete:
                await send({"type": "http.response.body", "body": sse_error(error).encode(), "more_body": False})
        except ClientDisconnect:
            pass  # the client left during its upload: there is no one to answer

    async def _until_done_or_gone(self, scope: Scope, receive: Receive, response: _Response) -> None:
        watch = _ClientWatch(receive)
        serving = asyncio.ensure_future(self.app(scope, watch.receive, response.send))
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
