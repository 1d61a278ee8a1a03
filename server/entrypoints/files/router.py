"""OpenAI's Files API: `POST /v1/files`, `GET /v1/files[/{id}[/content]]`, `DELETE /v1/files/{id}`.

Every file is its API key's own: another key's id is a 404, as an id that never was, so ids
cannot be probed. Uploads are checked as inline attachments are, before anything is stored."""

import re
from pathlib import PurePosixPath
from typing import Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse
from starlette.datastructures import UploadFile

from server.entrypoints.files.protocol import FileDeleted, FileList, FileObject
from server.entrypoints.forms import read_form
from server.errors import InputError
from server.storage.files import PURPOSES, check_upload
from server.traffic.access import tenant_of
from server.traffic.routes import download_route

router = APIRouter()
FORM_FIELDS = {"file", "purpose", "expires_after[anchor]", "expires_after[seconds]"}
MIN_TTL_S = 3600  # OpenAI's shortest expires_after


def _not_found(file_id: str) -> InputError:
    return InputError(404, f"no file '{file_id}' (it may have expired or been deleted)", "file_id",
                      code="file_not_found")


def _ttl(form, settings) -> int:
    anchor = form.get("expires_after[anchor]")
    seconds = form.get("expires_after[seconds]")
    if anchor is None and seconds is None:
        return settings.file_ttl_s
    if anchor != "created_at":
        raise InputError(400, "expires_after[anchor] must be 'created_at'", "expires_after[anchor]")
    if not isinstance(seconds, str) or not seconds.isdigit() or not MIN_TTL_S <= int(seconds) <= settings.max_file_ttl_s:
        raise InputError(400, f"expires_after[seconds] must be a whole number from {MIN_TTL_S} to "
                              f"{settings.max_file_ttl_s} (max_file_ttl_s)", "expires_after[seconds]")
    return int(seconds)


def _filename(upload: UploadFile) -> str:
    # the client's name, kept for listing only: its last path part, printable, not too long
    name = PurePosixPath((upload.filename or "upload").replace("\\", "/")).name
    return re.sub(r"[^\w.+@=,-]", "_", name)[:255] or "upload"


@router.post("/v1/files", response_model=FileObject,
             openapi_extra={"requestBody": {"required": True, "content": {"multipart/form-data": {
                 "schema": {"type": "object", "required": ["file", "purpose"], "properties": {
                     "file": {"type": "string", "format": "binary"},
                     "purpose": {"type": "string", "enum": list(PURPOSES)},
                     "expires_after[anchor]": {"type": "string", "enum": ["created_at"]},
                     "expires_after[seconds]": {"type": "integer"}}}}}}})
async def upload_file(request: Request) -> FileObject:
    settings = request.app.state.settings
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise InputError(415, "POST /v1/files takes multipart/form-data: file=@path, purpose=user_data")
    async with read_form(request, settings.max_file_bytes, 1, len(FORM_FIELDS)) as form:
        unknown = next((name for name in form if name not in FORM_FIELDS), None)
        if unknown is not None:
            raise InputError(400, f"unknown form field '{unknown}'; accepted: {', '.join(sorted(FORM_FIELDS))}", unknown)
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise InputError(400, "send the file as a multipart file upload: file=@path", "file")
        purpose = form.get("purpose")
        if purpose not in PURPOSES:
            raise InputError(400, f"purpose must be one of {', '.join(PURPOSES)}", "purpose")
        ttl_s = _ttl(form, settings)
        data = await upload.read()
        filename = _filename(upload)
    service = request.app.state.service
    kind = await service.off_loop(check_upload, data, service.decoder_limits)
    if purpose == "batch" and kind != "text":
        raise InputError(415, "a batch input file is JSONL text: one request a line", "file")
    store, tenant = request.app.state.files, tenant_of(request)
    if len(await store.list(tenant)) >= settings.max_files_per_key:
        raise InputError(400, f"this API key already stores {settings.max_files_per_key} files (max_files_per_key); "
                              "delete some first", "file", code="files_limit")
    record = await store.add(tenant, data, filename, purpose, ttl_s, kind)
    return FileObject(**record.openai())


@router.get("/v1/files", response_model=FileList)
async def list_files(request: Request, purpose: str | None = None, limit: int = Query(10_000, ge=1, le=10_000),
                     order: Literal["asc", "desc"] = "desc", after: str | None = None) -> FileList:
    records = sorted(await request.app.state.files.list(tenant_of(request)), key=lambda r: r.uploaded_at,
                     reverse=order == "desc")
    if purpose is not None:
        records = [r for r in records if r.purpose == purpose]
    if after is not None:  # the page after that id, as OpenAI pages lists
        at = next((i for i, r in enumerate(records) if r.id == after), None)
        records = records[at + 1:] if at is not None else []
    page = [FileObject(**r.openai()) for r in records[:limit]]
    return FileList(data=page, first_id=page[0].id if page else None, last_id=page[-1].id if page else None,
                    has_more=len(records) > limit)


@router.get("/v1/files/{file_id}", response_model=FileObject)
async def get_file(request: Request, file_id: str) -> FileObject:
    record = await request.app.state.files.get(tenant_of(request), file_id)
    if record is None:
        raise _not_found(file_id)
    return FileObject(**record.openai())


@router.get("/v1/files/{file_id}/content",
            responses={200: {"content": {"application/octet-stream": {"schema": {"type": "string",
                                                                                 "format": "binary"}}}}})
@download_route
async def file_content(request: Request, file_id: str) -> StreamingResponse:
    """The bytes a piece at a time as the client takes them, never the whole file: a reader that
    stops taking them holds a piece, and is dropped after body_idle_timeout_s (connections.py)."""
    found = await request.app.state.files.stream(tenant_of(request), file_id)
    if found is None:
        raise _not_found(file_id)
    record, pieces = found
    return StreamingResponse(pieces, media_type="application/octet-stream",
                             headers={"Content-Length": str(record.bytes)})


@router.delete("/v1/files/{file_id}", response_model=FileDeleted)
async def delete_file(request: Request, file_id: str) -> FileDeleted:
    if not await request.app.state.files.delete(tenant_of(request), file_id):
        raise _not_found(file_id)
    return FileDeleted(id=file_id, deleted=True)
