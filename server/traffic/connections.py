"""Connections: a cap on how many are open, and a deadline for each request's headers.

uvicorn's h11 protocol has neither: a connection that sends nothing, or its headers a byte at a
time, stays open for ever, and its `limit_concurrency` answers 503 only once headers have come,
so idle sockets still pile up until descriptors run out. `Connection` is uvicorn's protocol
with both added, the way nginx does it (client_header_timeout, and reusing idle connections
when worker_connections run out):

- a request's headers must be complete within `header_timeout_s` of the connection opening
  (or, on a kept-alive connection, of the next request's first byte; before that byte
  uvicorn's keep-alive timeout applies). Late: 408 and the connection closed, or a plain close
  if not a byte came;
- past `max_connections`, the connection that has waited longest for a request is closed to
  make room; only if every one is busy with a request does the new one get 503;
- a response whose reader takes nothing for `send_timeout_s` (its bytes waiting past the write
  buffer's high-water mark all that time) has its connection dropped, as nginx's send_timeout
  does: a reader that stops reading holds one write buffer, never a whole download or answer.
"""

import asyncio
import functools
import json

import h11
from uvicorn.protocols.http.h11_impl import STATUS_PHRASES, H11Protocol

from server.metrics import Metrics
from server.errors import InputError, RequestError, Unavailable


def raw_response(error: RequestError) -> bytes:
    """A whole HTTP/1.1 response, written past h11: it sends responses only to a request it has parsed."""
    body = json.dumps(error.body()).encode()
    head = [f"HTTP/1.1 {error.status} {STATUS_PHRASES[error.status].decode()}", "content-type: application/json",
            f"content-length: {len(body)}", "connection: close",
            *(f"{name.lower()}: {value}" for name, value in error.headers.items())]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


class Connection(H11Protocol):
    def __init__(self, *args, header_timeout_s: float, max_connections: int, metrics: Metrics,
                 send_timeout_s: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.header_timeout_s = header_timeout_s
        self.max_connections = max_connections
        self.metrics = metrics
        self.send_timeout_s = send_timeout_s
        self._header_deadline: asyncio.TimerHandle | None = None
        self._send_deadline: asyncio.TimerHandle | None = None
        self.idle_since: float | None = None  # waiting for a request since then; None while serving one

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.idle_since = self.loop.time()
        self._await_headers()
        if self._open_connections() > self.max_connections and not self._make_room():
            self.metrics.refusals.labels("max_connections", "").inc()
            self._close_with(Unavailable(f"the server has {self.max_connections} connections open, its limit "
                                         "(max_connections), all busy; retry shortly",
                                         headers={"Retry-After": "1"}))

    def data_received(self, data: bytes) -> None:
        if self._header_deadline is None and self.conn.their_state is h11.IDLE:
            self._await_headers()  # a kept-alive connection's next request has begun
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE or self.transport.is_closing():
            self._stop_waiting()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self.idle_since = self.loop.time()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_waiting()
        self._reader_took_some()
        super().connection_lost(exc)

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._send_deadline is None:
            self._send_deadline = self.loop.call_later(self.send_timeout_s, self.transport.abort)

    def resume_writing(self) -> None:
        self._reader_took_some()
        super().resume_writing()

    def _reader_took_some(self) -> None:
        if self._send_deadline is not None:
            self._send_deadline.cancel()
            self._send_deadline = None

    def _await_headers(self) -> None:
        self._header_deadline = self.loop.call_later(self.header_timeout_s, self._headers_late)

    def _stop_waiting(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None
        self.idle_since = None

    def _headers_late(self) -> None:
        self._header_deadline = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        if self.conn.trailing_data[0]:  # part of a request came: it is answered
            self.metrics.request_timeouts.labels("headers").inc()
            self._close_with(InputError(408, f"the request headers did not arrive within {self.header_timeout_s:g} s "
                                             "(header_timeout_s)"))
        else:
            self.transport.close()

    def _close_with(self, error: RequestError) -> None:
        self._stop_waiting()
        self.transport.write(raw_response(error))
        self.transport.close()

    def _open_connections(self) -> int:
        return sum(1 for c in self.connections if not c.transport.is_closing())

    def _make_room(self) -> bool:
        idle = [c for c in self.connections if c is not self and getattr(c, "idle_since", None) is not None
                and not c.transport.is_closing()]
        if not idle:
            return False
        oldest = min(idle, key=lambda c: c.idle_since)
        oldest._stop_waiting()
        oldest.transport.close()
        return True


def connection_class(header_timeout_s: float, max_connections: int, metrics: Metrics, send_timeout_s: float):
    """What uvicorn's `http` setting takes: it calls this with its own arguments for each connection."""
    return functools.partial(Connection, header_timeout_s=header_timeout_s, max_connections=max_connections,
                             metrics=metrics, send_timeout_s=send_timeout_s)
