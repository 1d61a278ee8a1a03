"""The routes around the chats: liveness and readiness for the orchestrator, Prometheus metrics,
the served model (`GET /v1/models`), and the web page at `/`."""

from pathlib import Path
from typing import Literal

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from pydantic import BaseModel

from server.entrypoints.error_handlers import error_response
from server.errors import InputError, Unavailable

STATIC_DIR = Path(__file__).parent / "static"
router = APIRouter()


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "onellm-serve"
    modalities: list[str]
    random_weights: bool
    dtype: str  # what the encoder computes in (and the embedded LLM on full weights)
    engine: str  # local, llama.cpp or vllm
    # the embedded LLM's: "full" or the quantized type it serves (q4_k, q4_0, q8_0); null on vLLM, which knows its own
    llm_weights: str | None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


@router.get("/v1/models", response_model=ModelList)
async def models(request: Request) -> ModelList:
    service = request.app.state.service
    model, engine = service.model, service.engine
    return ModelList(data=[ModelCard(
        id=model.name, created=int(model.path.stat().st_mtime), modalities=model.encoder.modalities,
        random_weights=bool(model.config.get("random_weights")), dtype=model.compute.name, engine=engine.name,
        llm_weights=getattr(engine, "weights", None))])


@router.get("/health")
async def health() -> dict:
    return {"status": "ok"}


@router.get("/ready")
async def ready(request: Request) -> JSONResponse:
    service = getattr(request.app.state, "service", None)
    if service is None or not await service.engine.ready():
        engine = service.engine.name if service else "none"
        return error_response(Unavailable(f"not ready: the {engine} engine is not answering"))
    return JSONResponse({"status": "ready", "model": service.model.name, "engine": service.engine.name})


@router.get("/metrics", responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}})
async def metrics(request: Request) -> Response:
    return Response(request.app.state.metrics.exposition(), media_type="text/plain; version=0.0.4")


@router.get("/", include_in_schema=False)
async def page() -> Response:
    index = STATIC_DIR / "index.html"
    if not index.exists():
        raise InputError(404, "no web page is installed")
    return FileResponse(index)
