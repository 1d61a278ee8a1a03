"""Size limits on what clients send: request and file bytes counted while the body arrives,
and the chat's text, turns, attachments and max_tokens once it is parsed.

The decoders in server/media/decoders enforce the content limits (pixels, durations, points, ...);
the gateway hands them the configured values (`Settings.decoder_limits`).
"""

from contextlib import aclosing, asynccontextmanager

from starlette.datastructures import FormData
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.traffic.access import send_error
from server.core.chat import Chat
from server.errors import InputError


def _mib(n: int) -> str:
    return f"{n >> 20} MiB" if n and n % (1 << 20) == 0 else f"{n} bytes"


class BodyTooLarge(HTTPException):
    """An HTTPException so that FastAPI's body reading passes it on instead of making it a 400."""

    def __init__(self, limit: int):
        super().__init__(413, f"the request body is larger than the limit of {_mib(limit)} (max_request_bytes)")


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


class _LimitedParser(MultiPartParser):
    """Starlette's multipart parser, stopping at the first file past `max_file_bytes` (instead
    of spooling it to disk whole) or past `max_files` files, naming the setting."""

    def __init__(self, headers, stream, max_file_bytes: int, max_files: int, max_fields: int):
        super().__init__(headers, stream, max_files=float("inf"), max_fields=max_fields)
        self.max_file_bytes = max_file_bytes
        self.max_uploads = max_files
        self._uploads = 0
        self._part_bytes = 0

    def on_part_begin(self) -> None:
        super().on_part_begin()
        self._part_bytes = 0

    def on_headers_finished(self) -> None:
        super().on_headers_finished()
        if self._current_part.file is not None:
            self._uploads += 1
            if self._uploads > self.max_uploads:
                raise InputError(400, f"the request carries more than {self.max_uploads} files "
                                      "(max_attachments; an image with its depth or normal map is one)",
                                 self._current_part.field_name)

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        self._part_bytes += end - start
        if self._current_part.file is not None and self._part_bytes > self.max_file_bytes:
            name = self._current_part.field_name
            raise InputError(413, f"the '{name}' upload is larger than the limit of "
                                  f"{_mib(self.max_file_bytes)} (max_file_bytes)", name)
        super().on_part_data(data, start, end)


@asynccontextmanager
async def read_form(request: Request, max_file_bytes: int, max_files: int, max_fields: int):
    """`request.form()` with limits on the files' count and sizes; the uploads' spooled files
    are closed (and so deleted) on leaving the block, whatever happens in it."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        async with request.form(max_files=0, max_fields=max_fields) as form:
            yield form
        return
    try:
        async with aclosing(request.stream()) as stream:
            form: FormData = await _LimitedParser(request.headers, stream, max_file_bytes, max_files,
                                                  max_fields).parse()
    except MultiPartException as e:
        raise InputError(400, f"malformed multipart body: {e.message}") from None
    try:
        yield form
    finally:
        await form.close()


def check_attachment_count(count: int, max_attachments: int) -> None:
    """Checked on the parts before anything they name is fetched, and on the chat they made."""
    if count > max_attachments:
        raise InputError(400, f"the request carries {count} attachments, more than the limit of "
                              f"{max_attachments} (max_attachments)", "messages")


def check_chat(chat: Chat, limits, max_tokens: int | None, max_tokens_param: str = "max_tokens",
               text_param: str = "messages") -> None:
    """The limits on a parsed chat; `limits` is the gateway's Settings, the params name the
    request's fields (they differ between the two endpoints)."""
    if max_tokens is not None and max_tokens > limits.max_tokens_limit:
        raise InputError(400, f"{max_tokens_param}={max_tokens} is more than this server's limit of "
                              f"{limits.max_tokens_limit} (max_tokens_limit)", max_tokens_param)
    if len(chat.turns) > limits.max_turns:
        raise InputError(400, f"the chat has {len(chat.turns)} messages, more than the limit of "
                              f"{limits.max_turns} (max_turns)", "messages")
    chars = sum(len(t.text) for t in chat.turns) + len(chat.system or "")
    if chars > limits.max_text_chars:
        raise InputError(413, f"the messages hold {chars} characters of text, more than the limit of "
                              f"{limits.max_text_chars} (max_text_chars)", text_param)
    attachments = [a for t in chat.turns for a in t.attachments]
    check_attachment_count(len(attachments), limits.max_attachments)
    for attachment in attachments:
        for name, data in attachment.files.items():
            if len(data) > limits.max_file_bytes:
                param = attachment.params.get(name, name)
                raise InputError(413, f"the '{param}' upload is larger than the limit of "
                                      f"{_mib(limits.max_file_bytes)} (max_file_bytes)", param)
