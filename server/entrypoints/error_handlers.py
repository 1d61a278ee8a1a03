"""Every error as the one JSON body clients get (`{"error": {type, message, param, code}}`): a
client's mistake with its status, an engine that is down as a 503, a bug as a plain 500 whose
traceback stays in the log."""

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from server.core.answers import engine_unavailable
from server.engines.base import EngineUnavailable
from server.errors import InputError, RequestError
from server.traffic.routes import kind_of

log = logging.getLogger("onellm.gateway")


def error_response(error: RequestError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def _counted_refusal(request: Request, error: RequestError) -> JSONResponse:
    """A chat request refused before its chat was read (bad form, unknown model, ...) counts too."""
    if kind_of(request.scope) == "chat" and not getattr(request.state, "counted", False):
        request.app.state.metrics.requests.labels("unread", str(error.status)).inc()
    return error_response(error)


async def _on_request_error(request: Request, e: RequestError) -> JSONResponse:
    return _counted_refusal(request, e)


async def _on_engine_down(request: Request, e: EngineUnavailable) -> JSONResponse:
    log.warning("the LLM engine is unavailable: %s", e)
    return error_response(engine_unavailable())


async def _on_invalid(request: Request, e: RequestValidationError) -> JSONResponse:
    first = e.errors()[0]
    loc = [str(p) for p in first["loc"] if p != "body"]
    param = ".".join(loc) or None
    return _counted_refusal(request, InputError(400, f"{param or 'body'}: {first['msg']}", param))


async def _on_http(request: Request, e: HTTPException) -> JSONResponse:
    return error_response(InputError(e.status_code, str(e.detail)))


async def _on_bug(request: Request, e: Exception) -> JSONResponse:
    log.exception("unexpected error on %s", request.url.path)
    return JSONResponse({"error": {"type": "internal_error", "message": "internal server error", "param": None}},
                        status_code=500)


def add_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestError, _on_request_error)
    app.add_exception_handler(EngineUnavailable, _on_engine_down)
    app.add_exception_handler(RequestValidationError, _on_invalid)
    app.add_exception_handler(HTTPException, _on_http)
    app.add_exception_handler(Exception, _on_bug)
