"""Request bodies on their way in: how many may arrive at once (in all and per client address),
how many of their bytes the gateway holds, and how slowly they may come, the way nginx's
client_body_timeout and Apache's mod_reqtimeout bound it: a gap between reads longer than
`body_idle_timeout_s`, or falling more than `upload_grace_s` behind `min_upload_bytes_per_s`
(mod_reqtimeout's MinRate), ends the request with 408 and the connection.

Refusals (429 past the upload places, 503 past the memory budget) come before any of the body
is read. A body's bytes count against the budget from its arrival (its Content-Length is
reserved at once) until its request ends: the gateway holds them that long. So do the bytes a
request fetches (stored files, remote URLs): the route adds them to the request's `Charge`
(`charge_of(request)`) before it reads them, and is refused with the same 503 past the budget.
"""

import asyncio
from collections import Counter

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.traffic.access import metric_key, send_error
from server.budget import format_bytes
from server.metrics import Metrics
from server.config import Settings
from server.errors import InputError, RequestError, Unavailable


class _TooSlow(Exception):
    def __init__(self, cause: str, message: str):
        super().__init__(message)
        self.cause = cause
        self.message = message


class _OverBudget(Exception):
    pass


class Intake:
    """ASGI middleware around every request: the way in of its body, and what it holds."""

    def __init__(self, app: ASGIApp, settings: Settings, metrics: Metrics):
        self.app = app
        self.settings = settings
        self.metrics = metrics
        self.uploading = 0
        self.buffered = 0
        self.per_client: Counter[str] = Counter()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length", b"")
        if b"transfer-encoding" not in headers and declared in (b"", b"0"):
            charge = Charge(self, scope)
            try:
                await self.app(scope, receive, send)
            finally:
                charge.release()
            return
        reserved = int(declared) if declared.isdigit() else 0
        client = (scope.get("client") or ("-",))[0]
        refusal = self._refusal(client, reserved)
        if refusal is not None:
            limit, error = refusal
            self.metrics.refusals.labels(limit, metric_key(scope)).inc()
            return await send_error(send, error, close=True)
        upload = _Upload(self, scope, client, reserved, receive)
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = True
            await send(message)

        try:
            await self.app(scope, upload.receive, tracking_send)
        except _TooSlow as e:
            self.metrics.request_timeouts.labels(e.cause).inc()
            if not started:
                await send_error(send, InputError(408, e.message), close=True)
        except _OverBudget:
            self.metrics.refusals.labels("max_buffered_bytes", metric_key(scope)).inc()
            if not started:
                await send_error(send, self._over_budget(), close=True)
        finally:
            upload.end()

    def _refusal(self, client: str, reserved: int) -> tuple[str, RequestError] | None:
        s = self.settings
        if self.uploading >= s.max_uploads:
            return "max_uploads", InputError(429, f"the server is receiving {s.max_uploads} uploads, its limit "
                                                  "(max_uploads); retry shortly", headers={"Retry-After": "1"})
        if self.per_client[client] >= s.max_uploads_per_client:
            return "max_uploads_per_client", InputError(
                429, f"this client address is already sending {s.max_uploads_per_client} uploads, its limit "
                     "(max_uploads_per_client); retry when one has arrived", headers={"Retry-After": "1"})
        if self.buffered + reserved > s.max_buffered_bytes:
            return "max_buffered_bytes", self._over_budget()
        return None

    def _over_budget(self, param: str | None = None) -> Unavailable:
        limit = format_bytes(self.settings.max_buffered_bytes)
        return Unavailable(f"the server holds {limit} of request bodies and the files they fetch, its limit "
                           "(max_buffered_bytes); retry shortly", param, headers={"Retry-After": "1"})


class Charge:
    """The bytes one request holds, counted against max_buffered_bytes from when they are known
    until the request ends; the route reaches it as `charge_of(request)`."""

    def __init__(self, intake: Intake, scope: Scope, reserved: int = 0):
        self.intake = intake
        self.scope = scope
        self.held = reserved
        intake.buffered += reserved
        scope.setdefault("state", {})["charge"] = self

    def reserve(self, nbytes: int, param: str) -> None:
        """Counts `nbytes` more, before they are kept; past the budget a 503 naming `param`, the
        part they are for, and nothing counted."""
        if self.intake.buffered + nbytes > self.intake.settings.max_buffered_bytes:
            self.intake.metrics.refusals.labels("max_buffered_bytes", metric_key(self.scope)).inc()
            raise self.intake._over_budget(param)
        self.grow(nbytes)

    def grow(self, nbytes: int) -> None:
        """Counts `nbytes` that have already arrived, whatever the budget says."""
        self.intake.buffered += nbytes
        self.held += nbytes

    def release(self) -> None:
        self.intake.buffered -= self.held
        self.held = 0


def charge_of(request: Request) -> Charge:
    return request.scope["state"]["charge"]


class _Upload:
    """One body arriving: its place among the uploads until its last byte, its bytes in the
    budget until its request ends, and the deadlines of its next read."""

    def __init__(self, intake: Intake, scope: Scope, client: str, reserved: int, receive: Receive):
        self.intake = intake
        self.client = client
        self.charge = Charge(intake, scope, reserved)
        self.body_held = reserved  # of the charge, what is the body's
        self.received = 0
        self._receive = receive
        self.loop = asyncio.get_running_loop()
        self.started = self.loop.time()
        self.arriving = True
        intake.uploading += 1
        intake.per_client[client] += 1
        intake.metrics.uploads_in_progress.inc()

    async def receive(self) -> Message:
        if not self.arriving:  # the body is in: what comes now is the client leaving, never late
            return await self._receive()
        s = self.intake.settings
        idle_at = self.loop.time() + s.body_idle_timeout_s
        # as mod_reqtimeout's MinRate: each min_upload_bytes_per_s bytes received buy a second
        # past the grace, so a body may fall at most upload_grace_s behind the minimum rate
        slow_at = (self.started + s.upload_grace_s + self.received / s.min_upload_bytes_per_s
                   if s.min_upload_bytes_per_s else float("inf"))
        try:
            async with asyncio.timeout_at(min(idle_at, slow_at)):
                message = await self._receive()
        except TimeoutError:
            self._arrived()
            if idle_at <= slow_at:
                raise _TooSlow("body_idle", f"the request body stopped arriving for {s.body_idle_timeout_s:g} s "
                                            "(body_idle_timeout_s)") from None
            rate = self.received / (self.loop.time() - self.started)
            raise _TooSlow("body_rate", f"the request body arrived at {rate:.0f} bytes/s, slower than "
                                        f"{s.min_upload_bytes_per_s} (min_upload_bytes_per_s)") from None
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            if self.received > self.body_held:  # a body without Content-Length grows as it comes
                self.charge.grow(self.received - self.body_held)
                self.body_held = self.received
                if self.intake.buffered > s.max_buffered_bytes:
                    self._arrived()
                    raise _OverBudget
            if not message.get("more_body", False):
                self._arrived()
        else:
            self._arrived()
        return message

    def _arrived(self) -> None:
        if self.arriving:
            self.arriving = False
            self.intake.uploading -= 1
            self.intake.per_client[self.client] -= 1
            if not self.intake.per_client[self.client]:
                del self.intake.per_client[self.client]
            self.intake.metrics.uploads_in_progress.dec()

    def end(self) -> None:
        self._arrived()
        self.charge.release()
