"""`POST /v1/chat`'s form: its text fields, and the fields its files, references and stored files
come in."""

from pydantic import BaseModel, Field

from server.core.chat import SINGLE_FIELDS, UPLOAD_FIELDS
from server.entrypoints.protocol import IMU_RATE_HELP, UPLOAD_FORMATS

# `video_ref=<uuid>`: an attachment sent before, by the uuid the gateway returned (X-Media-UUIDs);
# `video_file_id=<id>`: a file stored with POST /v1/files. A depth or normal map goes with its image,
# so its pair is referred to by the image's uuid
REF_FIELDS = {f"{name}_ref": name for name in SINGLE_FIELDS}
FILE_ID_FIELDS = {f"{name}_file_id": name for name in UPLOAD_FIELDS}
# the form's own body, as the OpenAPI document gives it: the endpoint reads the form itself
FORM_BODY = {"requestBody": {"content": {"multipart/form-data": {"schema": {"type": "object", "properties": {
    **{name: {"type": "string", "format": "binary", "description": formats} for name, formats in UPLOAD_FORMATS.items()},
    "imu_sample_rate": {"type": "number", "description": IMU_RATE_HELP}}}}}}}


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
    imu_sample_rate: float | None = Field(default=None, gt=0.0, le=10000.0, description=IMU_RATE_HELP)
