"""Multipart forms read with limits on their files, for the endpoints that take uploads
(`POST /v1/chat`, `POST /v1/files`)."""

from contextlib import aclosing, asynccontextmanager

from starlette.datastructures import FormData
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request

from server.budget import format_bytes
from server.errors import InputError


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
                                  f"{format_bytes(self.max_file_bytes)} (max_file_bytes)", name)
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
