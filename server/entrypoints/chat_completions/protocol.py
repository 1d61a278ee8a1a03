"""OpenAI's chat completions: the request, the answer, and the chunks of a streamed answer."""

import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from server.entrypoints.protocol import IMU_RATE_HELP, PARTS_HELP


class ChatMessage(BaseModel):
    """One OpenAI message. `content` is text or a list of parts: `text`, `image_url`, `input_audio`,
    `video_url`, and `input_<field>` for the other uploads (`input_point`, `input_depth`,
    `input_normal`, `input_fmri`, `input_imu`), each carrying base64 `data`."""

    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant"]
    content: str | list[dict[str, Any]] | None = Field(default=None, description=PARTS_HELP)


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
    imu_sample_rate: float | None = Field(default=None, gt=0.0, le=10000.0, description=IMU_RATE_HELP)


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


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"
