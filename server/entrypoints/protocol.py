"""What the HTTP APIs share on the wire: the error body, how a streamed answer is documented, and
how an endpoint that reads its own JSON body documents it. Each API's own bodies are in its folder."""

import time

from pydantic import BaseModel

from server.core.chat import PAIRING_FIELDS, SINGLE_FIELDS
from server.media.modalities import MODALITIES

# `stream: true` answers are Server-Sent Events; the schema is each event's, as SSE validators
# (schemathesis) read a stream: its `event` name where it has one, and its `data`
STREAM_RESPONSE = {200: {"content": {"text/event-stream": {"schema": {
    "type": "object", "required": ["data"], "properties": {"event": {"type": "string"}, "data": {"type": "string"}}}}}}}


# every API's request-wide imu_sample_rate
IMU_RATE_HELP = ("Hz of the IMU series (0 < rate ≤ 10000); without it, the rate of a CSV's timestamp column, "
                 "else 200 Hz")


# what each upload field (form field, or `input_<field>` part) accepts and how it is read: the registry's words
UPLOAD_FORMATS = {name: MODALITIES[owner].formats for name, owner in
                  {**SINGLE_FIELDS, **{name: modality.name for name, modality in PAIRING_FIELDS.items()}}.items()}
PARTS_HELP = "Text, or a list of parts; the bytes each kind of part takes: " + "; ".join(
    f"{name}: {formats}" for name, formats in UPLOAD_FORMATS.items())


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
