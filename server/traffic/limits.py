"""The size limit on a request's body, counted while it arrives. The limits on what a body holds
come later: a form's files (server/entrypoints/forms.py), the chat parsed from it (server/core/chat.py),
the content of its attachments (the decoders in server/media/decoders)."""

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.budget import format_bytes
from server.errors import InputError
from server.traffic.access import send_error


class BodyTooLarge(HTTPException):
    """An HTTPException so that FastAPI's body reading passes it on instead of making it a 400."""

    def __init__(self, limit: int):
        super().__init__(413, f"the request body is larger than the limit of {format_bytes(limit)} (max_request_bytes)")


class BodyLimit:
    """ASGI middleware: a body over `limit` bytes is refused with 413 as soon as it is known,
    from its Content-Length before any byte is read, or the moment the count passes the limit
    while it streams in (chunked uploads have no length to check)."""

    def __init__(self, app: ASGIApp, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            # the body is left unread: close the connection rather than read it to reuse it
            return await send_error(send, InputError(413, BodyTooLarge(self.limit).detail), close=True)
        received = 0
        unread = declared not in (b"", b"0") or b"transfer-encoding" in headers  # body bytes still to come

        async def counting_receive() -> Message:
            nonlocal received, unread
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                unread = message.get("more_body", False)
            if received > self.limit:
                raise BodyTooLarge(self.limit)
            return message

        async def closing_send(message: Message) -> None:
            if unread and message["type"] == "http.response.start":
                # answered before the body's end (a limit, a bad upload): close the connection,
                # or the server would read and discard whatever the client goes on sending
                message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        await self.app(scope, counting_receive, closing_send)
