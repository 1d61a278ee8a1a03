"""The app factory: the FastAPI app with its routers, error handlers and middlewares, and the
lifespan that loads the model and engine and starts and stops the stores."""

import asyncio
import gc
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from pydantic import BaseModel

from server import tracing
from server.budget import split_of
from server.cache.shared_prefixes import shared_cache_for
from server.config import MiB, Settings
from server.cache.redis_client import SharedRedis
from server.core.batches import BatchRunner
from server.core.service import chat_service_for
from server.core.warm_up import warm_up
from server.engines.base import Engine
from server.engines.priority import LiveTraffic
from server.entrypoints.batches.lines import input_reader, line_sender
from server.entrypoints.batches.protocol import BatchCreateRequest
from server.entrypoints.batches.router import router as batches_router
from server.entrypoints.chat_completions.protocol import ChatCompletionRequest
from server.entrypoints.chat_completions.router import router as chat_completions_router
from server.entrypoints.chat_form.router import router as chat_form_router
from server.entrypoints.chats import MEDIA_HEADER
from server.entrypoints.error_handlers import add_error_handlers
from server.entrypoints.files.router import router as files_router
from server.entrypoints.loop_lag import record_loop_lag
from server.entrypoints.protocol import ErrorResponse
from server.entrypoints.responses.protocol import ResponsesRequest
from server.entrypoints.responses.router import router as responses_router
from server.entrypoints.sse import error_event
from server.entrypoints.system import router as system_router
from server.metrics import Metrics
from server.model.onellm import OneLLM, load_model
from server.storage.files import batch_store_for, file_store_for
from server.storage.records import MediaReferences, Records
from server.traffic.access import Gate, RequestIds, load_api_keys
from server.traffic.admission import BATCH, Admission, ChatGuard
from server.traffic.intake import Intake
from server.traffic.limits import BodyLimit
from server.traffic.quotas import CallerQuotas, Quota
from server.traffic.shared_quotas import SharedQuotas
from server.traffic.traces import RequestSpans

log = logging.getLogger("onellm.gateway")
ERROR_STATUSES = (400, 401, 404, 408, 413, 415, 422, 429, 503, 504)


def build_engine(settings: Settings, model: OneLLM, metrics: Metrics, live: LiveTraffic | None = None) -> Engine:
    """`live`: the online requests being served, which the embedded engine's batch streams yield to."""
    if urls := settings.vllm_urls():
        from server.engines.replicas import ReplicatedVLLMEngine
        # vLLM serves the weights in their own dtype unless told otherwise, as the gateway's --dtype
        # would tell it; the encoder's choice on this machine's CPU says nothing about vLLM's device
        wire = model.dtype if model.compute.asked else model.stored_dtype
        return ReplicatedVLLMEngine(urls, metrics, settings.routing, dtype=wire,
                                    load_interval_s=settings.replica_load_interval_s,
                                    kv_threshold=settings.replica_kv_threshold)
    from server.engines.llamacpp import LlamaCppEngine, quantized_weights
    if gguf := quantized_weights(settings.llm_weights, model.path, settings.device):
        return LlamaCppEngine(gguf, model.path / "llm" / "tokenizer.model", model.config["llm"]["max_positions"],
                              sequences=settings.llm_sequences, live=live)
    from server.engines.local import LocalEngine
    return LocalEngine(model.path / "llm", device=settings.device, dtype=model.dtype, live=live)


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
    way in (upload places, memory, slow bodies), admission once the body is in. A chat's span
    (traffic/traces.py) starts right after its request id, so it covers all the others."""
    metrics = app.state.metrics
    keys = load_api_keys(settings.api_keys, settings.api_keys_file)
    admission = Admission(settings.max_concurrent, settings.max_queued, settings.batch_beside_online,
                          app.state.live)
    metrics.admission_waiting.set_function(lambda: admission.waiting)
    metrics.batch_lines_waiting.set_function(lambda: admission.waiting_at(BATCH))
    app.add_middleware(ChatGuard, admission=admission, timeout_s=settings.request_timeout_s, metrics=metrics,
                       stream_error=error_event)
    app.add_middleware(Intake, settings=settings, metrics=metrics)
    app.add_middleware(BodyLimit, limit=settings.max_request_bytes)
    app.add_middleware(CallerQuotas, default=Quota(settings.key_max_concurrent, settings.key_requests_per_minute),
                       keys=keys, metrics=metrics, shared=lambda: app.state.shared_quotas)
    app.add_middleware(Gate, keys=keys, draining=lambda: app.state.draining)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins),
                           allow_methods=["GET", "POST", "DELETE"],
                           allow_headers=["Authorization", "Content-Type", "X-Request-ID"],
                           expose_headers=["X-Request-ID", "Retry-After", MEDIA_HEADER])
    app.add_middleware(RequestSpans)
    app.add_middleware(RequestIds)


async def start_batches(app: FastAPI, settings: Settings) -> BatchRunner:
    """The batch store (where the files are: the local folder, or the Redis every gateway shares)
    and the runner, which resumes the batches a previous run left unfinished (or, in Redis, those
    whose gateway stopped renewing its lease)."""
    app.state.batches = batch_store_for(settings)
    runner = BatchRunner(app.state.batches, app.state.files, settings, app.state.metrics, line_sender(app),
                         input_reader(app.state.files, app.state.service.off_loop), lambda: app.state.draining)
    await runner.start()
    return runner


def started_thread_pool() -> ThreadPoolExecutor:
    """The pool of asyncio.to_thread (a vLLM request's body, prompt assembly, Redis prefixes as
    bytes), asyncio's own size, its threads all started now: grown on demand it would start a thread
    in the middle of some request, and count as a leak to whoever watches the process's threads."""
    size = min(32, (os.cpu_count() or 1) + 4)
    pool = ThreadPoolExecutor(size, thread_name_prefix="off-loop")
    # each start waits for all: no thread is idle before the last is asked for, so each is a new one
    all_started = threading.Barrier(size, timeout=30)
    for _ in range(size):
        pool.submit(all_started.wait)
    return pool


def lifespan_of(settings: Settings, model: OneLLM | None, engine: Engine | None):
    """Start-up and shutdown; `model` and `engine` are loaded here unless given."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        nonlocal model, engine
        asyncio.get_running_loop().set_default_executor(started_thread_pool())
        if tracing.start(settings.otlp_endpoint):
            log.info("exporting traces over OTLP/HTTP")
        model = model or load_model(settings.model, device=settings.device, dtype=settings.dtype)
        engine = engine or build_engine(settings, model, app.state.metrics, app.state.live)
        await engine.start()
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
            app.state.shared_quotas = SharedQuotas(shared_redis, settings.quota_lease_ttl_s, app.state.metrics)
        references = MediaReferences(Records(f"onellm:ref:{model.name}:", int(settings.references_mb * MiB),
                                             settings.cache_ttl_s, shared_redis))
        app.state.stored_responses = Records(f"onellm:response:{model.name}:", int(settings.stored_responses_mb * MiB),
                                             settings.response_ttl_s, shared_redis)
        app.state.files = file_store_for(settings)
        await app.state.files.start()
        app.state.service = chat_service_for(settings, model, engine, app.state.metrics, shared_cache, references,
                                             app.state.live)
        started = time.monotonic()
        if warmed := await warm_up(app.state.service):
            log.info("warmed up in %.1f s: %s, as a first request's would be", time.monotonic() - started, warmed)
        app.state.batch_runner = await start_batches(app, settings)
        # torch, transformers and the model are ~0.5 M objects that live as long as the process; a
        # full collection walked them all, 190-290 ms with every stream stopped. Frozen, it skips them
        gc.collect()
        gc.freeze()
        log.info("serving model '%s' in %s on the %s engine", model.name, model.compute.name, engine.name)
        ticker = asyncio.create_task(record_loop_lag(app.state.metrics.event_loop_lag))
        yield
        ticker.cancel()
        gc.unfreeze()  # so that they are freed at exit as usual
        await app.state.batch_runner.close()
        await app.state.batches.close()
        app.state.service.close()
        await app.state.files.close()
        if shared_redis:
            await app.state.shared_quotas.close()
            await shared_redis.close()
        await engine.close()
        tracing.stop()  # last: the spans of the requests that shutdown waited for are exported too

    return lifespan


def create_app(settings: Settings, model: OneLLM | None = None, engine: Engine | None = None) -> FastAPI:
    """The gateway app; `model` and `engine` are loaded in the lifespan unless given."""
    app = FastAPI(title="OneLLM Serve", version="0.1.0", lifespan=lifespan_of(settings, model, engine),
                  responses={status: {"model": ErrorResponse} for status in ERROR_STATUSES})
    app.state.metrics = Metrics()
    app.state.settings = settings
    app.state.draining = False  # set by `onellm serve` on SIGTERM
    app.state.shared_quotas = None  # set in the lifespan when there is a shared Redis
    app.state.live = LiveTraffic()  # counted by the admission, yielded to by batch work below it
    add_guards(app, settings)
    add_error_handlers(app)
    for router in (chat_completions_router, chat_form_router, system_router, files_router, responses_router,
                   batches_router):
        app.include_router(router)
    document_models(app, ChatCompletionRequest, ResponsesRequest, BatchCreateRequest)
    return app
