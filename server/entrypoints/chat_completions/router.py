"""`POST /v1/chat/completions`, and the chat completion (or its `chat.completion.chunk` events) that
answers it and the multipart `POST /v1/chat`."""

from functools import partial

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from server.core.answers import (Answer, StreamFailed, check_model, sampling_fields, stream_failure, text_deltas,
                                 whole_text)
from server.core.chat import Chat, check_chat
from server.entrypoints.chat_completions.parse import chat_from_openai, references
from server.entrypoints.chat_completions.protocol import (ChatCompletion, ChatCompletionChunk, ChatCompletionRequest,
                                                          Choice, ChunkChoice, Delta, ResponseMessage, Usage,
                                                          completion_id)
from server.entrypoints.chats import chat_from_parts, media_header, read_json, start
from server.entrypoints.protocol import STREAM_RESPONSE, json_body, now
from server.entrypoints.sse import DONE, data_event, error_event, event_stream
from server.traffic.routes import chat_route

router = APIRouter()


@router.post("/v1/chat/completions", response_model=ChatCompletion, responses=STREAM_RESPONSE,
             openapi_extra=json_body(ChatCompletionRequest))
@chat_route
async def chat_completions(request: Request) -> Response:
    body = await read_json(request, ChatCompletionRequest,
                           "POST /v1/chat/completions takes application/json; multipart goes to /v1/chat")
    check_model(request.app.state.service, body.model)
    chat = await chat_from_parts(request, references(body), partial(chat_from_openai, body))
    max_tokens = body.max_completion_tokens or body.max_tokens
    check_chat(chat, request.app.state.settings, max_tokens,
               "max_completion_tokens" if body.max_completion_tokens else "max_tokens")
    return await respond(request, chat, sampling_fields(max_tokens, body.temperature, body.top_p, body.stop, body.seed),
                         body.stream, bool(body.stream_options and body.stream_options.include_usage))


async def respond(request: Request, chat: Chat, sampling: dict, stream: bool, include_usage: bool) -> Response:
    """The answer to `chat` as a chat completion, whole or as its chunks."""
    answer = await start(request, chat, sampling)
    model = request.app.state.service.model.name
    if stream:
        return event_stream(chunk_events(answer, model, include_usage), answer, media_header(answer))
    text = await whole_text(answer)
    return JSONResponse(ChatCompletion(
        id=completion_id(), created=now(), model=model,
        choices=[Choice(message=ResponseMessage(content=text), finish_reason=answer.generation.usage.finish_reason)],
        usage=chat_usage(answer),
    ).model_dump(exclude_none=True), headers=media_header(answer))


def chat_usage(answer: Answer) -> Usage:
    prompt, done = answer.generation.prepared.prompt_tokens, answer.generation.usage.completion_tokens
    return Usage(prompt_tokens=prompt, completion_tokens=done, total_tokens=prompt + done,
                 media=answer.generation.prepared.media or None)


def _chunk(cid: str, created: int, model: str, delta: Delta, finish: str | None = None,
           usage: Usage | None = None) -> str:
    chunk = ChatCompletionChunk(id=cid, created=created, model=model, usage=usage,
                                choices=[] if usage else [ChunkChoice(delta=delta, finish_reason=finish)])
    return data_event(chunk.model_dump_json(exclude_none=True))


async def chunk_events(answer: Answer, model: str, include_usage: bool):
    """OpenAI `chat.completion.chunk` events ending in `data: [DONE]`; any failure after the first is an
    `error` event, then `data: [DONE]`."""
    cid, created = completion_id(), now()
    yield _chunk(cid, created, model, Delta(role="assistant", content=""))
    try:
        async for delta in text_deltas(answer):
            yield _chunk(cid, created, model, Delta(content=delta))
        yield _chunk(cid, created, model, Delta(), finish=answer.generation.usage.finish_reason)
        if include_usage:
            yield _chunk(cid, created, model, Delta(), usage=chat_usage(answer))
    except Exception as e:  # noqa: BLE001 - whatever failed, the client is told so and the stream ends
        error = stream_failure(e)
        yield error_event(error)
        raise StreamFailed(error.status) from None
    yield DONE
