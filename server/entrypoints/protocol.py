"""Request and response bodies of the HTTP API, in one place (OpenAI chat-completions shapes)."""

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, SkipValidation


# `stream: true` answers are Server-Sent Events; the schema is each event's, as SSE validators
# (schemathesis) read a stream: its `event` name where it has one, and its `data`
STREAM_RESPONSE = {200: {"content": {"text/event-stream": {"schema": {
    "type": "object", "required": ["data"], "properties": {"event": {"type": "string"}, "data": {"type": "string"}}}}}}}


class ErrorDetail(BaseModel):
    type: str
    message: str
    param: str | None = None
    code: str | None = None  # e.g. media_not_found: send the attachment's data again


class ErrorResponse(BaseModel):
    error: ErrorDetail


class ChatMessage(BaseModel):
    """One OpenAI message. `content` is text or a list of parts: `text`, `image_url`, `input_audio`,
    `video_url`, and `input_<field>` for the other uploads (`input_point`, `input_depth`,
    `input_normal`, `input_fmri`, `input_imu`), each carrying base64 `data`."""

    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant"]
    content: str | list[dict[str, Any]] | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # OpenAI clients send fields we do not use
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)  # what torch (and vLLM) take
    stream: bool = False
    stream_options: StreamOptions | None = None
    imu_sample_rate: float = Field(default=200.0, gt=0.0, le=10000.0)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    media: list[str] | None = None  # the uuid of each attachment in the prompt, to send it by reference next time


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: ResponseMessage
    finish_reason: str | None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "onellm-serve"
    modalities: list[str]
    random_weights: bool


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class FileObject(BaseModel):
    """An uploaded file, as OpenAI's Files API describes one."""

    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    expires_at: int
    filename: str
    purpose: str
    status: Literal["processed"] = "processed"
    status_details: str | None = None


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileObject]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool


class InputText(BaseModel):
    type: Literal["input_text", "output_text"]  # output_text: an earlier answer sent back
    text: str


class MediaPart(BaseModel):
    """What every media part may carry instead of its data: a stored file, or the uuid of an
    attachment sent before (or, with its data, a name of the client's own for it)."""

    model_config = ConfigDict(extra="allow")
    file_id: str | None = None
    uuid: str | None = Field(default=None, pattern=r"^[A-Za-z0-9._:@/+=-]{1,128}$")


class InputImage(MediaPart):
    type: Literal["input_image"]
    image_url: str | None = None  # a data: URL, or http(s) from an allowed host


class InputVideo(MediaPart):
    type: Literal["input_video"]
    video_url: str | None = None


class InputFile(MediaPart):
    """A file whose bytes tell its modality: an image, a video, audio or a 3D mesh."""

    type: Literal["input_file"]
    file_data: str | None = None  # base64, or a data: URL
    filename: str | None = None


class AudioData(BaseModel):
    data: str  # base64
    format: str | None = None


class InputAudio(MediaPart):
    type: Literal["input_audio"]
    input_audio: AudioData | None = None


class InputArray(MediaPart):
    """The other uploads; each may also nest its body as chat parts do ({"input_fmri": {"data": ...}})."""

    type: Literal["input_point", "input_depth", "input_normal", "input_fmri", "input_imu"]
    data: str | None = None  # base64 of the file
    sample_rate: float | None = Field(default=None, gt=0.0, le=10000.0)  # IMU, Hz


class InputMessage(BaseModel):
    """One input item; an output message of an earlier response, sent back, is one too."""

    model_config = ConfigDict(extra="allow")
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[InputText | InputImage | InputVideo | InputFile | InputAudio | InputArray]


METADATA_PAIRS, METADATA_KEY_CHARS, METADATA_VALUE_CHARS = 16, 64, 512  # as OpenAI bounds it


def _bounded_metadata(metadata: dict[str, str] | None) -> dict[str, str] | None:
    # checked here rather than per item: an error naming a key would echo all of it back
    if metadata is not None and (len(metadata) > METADATA_PAIRS
                                 or any(len(k) > METADATA_KEY_CHARS for k in metadata)
                                 or any(len(v) > METADATA_VALUE_CHARS for v in metadata.values())):
        raise ValueError(f"at most {METADATA_PAIRS} pairs, keys of at most {METADATA_KEY_CHARS} characters "
                         f"and values of at most {METADATA_VALUE_CHARS}")
    return metadata


class ResponsesRequest(BaseModel):
    """`POST /v1/responses`. `input` is text or a list of messages."""

    model_config = ConfigDict(extra="allow")
    model: str | None = None
    # documented as it is, read as it came: server/entrypoints/responses/router.py checks it item by item, so
    # that an error names the item and part it is about as the client sent them
    input: SkipValidation[str | list[InputMessage]]
    instructions: str | None = None
    previous_response_id: str | None = None
    store: bool = True
    stream: bool = False
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)
    # stored with the response, in Redis too: unbounded, one request could make its writes slow
    metadata: Annotated[dict[str, str] | None, AfterValidator(_bounded_metadata)] = None
    tools: list[dict[str, Any]] | None = None
    imu_sample_rate: float = Field(default=200.0, gt=0.0, le=10000.0)


class OutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list = []


class OutputMessage(BaseModel):
    type: Literal["message"] = "message"
    id: str
    status: Literal["in_progress", "completed", "incomplete"]
    role: Literal["assistant"] = "assistant"
    content: list[OutputText]


class ResponseUsage(BaseModel):
    input_tokens: int
    output_tokens: int
    total_tokens: int
    input_tokens_details: dict = {"cached_tokens": 0}
    output_tokens_details: dict = {"reasoning_tokens": 0}
    media: list[str] | None = None  # as Usage.media


class ResponseObject(BaseModel):
    """A response, as OpenAI's Responses API describes one."""

    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: Literal["in_progress", "completed", "incomplete", "failed"]
    model: str
    output: list[OutputMessage]
    instructions: str | None = None
    previous_response_id: str | None = None
    store: bool = True
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    metadata: dict[str, str] = {}
    usage: ResponseUsage | None = None
    error: dict | None = None
    incomplete_details: dict | None = None
    parallel_tool_calls: bool = False
    tool_choice: str = "none"
    tools: list = []
    text: dict = {"format": {"type": "text"}}


class ResponseDeleted(BaseModel):
    id: str
    object: Literal["response"] = "response"
    deleted: bool
