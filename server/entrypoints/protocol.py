"""What the HTTP APIs share on the wire: the error body, how a streamed answer is documented, and
how an endpoint that reads its own JSON body documents it. Each API's own bodies are in its folder."""

import time

from pydantic import BaseModel

# `stream: true` answers are Server-Sent Events; the schema is each event's, as SSE validators
# (schemathesis) read a stream: its `event` name where it has one, and its `data`
STREAM_RESPONSE = {200: {"content": {"text/event-stream": {"schema": {
    "type": "object", "required": ["data"], "properties": {"event": {"type": "string"}, "data": {"type": "string"}}}}}}}


# every API's request-wide imu_sample_rate
IMU_RATE_HELP = ("Hz of the IMU series (0 < rate ≤ 10000); without it, the rate of a CSV's timestamp column, "
                 "else 200 Hz")


class ErrorDetail(BaseModel):
    type: str
    message: str
    param: str | None = None
    code: str | None = None  # e.g. media_not_found: send the attachment's data again


class ErrorResponse(BaseModel):
    error: ErrorDetail


def json_body(model: type[BaseModel]) -> dict:
    """The `openapi_extra` of an endpoint that reads its JSON body itself (FastAPI would parse it on
    the event loop): the body's schema, put into the document's components by the app factory."""
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}}


def now() -> int:
    return int(time.time())
