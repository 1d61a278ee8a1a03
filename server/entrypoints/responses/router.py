"""OpenAI's Responses API: `POST /v1/responses`, `GET` and `DELETE /v1/responses/{id}`.

The input items become the chat /v1/chat/completions would make of the same parts; a stored
response (`store`, the default) keeps its conversation (stored.py) for `previous_response_id`."""

import itertools
import json
import secrets
from functools import partial

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from server.core.answers import (Answer, StreamFailed, check_model, sampling_fields, stream_failure, text_deltas,
                                 whole_text)
from server.core.chat import Chat, check_chat
from server.entrypoints.chats import chat_from_parts, fetcher_of, media_header, read_json, start
from server.entrypoints.protocol import STREAM_RESPONSE, json_body, now
from server.entrypoints.responses.parse import chat_from_items, input_items, references
from server.entrypoints.responses.protocol import (OutputMessage, OutputText, ResponseDeleted, ResponseObject,
                                                   ResponsesRequest, ResponseUsage)
from server.entrypoints.responses.stored import conversation_record, previous_record, stored_turns
from server.entrypoints.sse import event_stream, named_event
from server.errors import InputError
from server.traffic.access import tenant_of
from server.traffic.routes import chat_route

router = APIRouter()


def _new_id(prefix: str) -> str:
    return prefix + secrets.token_hex(16)


async def _read_chat(request: Request, body: ResponsesRequest) -> tuple[Chat, str | None]:
    """The chat to answer (the stored conversation previous_response_id names, then the input, with
    the instructions first in its system prompt) and the conversation's own system message."""
    items = input_items(body)
    record = await previous_record(request, body.previous_response_id) if body.previous_response_id else None
    earlier = sum(len(turn["attachments"]) for turn in record["turns"]) if record else 0
    parse = partial(chat_from_items, items, {"imu_sample_rate": body.imu_sample_rate})
    chat = await chat_from_parts(request, references(items), parse, earlier, "input")
    system = chat.system
    if record:
        chat.turns = await stored_turns(fetcher_of(request), record) + chat.turns
        system = system or record.get("system")  # records made before system messages were kept have none
    chat.system = "\n".join(filter(None, [body.instructions, system])) or None
    return chat, system


def _response(base: dict, message_id: str, answer: Answer, text: str) -> ResponseObject:
    """The finished response; incomplete when the answer was cut at max_output_tokens (or at the
    end of the context window)."""
    usage, prepared = answer.generation.usage, answer.generation.prepared
    status = "incomplete" if usage.finish_reason == "length" else "completed"
    return ResponseObject(
        **base, status=status,
        output=[OutputMessage(id=message_id, status=status, content=[OutputText(text=text)])],
        usage=ResponseUsage(input_tokens=prepared.prompt_tokens, output_tokens=usage.completion_tokens,
                            total_tokens=prepared.prompt_tokens + usage.completion_tokens,
                            media=prepared.media or None),
        incomplete_details={"reason": "max_output_tokens"} if status == "incomplete" else None)


@router.post("/v1/responses", response_model=ResponseObject, responses=STREAM_RESPONSE,
             openapi_extra=json_body(ResponsesRequest))
@chat_route
async def create_response(request: Request) -> Response:
    body = await read_json(request, ResponsesRequest, "POST /v1/responses takes application/json")
    check_model(request.app.state.service, body.model)
    if body.tools:
        raise InputError(400, "this server runs no tools: send the request without 'tools'", "tools")
    temperature, top_p = body.temperature if body.temperature is not None else 0.0, body.top_p or 1.0
    chat, system = await _read_chat(request, body)
    check_chat(chat, request.app.state.settings, body.max_output_tokens, "max_output_tokens", "input", "input")
    answer = await start(request, chat, sampling_fields(body.max_output_tokens, temperature, top_p, None, body.seed))
    base = dict(id=_new_id("resp_"), created_at=now(), model=request.app.state.service.model.name,
                instructions=body.instructions, previous_response_id=body.previous_response_id, store=body.store,
                max_output_tokens=body.max_output_tokens, temperature=temperature, top_p=top_p,
                metadata=body.metadata or {})
    message_id = _new_id("msg_")

    async def finish(text: str) -> ResponseObject:
        response = _response(base, message_id, answer, text)
        if body.store:
            record = {"response": response.model_dump(), **conversation_record(chat, system, answer, text)}
            await request.app.state.stored_responses.put(tenant_of(request), response.id, json.dumps(record).encode())
        return response

    if body.stream:
        return event_stream(response_events(answer, base, message_id, finish), answer, media_header(answer))
    response = await finish(await whole_text(answer))
    return JSONResponse(response.model_dump(), headers=media_header(answer))


async def response_events(answer: Answer, base: dict, message_id: str, finish):
    """The Responses API's stream: created, in_progress, the message and its text part opened, text
    deltas, each closed, then completed (or incomplete); a failure after the start is response.failed."""
    sequence = itertools.count()

    def event(kind: str, **data) -> str:
        return named_event(kind, {"type": kind, "sequence_number": next(sequence), **data})

    where = {"item_id": message_id, "output_index": 0, "content_index": 0}
    started = ResponseObject(**base, status="in_progress", output=[]).model_dump()
    yield event("response.created", response=started)
    yield event("response.in_progress", response=started)
    yield event("response.output_item.added", output_index=0, item=OutputMessage(
        id=message_id, status="in_progress", content=[]).model_dump())
    yield event("response.content_part.added", **where, part=OutputText(text="").model_dump())
    text = ""
    try:
        async for delta in text_deltas(answer):
            text += delta
            yield event("response.output_text.delta", **where, delta=delta, logprobs=[])
        response = await finish(text)
    except Exception as e:  # noqa: BLE001 - whatever failed, the client is told so and the stream ends
        error = stream_failure(e)
        failed = ResponseObject(**base, status="failed", output=[],
                                error={"code": "server_error", "message": error.message}).model_dump()
        yield event("response.failed", response=failed)
        raise StreamFailed(error.status) from None
    yield event("response.output_text.done", **where, text=text, logprobs=[])
    yield event("response.content_part.done", **where, part=OutputText(text=text).model_dump())
    yield event("response.output_item.done", output_index=0, item=response.output[0].model_dump())
    yield event(f"response.{response.status}", response=response.model_dump())


@router.get("/v1/responses/{response_id}", response_model=ResponseObject)
async def get_response(request: Request, response_id: str) -> JSONResponse:
    record = await request.app.state.stored_responses.get(tenant_of(request), response_id)
    if record is None:
        raise InputError(404, f"no stored response '{response_id}'", "response_id", code="response_not_found")
    return JSONResponse(json.loads(record)["response"])


@router.delete("/v1/responses/{response_id}", response_model=ResponseDeleted)
async def delete_response(request: Request, response_id: str) -> ResponseDeleted:
    records, tenant = request.app.state.stored_responses, tenant_of(request)
    if await records.get(tenant, response_id) is None:
        raise InputError(404, f"no stored response '{response_id}'", "response_id", code="response_not_found")
    await records.delete(tenant, response_id)
    return ResponseDeleted(id=response_id, deleted=True)
