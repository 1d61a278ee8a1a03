"""OpenAI's Batch API: `POST /v1/batches`, `GET /v1/batches[/{id}]`, `POST /v1/batches/{id}/cancel`.

A batch reads an input file uploaded with purpose `batch` and is run by core/batches.py. Every
batch is its API key's own, as its files are: another key's batch id is a 404."""

import time

from fastapi import APIRouter, Query, Request

from server.core.batch_lines import new_batch_id
from server.core.batches import CALLER
from server.entrypoints.batches.protocol import BatchCreateRequest, BatchList, BatchObject
from server.entrypoints.chats import read_json
from server.entrypoints.protocol import json_body
from server.errors import InputError
from server.storage.batch_records import FINAL_STATES
from server.traffic.access import caller_of, tenant_of

router = APIRouter()


def _check_input_file(record, file_id: str) -> None:
    if record is None:
        raise InputError(404, f"no file '{file_id}' (it may have expired or been deleted)", "input_file_id",
                         code="file_not_found")
    if record.purpose != "batch":
        raise InputError(400, f"file '{file_id}' was uploaded with purpose '{record.purpose}'; a batch's input "
                              "file is uploaded with purpose 'batch'", "input_file_id")


async def _batch(request: Request, batch_id: str) -> dict:
    batch = await request.app.state.batches.get(tenant_of(request), batch_id)
    if batch is None:
        raise InputError(404, f"no batch '{batch_id}'", "batch_id", code="batch_not_found")
    return batch


@router.post("/v1/batches", response_model=BatchObject, openapi_extra=json_body(BatchCreateRequest))
async def create_batch(request: Request) -> BatchObject:
    body = await read_json(request, BatchCreateRequest, "POST /v1/batches takes application/json")
    tenant, now = tenant_of(request), int(time.time())
    _check_input_file(await request.app.state.files.get(tenant, body.input_file_id), body.input_file_id)
    batch = BatchObject(id=new_batch_id(), endpoint=body.endpoint, input_file_id=body.input_file_id,
                        completion_window=body.completion_window, status="validating", created_at=now,
                        expires_at=now + request.app.state.settings.batch_completion_window_s,
                        request_counts={"total": 0, "completed": 0, "failed": 0}, metadata=body.metadata,
                        model=request.app.state.service.model.name).model_dump()
    batch[CALLER] = caller_of(request.scope)
    await request.app.state.batch_runner.create(tenant, batch)
    return BatchObject(**batch)


@router.get("/v1/batches/{batch_id}", response_model=BatchObject)
async def get_batch(request: Request, batch_id: str) -> BatchObject:
    return BatchObject(**await _batch(request, batch_id))


@router.get("/v1/batches", response_model=BatchList)
async def list_batches(request: Request, after: str | None = None,
                       limit: int = Query(20, ge=1, le=100)) -> BatchList:
    """Newest first, a page of `limit` after the batch `after`, as OpenAI pages lists."""
    batches = sorted(await request.app.state.batches.list(tenant_of(request)),
                     key=lambda b: (b["created_at"], b["id"]), reverse=True)
    if after is not None:
        at = next((i for i, b in enumerate(batches) if b["id"] == after), None)
        batches = batches[at + 1:] if at is not None else []
    page = [BatchObject(**b) for b in batches[:limit]]
    return BatchList(data=page, first_id=page[0].id if page else None, last_id=page[-1].id if page else None,
                     has_more=len(batches) > limit)


@router.post("/v1/batches/{batch_id}/cancel", response_model=BatchObject)
async def cancel_batch(request: Request, batch_id: str) -> BatchObject:
    batch = await _batch(request, batch_id)
    if batch["status"] in FINAL_STATES:
        raise InputError(400, f"batch '{batch_id}' is {batch['status']}; only an unfinished batch can be cancelled",
                         "batch_id", code="batch_not_cancellable")
    return BatchObject(**await request.app.state.batch_runner.cancel(tenant_of(request), batch))
