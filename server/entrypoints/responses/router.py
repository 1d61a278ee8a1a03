"""OpenAI's Responses API: `POST /v1/responses`, `GET` and `DELETE /v1/responses/{id}`.

The input items become the chat /v1/chat/completions would make of the same parts. A stored response
(`store`, the default) keeps its conversation as text and attachment references, never bytes, so
`previous_response_id` continues it with nothing sent again: each attachment comes back from its
stored file when it had one, else by its uuid from the prefix caches."""

import itertools
import json
import re
import secrets
import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from server.entrypoints import protocol as schemas
from server.traffic.access import tenant_of
from server.core.answers import (Answer, StreamFailed, check_model, counted, sampling_fields, start_answer,
                                stream_failure, text_deltas, whole_text)
from server.media.fetch import fetch_all
from server.entrypoints.files.router import read_stored
from server.traffic.limits import check_chat
from server.core.chat import UPLOAD_FIELDS, Attachment, Chat, Turn, chat_from_openai, parse_json_body
from server.errors import InputError, RequestError
from server.media.modalities import MODALITIES
from server.traffic.routes import chat_route

responses_router = APIRouter()
# Responses parts that carry a URL, and the chat part each becomes
URL_PARTS = {"input_image": ("image_url", "image_url"), "input_video": ("video_url", "video_url")}


def _new_id(prefix: str) -> str:
    return prefix + secrets.token_hex(16)


def chat_messages(body: schemas.ResponsesRequest) -> list[dict]:
    """The input items as chat-completions messages, one per item, so that errors about a message
    name the same index as the item (`input[i]`)."""
    items = [{"role": "user", "content": body.input}] if isinstance(body.input, str) else body.input
    if not isinstance(items, list) or not items:
        raise InputError(400, "input is text or a list of messages, at least one", "input")
    return [_chat_message(item, f"input[{i}]") for i, item in enumerate(items)]


def _chat_message(item, where: str) -> dict:
    # any JSON value may come here: beyond the type checks, only == comparisons, which never raise
    if not isinstance(item, dict):
        raise InputError(400, "an input item is a message: an object with a 'role' and 'content'", where)
    kind = item.get("type", "message")
    if kind != "message":
        raise InputError(400, f"input items of type {kind!r} are not supported; send messages", f"{where}.type")
    role = "system" if item.get("role") == "developer" else item.get("role")
    if role not in ("system", "user", "assistant"):
        raise InputError(400, "an input message's role is user, assistant, system or developer", f"{where}.role")
    content = item.get("content")
    if isinstance(content, list):
        content = [_chat_part(part, f"{where}.content[{j}]") for j, part in enumerate(content)]
    elif content is not None and not isinstance(content, str):
        raise InputError(400, "a message's content is text or a list of content parts", f"{where}.content")
    return {"role": role, "content": content}


def _nested(part: dict) -> bool:
    """Whether a media part nests its body as chat parts do ({"input_fmri": {"data": ...}}) rather
    than carrying it flat as Responses parts do."""
    return part["type"] not in URL_PARTS and isinstance(part.get(part["type"]), dict)


def _given(part: dict, *keys: str) -> dict:
    # a client may send a key it does not use as null
    return {k: part[k] for k in keys if part.get(k) is not None}


def _chat_part(part, where: str) -> dict:
    """One Responses content part -> the chat-completions part that carries the same thing."""
    if not isinstance(part, dict) or not isinstance(part.get("type"), str):
        raise InputError(400, "a content part is an object with a 'type'", where)
    kind = part["type"]
    uuid = _given(part, "uuid")
    if kind in ("input_text", "output_text"):
        return {"type": "text", "text": part.get("text", "")}
    if kind in URL_PARTS:
        chat_kind, url_key = URL_PARTS[kind]
        body = _given(part, "file_id") or ({"url": part[url_key]} if part.get(url_key) is not None else None)
        return {"type": chat_kind, chat_kind: body, **uuid}
    if kind == "input_file":
        return {"type": "file", "file": _given(part, "file_id", "file_data", "filename"), **uuid}
    if kind.startswith("input_") and kind[6:] in UPLOAD_FIELDS:
        body = part[kind] if _nested(part) else _given(part, "data", "file_id", "sample_rate", "format") or None
        return {"type": kind, kind: body, **uuid}
    raise InputError(400, f"unsupported content part type {kind!r}", f"{where}.type")


# a param inside a media part of the chat made of the input: the part, its body's key, the key in it
PART_PARAM = re.compile(r"(input\[(\d+)\]\.content\[(\d+)\])\.(\w+)\.(\w+)")


def _renamed(error: RequestError, body: schemas.ResponsesRequest) -> RequestError:
    """An error about the chat made of the input, naming the input instead: the item, and the
    place in a flat part (`image_url`, `data`, `file_id`) where its chat part nests it."""
    param = error.param
    if not param or not param.startswith("messages"):
        return error
    if isinstance(body.input, str):  # the one message the text became
        return InputError(error.status, error.message, "input" + param.removeprefix("messages").removeprefix("[0]"),
                          error.headers, error.code)
    param = "input" + param.removeprefix("messages")
    if match := PART_PARAM.fullmatch(param):
        where, item, index, body_key, key = match.groups()
        if not _nested(body.input[int(item)]["content"][int(index)]):
            param = f"{where}.{body_key if key == 'url' else key}"
    return InputError(error.status, error.message, param, error.headers, error.code)


def _record(chat: Chat, system: str | None, answer: Answer, text: str) -> dict:
    """The conversation as a stored response keeps it: the input's system message (instructions
    belong to their request alone, as in OpenAI's API), the turns that were in the prompt, each
    attachment as its modality, uuid and stored files, and the answer."""
    prepared = answer.generation.prepared
    keys = iter(prepared.media)
    turns = [{"role": t.role, "text": t.text,
              "attachments": [{"modality": a.modality, "uuid": next(keys), "options": a.options,
                               "file_ids": a.file_ids} for a in t.attachments]}
             for t in chat.turns[prepared.first_turn:]]
    return {"system": system, "turns": turns + [{"role": "assistant", "text": text, "attachments": []}]}


async def _stored_turns(request: Request, record: dict) -> list[Turn]:
    turns = []
    for turn in record["turns"]:
        attachments = []
        for a in turn["attachments"]:
            fields = MODALITIES[a["modality"]].fields
            if set(fields) <= a["file_ids"].keys():  # its stored files outlive any cache
                files = {f: (await read_stored(request, a["file_ids"][f], "previous_response_id"))[1] for f in fields}
                attachments.append(Attachment(a["modality"], files, a["options"], file_ids=a["file_ids"]))
            else:
                attachments.append(Attachment(a["modality"], {}, a["options"], {fields[0]: "previous_response_id"},
                                              reference=a["uuid"]))
        turns.append(Turn(turn["role"], turn["text"], attachments))
    return turns


async def _previous(request: Request, response_id: str) -> dict:
    record = await request.app.state.stored_responses.get(tenant_of(request), response_id)
    if record is None:
        raise InputError(400, f"no stored response '{response_id}' for this API key (it may have expired, been "
                              "deleted, or been made with store=false)", "previous_response_id",
                         code="previous_response_not_found")
    return json.loads(record)


async def _read_chat(request: Request, body: schemas.ResponsesRequest) -> tuple[Chat, str | None]:
    """The chat to answer (the stored conversation previous_response_id names, then the input, with
    the instructions first in its system prompt) and the conversation's own system message."""
    completion = schemas.ChatCompletionRequest.model_validate(
        {"messages": chat_messages(body), "imu_sample_rate": body.imu_sample_rate})
    record = await _previous(request, body.previous_response_id) if body.previous_response_id else None
    earlier = sum(len(turn["attachments"]) for turn in record["turns"]) if record else 0
    fetched = await fetch_all(request, completion, earlier)
    chat = await request.app.state.service.off_loop(chat_from_openai, completion, fetched)
    system = chat.system
    if record:
        chat.turns = await _stored_turns(request, record) + chat.turns
        system = system or record.get("system")  # records made before system messages were kept have none
    chat.system = "\n".join(filter(None, [body.instructions, system])) or None
    return chat, system


def _response(base: dict, message_id: str, answer: Answer, text: str) -> schemas.ResponseObject:
    """The finished response; incomplete when the answer was cut at max_output_tokens (or at the
    end of the context window)."""
    usage, prepared = answer.generation.usage, answer.generation.prepared
    status = "incomplete" if usage.finish_reason == "length" else "completed"
    return schemas.ResponseObject(
        **base, status=status,
        output=[schemas.OutputMessage(id=message_id, status=status, content=[schemas.OutputText(text=text)])],
        usage=schemas.ResponseUsage(input_tokens=prepared.prompt_tokens, output_tokens=usage.completion_tokens,
                                    total_tokens=prepared.prompt_tokens + usage.completion_tokens,
                                    media=prepared.media or None),
        incomplete_details={"reason": "max_output_tokens"} if status == "incomplete" else None)


@responses_router.post("/v1/responses", response_model=schemas.ResponseObject,
                       responses=schemas.STREAM_RESPONSE, openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                           "schema": {"$ref": "#/components/schemas/ResponsesRequest"}}}}})
@chat_route
async def create_response(request: Request) -> Response:
    content_type = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    if content_type != "application/json" and not content_type.endswith("+json"):
        raise InputError(415, "POST /v1/responses takes application/json")
    service, settings, tenant = request.app.state.service, request.app.state.settings, tenant_of(request)
    body = await service.off_loop(parse_json_body, [chunk async for chunk in request.stream()], schemas.ResponsesRequest)
    check_model(service, body.model)
    if body.tools:
        raise InputError(400, "this server runs no tools: send the request without 'tools'", "tools")
    temperature, top_p = body.temperature if body.temperature is not None else 0.0, body.top_p or 1.0
    try:  # until the answer starts, errors about the chat name the input it was made of
        chat, system = await _read_chat(request, body)
        check_chat(chat, settings, body.max_output_tokens, "max_output_tokens", "input")
        request.state.counted = True
        answer = await start_answer(service, chat, sampling_fields(body.max_output_tokens, temperature, top_p, None,
                                                                   body.seed), tenant, time.monotonic())
    except RequestError as e:
        raise _renamed(e, body) from None
    media = answer.generation.prepared.media
    header = {"X-Media-UUIDs": ",".join(media)} if media else {}
    base = dict(id=_new_id("resp_"), created_at=schemas.now(), model=service.model.name, instructions=body.instructions,
                previous_response_id=body.previous_response_id, store=body.store,
                max_output_tokens=body.max_output_tokens, temperature=temperature, top_p=top_p,
                metadata=body.metadata or {})
    message_id = _new_id("msg_")

    async def finish(text: str) -> schemas.ResponseObject:
        response = _response(base, message_id, answer, text)
        if body.store:
            record = {"response": response.model_dump(), **_record(chat, system, answer, text)}
            await request.app.state.stored_responses.put(tenant, response.id, json.dumps(record).encode())
        return response

    if body.stream:
        return StreamingResponse(counted(response_events(answer, base, message_id, finish), answer),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **header})
    response = await finish(await whole_text(answer))
    return JSONResponse(response.model_dump(), headers=header)


async def response_events(answer: Answer, base: dict, message_id: str, finish):
    """The Responses API's stream: created, in_progress, the message and its text part opened, text
    deltas, each closed, then completed (or incomplete); a failure after the start is response.failed."""
    sequence = itertools.count()

    def event(kind: str, **data) -> str:
        return f"event: {kind}\ndata: {json.dumps({'type': kind, 'sequence_number': next(sequence), **data})}\n\n"

    where = {"item_id": message_id, "output_index": 0, "content_index": 0}
    started = schemas.ResponseObject(**base, status="in_progress", output=[]).model_dump()
    yield event("response.created", response=started)
    yield event("response.in_progress", response=started)
    yield event("response.output_item.added", output_index=0, item=schemas.OutputMessage(
        id=message_id, status="in_progress", content=[]).model_dump())
    yield event("response.content_part.added", **where, part=schemas.OutputText(text="").model_dump())
    text = ""
    try:
        async for delta in text_deltas(answer):
            text += delta
            yield event("response.output_text.delta", **where, delta=delta, logprobs=[])
        response = await finish(text)
    except Exception as e:  # noqa: BLE001 - whatever failed, the client is told so and the stream ends
        error = stream_failure(e)
        failed = schemas.ResponseObject(**base, status="failed", output=[],
                                        error={"code": "server_error", "message": error.message}).model_dump()
        yield event("response.failed", response=failed)
        raise StreamFailed(error.status) from None
    yield event("response.output_text.done", **where, text=text, logprobs=[])
    yield event("response.content_part.done", **where, part=schemas.OutputText(text=text).model_dump())
    yield event("response.output_item.done", output_index=0, item=response.output[0].model_dump())
    yield event(f"response.{response.status}", response=response.model_dump())


@responses_router.get("/v1/responses/{response_id}", response_model=schemas.ResponseObject)
async def get_response(request: Request, response_id: str) -> JSONResponse:
    record = await request.app.state.stored_responses.get(tenant_of(request), response_id)
    if record is None:
        raise InputError(404, f"no stored response '{response_id}'", "response_id", code="response_not_found")
    return JSONResponse(json.loads(record)["response"])


@responses_router.delete("/v1/responses/{response_id}", response_model=schemas.ResponseDeleted)
async def delete_response(request: Request, response_id: str) -> schemas.ResponseDeleted:
    records, tenant = request.app.state.stored_responses, tenant_of(request)
    if await records.get(tenant, response_id) is None:
        raise InputError(404, f"no stored response '{response_id}'", "response_id", code="response_not_found")
    await records.delete(tenant, response_id)
    return schemas.ResponseDeleted(id=response_id, deleted=True)
