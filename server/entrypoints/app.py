"""The FastAPI gateway: routes, error bodies, SSE framing, and start-up/shutdown in the lifespan."""

import gc
import json
import logging
import time
from contextlib import asynccontextmanager
from pathlib import Path

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, Field, ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from server.entrypoints import protocol as schemas
from server.traffic.access import Gate, RequestIds, load_api_keys, tenant_of
from server.traffic.admission import Admission, ChatGuard, sse_error
from server.traffic.routes import chat_route, kind_of
from server.core.answers import (Answer, StreamFailed, check_model, counted, engine_unavailable, sampling_fields,
                                start_answer, stream_failure, text_deltas, whole_text)
from server.budget import split_of
from server.media.fetch import fetch_all
from server.entrypoints.files.router import files_router, read_stored
from server.storage.files import file_store_for
from server.traffic.intake import Intake
from server.traffic.limits import BodyLimit, check_attachment_count, check_chat, read_form
from server.metrics import Metrics
from server.traffic.quotas import CallerQuotas, Quota
from server.storage.records import MediaReferences, Records
from server.entrypoints.responses.router import responses_router
from server.core.service import ChatService, chat_service_for
from server.config import MiB, Settings
from server.cache.redis_client import SharedRedis
from server.cache.shared_prefixes import shared_cache_for
from server.core.chat import (SANE_UUID, SINGLE_FIELDS, UPLOAD_FIELDS, Chat, Upload, attachment_count, chat_from_form,
                                chat_from_openai, parse_json_body)
from server.engines.base import Engine, EngineUnavailable
from server.errors import InputError, RequestError, Unavailable
from server.model.onellm import OneLLM, load_model

log = logging.getLogger("onellm.gateway")
STATIC_DIR = Path(__file__).parent / "static"
FORM_FIELDS = {"prompt", "messages", "model", "max_tokens", "temperature", "top_p", "stop", "seed", "stream",
               "imu_sample_rate"}
# `video_ref=<uuid>`: an attachment sent before, by the uuid the gateway returned (X-Media-UUIDs);
# `video_file_id=<id>`: a file stored with POST /v1/files. A depth or normal map goes with its image,
# so its pair is referred to by the image's uuid
REF_FIELDS = {f"{name}_ref": name for name in SINGLE_FIELDS}
FILE_ID_FIELDS = {f"{name}_file_id": name for name in UPLOAD_FIELDS}
# lets a client that sent no uuid refer back to what it sent (see uploads.py for the parts)
MEDIA_HEADER = "X-Media-UUIDs"


class ChatForm(BaseModel):
    """The text fields of `POST /v1/chat` (multipart), validated like the JSON endpoint's."""

    prompt: str | None = None
    messages: str | None = None
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: str | None = None
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)
    stream: bool = True
    imu_sample_rate: float = Field(default=200.0, gt=0.0, le=10000.0)


def build_engine(settings: Settings, model: OneLLM, metrics: Metrics) -> Engine:
    if urls := settings.vllm_urls():
        from server.engines.replicas import ReplicatedVLLMEngine
        # the embeddings travel as they were made
        return ReplicatedVLLMEngine(urls, metrics, settings.routing, dtype=model.dtype)
    from server.engines.local import LocalEngine
    return LocalEngine(model.path / "llm", device=settings.device, dtype=model.dtype)


def error_response(error: RequestError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def document_models(app: FastAPI, *models: type[BaseModel]) -> None:
    """Puts the schemas of request bodies that endpoints read themselves (so FastAPI does not
    know them) into the OpenAPI document's components, where their endpoints refer to them."""
    generate = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            components = generate().setdefault("components", {}).setdefault("schemas", {})
            for model in models:
                schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(schema.pop("$defs", {}), **{model.__name__: schema})
        return app.openapi_schema

    app.openapi = openapi


def add_guards(app: FastAPI, settings: Settings) -> None:
    """The middlewares. Each added one wraps the ones before it, so a request meets them bottom
    to top: request id, CORS, API key and draining, the caller's quotas, body size, the body's
    way in (upload places, memory, slow bodies), admission once the body is in."""
    metrics = app.state.metrics
    keys = load_api_keys(settings.api_keys, settings.api_keys_file)
    admission = Admission(settings.max_concurrent, settings.max_queued)
    metrics.admission_waiting.set_function(lambda: admission.waiting)
    app.add_middleware(ChatGuard, admission=admission, timeout_s=settings.request_timeout_s, metrics=metrics)
    app.add_middleware(Intake, settings=settings, metrics=metrics)
    app.add_middleware(BodyLimit, limit=settings.max_request_bytes)
    app.add_middleware(CallerQuotas, default=Quota(settings.key_max_concurrent, settings.key_requests_per_minute),
                       keys=keys, metrics=metrics)
    app.add_middleware(Gate, keys=keys, draining=lambda: app.state.draining)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins),
                           allow_methods=["GET", "POST", "DELETE"],
                           allow_headers=["Authorization", "Content-Type", "X-Request-ID"],
                           expose_headers=["X-Request-ID", "Retry-After", MEDIA_HEADER])
    app.add_middleware(RequestIds)


def create_app(settings: Settings, model: OneLLM | None = None, engine: Engine | None = None) -> FastAPI:
    """The gateway app; `model` and `engine` are loaded in the lifespan unless given."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        nonlocal model, engine
        dtype = getattr(torch, settings.dtype) if settings.dtype else None
        model = model or load_model(settings.model, device=settings.device, dtype=dtype)
        engine = engine or build_engine(settings, model, app.state.metrics)
        split = split_of(settings)
        log.info("memory budget %.0f MiB: %s", settings.memory_budget_mb, split.describe())
        if split.total > settings.memory_budget_mb * MiB:
            log.warning("the memory limits set add up to %.0f MiB, more than memory_budget_mb (%.0f MiB)",
                        split.total / MiB, settings.memory_budget_mb)
        if model.config.get("random_weights"):
            log.warning("model '%s' has random weights: its answers are meaningless", model.name)
        shared_redis = shared_cache = None
        if settings.cache_url:
            shared_redis = SharedRedis(settings.cache_url, settings.cache_timeout_ms / 1000, app.state.metrics)
            await shared_redis.start()  # a Redis that is down does not stop the gateway from serving
            shared_cache = shared_cache_for(shared_redis, model, settings.cache_ttl_s)
        references = MediaReferences(Records(f"onellm:ref:{model.name}:", int(settings.references_mb * MiB),
                                             settings.cache_ttl_s, shared_redis))
        app.state.stored_responses = Records(f"onellm:response:{model.name}:", int(settings.stored_responses_mb * MiB),
                                             settings.response_ttl_s, shared_redis)
        app.state.files = file_store_for(settings)
        await app.state.files.start()
        app.state.service = chat_service_for(settings, model, engine, app.state.metrics, shared_cache, references)
        # torch, transformers and the model are ~0.5 M objects that live as long as the process; a
        # full collection walked them all, 190-290 ms with every stream stopped. Frozen, it skips them
        gc.collect()
        gc.freeze()
        log.info("serving model '%s' on the %s engine", model.name, engine.name)
        yield
        gc.unfreeze()  # so that they are freed at exit as usual
        app.state.service.close()
        await app.state.files.close()
        if shared_redis:
            await shared_redis.close()
        await engine.close()

    errors = {status: {"model": schemas.ErrorResponse} for status in (400, 401, 404, 408, 413, 415, 422, 429, 503, 504)}
    app = FastAPI(title="OneLLM Serve", version="0.1.0", lifespan=lifespan, responses=errors)
    app.state.metrics = Metrics()
    app.state.settings = settings
    app.state.draining = False  # set by `onellm serve` on SIGTERM
    add_guards(app, settings)

    def count_refused(request: Request, error: RequestError) -> JSONResponse:
        """A chat request refused before its chat was read (bad form, unknown model, ...) counts too."""
        if kind_of(request.scope) == "chat" and not getattr(request.state, "counted", False):
            app.state.metrics.requests.labels("unread", str(error.status)).inc()
        return error_response(error)

    @app.exception_handler(RequestError)
    async def on_request_error(request: Request, e: RequestError):
        return count_refused(request, e)

    @app.exception_handler(EngineUnavailable)
    async def on_engine_down(request: Request, e: EngineUnavailable):
        log.warning("the LLM engine is unavailable: %s", e)
        return error_response(engine_unavailable())

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, e: RequestValidationError):
        first = e.errors()[0]
        loc = [str(p) for p in first["loc"] if p != "body"]
        return count_refused(request, InputError(400, f"{'.'.join(loc) or 'body'}: {first['msg']}", ".".join(loc) or None))

    @app.exception_handler(HTTPException)
    async def on_http(request: Request, e: HTTPException):
        return error_response(InputError(e.status_code, str(e.detail)))

    @app.exception_handler(Exception)
    async def on_bug(request: Request, e: Exception):
        log.exception("unexpected error on %s", request.url.path)
        return JSONResponse({"error": {"type": "internal_error", "message": "internal server error", "param": None}},
                            status_code=500)

    async def respond(request: Request, chat: Chat, sampling: dict, stream: bool, include_usage: bool) -> Response:
        request.state.counted = True  # from here on every ending is counted under the chat's modalities
        service: ChatService = app.state.service
        answer = await start_answer(service, chat, sampling, tenant_of(request), time.monotonic())
        headers = {MEDIA_HEADER: ",".join(answer.generation.prepared.media)} if answer.generation.prepared.media else {}
        if stream:
            return StreamingResponse(counted(sse_events(answer, service.model.name, include_usage), answer),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **headers})
        text = await whole_text(answer)
        usage = answer.generation.usage
        return JSONResponse(schemas.ChatCompletion(
            id=schemas.completion_id(), created=schemas.now(), model=service.model.name,
            choices=[schemas.Choice(message=schemas.ResponseMessage(content=text), finish_reason=usage.finish_reason)],
            usage=chat_usage(answer),
        ).model_dump(exclude_none=True), headers=headers)

    # the body is read here rather than by FastAPI, which would parse it on the event loop
    @app.post("/v1/chat/completions", response_model=schemas.ChatCompletion, responses=schemas.STREAM_RESPONSE,
              openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                  "schema": {"$ref": "#/components/schemas/ChatCompletionRequest"}}}}})
    @chat_route
    async def chat_completions(request: Request) -> Response:
        content_type = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
        if content_type != "application/json" and not content_type.endswith("+json"):
            raise InputError(415, "POST /v1/chat/completions takes application/json; multipart goes to /v1/chat")
        service: ChatService = app.state.service
        body = await service.off_loop(parse_json_body, [chunk async for chunk in request.stream()],
                                     schemas.ChatCompletionRequest)
        check_model(service, body.model)
        chat = await service.off_loop(chat_from_openai, body, await fetch_all(request, body))
        max_tokens = body.max_completion_tokens or body.max_tokens
        check_chat(chat, settings, max_tokens, "max_completion_tokens" if body.max_completion_tokens else "max_tokens")
        return await respond(request, chat, sampling_fields(max_tokens, body.temperature, body.top_p, body.stop, body.seed),
                             body.stream, bool(body.stream_options and body.stream_options.include_usage))

    @app.post("/v1/chat", response_model=schemas.ChatCompletion, responses=schemas.STREAM_RESPONSE,
              openapi_extra={"requestBody": {"content": {"multipart/form-data": {"schema": {"type": "object"}}}}})
    @chat_route
    async def chat(request: Request) -> Response:
        if not request.headers.get("content-type", "").startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
            raise InputError(415, "POST /v1/chat takes multipart/form-data (curl -F); JSON goes to /v1/chat/completions")
        # an image with its depth or normal map is one attachment in two files
        async with read_form(request, settings.max_file_bytes, 2 * settings.max_attachments, 64) as form:
            # the attachments of its files, references and stored files, counted before any is read
            media = [REF_FIELDS.get(name) or FILE_ID_FIELDS.get(name) or name for name, _ in form.multi_items()
                     if name in REF_FIELDS or name in FILE_ID_FIELDS or name in UPLOAD_FIELDS]
            check_attachment_count(attachment_count(media), settings.max_attachments)
            texts, uploads = {}, []
            for name, value in form.multi_items():
                if isinstance(value, UploadFile):
                    if name not in UPLOAD_FIELDS:
                        raise InputError(400, f"unknown upload field '{name}'; accepted: {', '.join(UPLOAD_FIELDS)}", name)
                    uploads.append(Upload(name, await value.read()))
                elif name in UPLOAD_FIELDS:
                    raise InputError(400, f"'{name}' must be a file upload (curl -F {name}=@file)", name)
                elif name in REF_FIELDS:
                    if not SANE_UUID.fullmatch(value):
                        raise InputError(400, "a uuid is 1 to 128 letters, digits or ._:@/+=-", name)
                    uploads.append(Upload(REF_FIELDS[name], None, name, value))
                elif name in FILE_ID_FIELDS:
                    _, data = await read_stored(request, value, name)
                    uploads.append(Upload(FILE_ID_FIELDS[name], data, name, None, value))
                elif name not in FORM_FIELDS:
                    raise InputError(400, f"unknown form field '{name}'", name)
                else:
                    texts[name] = value
        try:
            fields = ChatForm.model_validate(texts)
        except ValidationError as e:
            first = e.errors()[0]
            raise InputError(400, f"{first['loc'][0]}: {first['msg']}", str(first["loc"][0])) from None
        check_model(app.state.service, fields.model)
        chat = chat_from_form(fields.prompt, fields.messages, uploads, {"imu_sample_rate": fields.imu_sample_rate})
        check_chat(chat, settings, fields.max_tokens, text_param="messages" if fields.messages else "prompt")
        stop = _form_stop(fields.stop)
        return await respond(request, chat, sampling_fields(fields.max_tokens, fields.temperature, fields.top_p, stop,
                                                   fields.seed), fields.stream, include_usage=False)

    @app.get("/v1/models", response_model=schemas.ModelList)
    async def models() -> schemas.ModelList:
        model = app.state.service.model
        return schemas.ModelList(data=[schemas.ModelCard(
            id=model.name, created=int(model.path.stat().st_mtime), modalities=model.encoder.modalities,
            random_weights=bool(model.config.get("random_weights")))])

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        service = getattr(app.state, "service", None)
        if service is None or not await service.engine.ready():
            engine = service.engine.name if service else "none"
            return error_response(Unavailable(f"not ready: the {engine} engine is not answering"))
        return JSONResponse({"status": "ready", "model": service.model.name, "engine": service.engine.name})

    @app.get("/metrics", responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}})
    async def metrics() -> Response:
        return Response(app.state.metrics.exposition(), media_type="text/plain; version=0.0.4")

    app.include_router(files_router)
    app.include_router(responses_router)
    document_models(app, schemas.ChatCompletionRequest, schemas.ResponsesRequest)

    @app.get("/", include_in_schema=False)
    async def page() -> Response:
        index = STATIC_DIR / "index.html"
        if not index.exists():
            raise InputError(404, "no web page is installed")
        return FileResponse(index)

    return app


def _form_stop(stop: str | None) -> str | list[str] | None:
    """A form's `stop` is one string, or a JSON list of strings."""
    if stop and stop.startswith("["):
        try:
            value = json.loads(stop)
        except json.JSONDecodeError:
            raise InputError(400, "stop: not a valid JSON list", "stop") from None
        if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
            raise InputError(400, "stop: expected a list of strings", "stop")
        return value
    return stop


def _chunk(cid: str, created: int, model: str, delta: schemas.Delta, finish: str | None = None,
           usage: schemas.Usage | None = None) -> str:
    chunk = schemas.ChatCompletionChunk(id=cid, created=created, model=model, usage=usage,
                                        choices=[] if usage else [schemas.ChunkChoice(delta=delta, finish_reason=finish)])
    return f"data: {chunk.model_dump_json(exclude_none=True)}\n\n"


def chat_usage(answer: Answer) -> schemas.Usage:
    prompt, done = answer.generation.prepared.prompt_tokens, answer.generation.usage.completion_tokens
    return schemas.Usage(prompt_tokens=prompt, completion_tokens=done, total_tokens=prompt + done,
                         media=answer.generation.prepared.media or None)


async def sse_events(answer: Answer, model: str, include_usage: bool):
    """OpenAI `chat.completion.chunk` events ending in `data: [DONE]`; any failure after the first is an
    `error` event, then `data: [DONE]`."""
    cid, created = schemas.completion_id(), schemas.now()
    yield _chunk(cid, created, model, schemas.Delta(role="assistant", content=""))
    try:
        async for delta in text_deltas(answer):
            yield _chunk(cid, created, model, schemas.Delta(content=delta))
        yield _chunk(cid, created, model, schemas.Delta(), finish=answer.generation.usage.finish_reason)
        if include_usage:
            yield _chunk(cid, created, model, schemas.Delta(), usage=chat_usage(answer))
    except Exception as e:  # noqa: BLE001 - whatever failed, the client is told so and the stream ends
        error = stream_failure(e)
        yield sse_error(error)
        raise StreamFailed(error.status) from None
    yield "data: [DONE]\n\n"
