"""The span of each chat request, the root of its trace (or a child of the caller's, from its
`traceparent`): it covers the way in (quotas, body, admission) and the answer to its last byte."""

from opentelemetry.trace import Status, StatusCode
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server import tracing
from server.core.request_id import REQUEST_ID
from server.traffic.routes import kind_of


class RequestSpans:
    """ASGI middleware, inside RequestIds (whose id every span carries). Without tracing on it
    only passes the request through."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not tracing.enabled() or kind_of(scope) != "chat":
            return await self.app(scope, receive, send)
        headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in scope["headers"]}
        attributes = {"http.request.method": scope["method"], "url.path": scope["path"]}
        with tracing.request_span(f"{scope['method']} {scope['path']}", headers, REQUEST_ID.get(),
                                  attributes) as span:
            intake = _Intake(receive)

            async def send_with_status(message: Message) -> None:
                if message["type"] == "http.response.start":
                    span.set_attribute("http.response.status_code", message["status"])
                    if message["status"] >= 500:
                        span.set_status(Status(StatusCode.ERROR))
                await send(message)

            try:
                await self.app(scope, intake.receive, send_with_status)
            finally:
                intake.ended()


class _Intake:
    """The "intake" span: from the request's start to its body's last part (a slow upload shows
    here, before admission), with the body's size."""

    def __init__(self, receive: Receive):
        self._receive = receive
        self.span = tracing.detached_span("intake")
        self.body_bytes = 0

    async def receive(self) -> Message:
        message = await self._receive()
        self.body_bytes += len(message.get("body", b""))
        if message["type"] != "http.request" or not message.get("more_body", False):
            self.ended()
        return message

    def ended(self) -> None:
        """Ends the span once: at the body's end, or with the request when it was refused before."""
        if self.span.is_recording():
            self.span.set_attribute("onellm.body_bytes", self.body_bytes)
            self.span.end()
