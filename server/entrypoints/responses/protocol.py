"""OpenAI's Responses API bodies: the request and its input items, the response and its output."""

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, SkipValidation

from server.entrypoints.protocol import IMU_RATE_HELP


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
    # documented as it is, read as it came: responses/parse.py checks it item by item, so
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
    imu_sample_rate: float | None = Field(default=None, gt=0.0, le=10000.0, description=IMU_RATE_HELP)


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
