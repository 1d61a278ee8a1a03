"""What the sync and async clients share: building a `/v1/chat` form and reading its SSE stream."""

import json
import mimetypes
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from onellm_client.errors import OneLLMError, error_from_body

# a path, the file's bytes, or an open binary file
FileInput = str | os.PathLike | bytes | IO[bytes]
# the upload fields of `POST /v1/chat`; depth and normal pair with the image of the same turn
UPLOAD_FIELDS = ("image", "video", "audio", "point", "depth", "normal", "fmri", "imu")
# the fields that make an attachment on their own: a depth or normal map is part of its image's
ATTACHMENT_FIELDS = tuple(name for name in UPLOAD_FIELDS if name not in ("depth", "normal"))
MEDIA_HEADER = "x-media-uuids"


@dataclass
class ChatResult:
    """A finished answer. `usage` is None for a streamed `/v1/chat` answer (the server sends none)."""

    text: str
    finish_reason: str | None = None
    usage: dict | None = None
    model: str | None = None
    id: str | None = None
    raw: dict | None = field(default=None, repr=False)  # the server's chat.completion body, when not streamed
    # the uuid of each attachment of the prompt, in order (earlier turns' first): a later turn can
    # send `<field>_ref=<uuid>` instead of the file
    media: list[str] = field(default_factory=list)


@dataclass
class ChatRequest:
    data: dict[str, str]
    files: list[tuple[str, tuple[str, bytes, str]]] = field(default_factory=list)


def build_request(prompt: str | None, history: Sequence[dict] | None, uploads: dict[str, FileInput | None],
                  stream: bool, imu_sample_rate: float | None, max_tokens: int | None,
                  temperature: float | None, top_p: float | None, stop: str | Sequence[str] | None,
                  seed: int | None, model: str | None) -> ChatRequest:
    data = {"stream": "true" if stream else "false"}
    if prompt is not None:
        data["prompt"] = prompt
    files = []
    if history:
        # a history turn's uploads go before this turn's, and the turn names their fields
        messages = []
        for message in history:
            uploads_of_turn, names = history_uploads(message)
            files += uploads_of_turn
            messages.append({k: v for k, v in message.items() if k not in ("files", "media")}
                            | ({"attachments": names} if names else {}))
        data["messages"] = json.dumps(messages)
    if stop is not None:
        data["stop"] = stop if isinstance(stop, str) else json.dumps(list(stop))
    for name, value in (("imu_sample_rate", imu_sample_rate), ("max_tokens", max_tokens),
                        ("temperature", temperature), ("top_p", top_p), ("seed", seed), ("model", model)):
        if value is not None:
            data[name] = str(value)
    files += [(name, read_file(value, name)) for name, value in uploads.items() if value is not None]
    return ChatRequest(data, files)


def history_uploads(message: dict) -> tuple[list, list[str]]:
    """(form parts, field names) of an earlier turn's attachments: their uuids (`<field>_ref`)
    when the message has one for each (`media`), the files themselves otherwise. A depth or normal
    map is part of its image's attachment, so the image's uuid stands for both."""
    files = message.get("files", [])
    fields = [name for name, _ in files if name in ATTACHMENT_FIELDS]
    media = message.get("media") or []
    if fields and len(media) == len(fields):
        # (None, text): a plain form field, kept in order among the files
        return [(f"{name}_ref", (None, uuid)) for name, uuid in zip(fields, media)], fields
    return [(name, read_file(value, name)) for name, value in files], [name for name, _ in files]


def media_uuids(headers) -> list[str]:
    return [uuid for uuid in headers.get(MEDIA_HEADER, "").split(",") if uuid]


def read_file(value: FileInput, name: str) -> tuple[str, bytes, str]:
    """(filename, bytes, content type) for one upload. The server sniffs the bytes; the name is for its logs."""
    if isinstance(value, bytes):
        return name, value, "application/octet-stream"
    if isinstance(value, (str, os.PathLike)):
        path = Path(value)
        return path.name, path.read_bytes(), mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    if hasattr(value, "read"):
        return Path(getattr(value, "name", name)).name, value.read(), "application/octet-stream"
    raise TypeError(f"{name}: expected a path, bytes or a binary file, got {type(value).__name__}")


class StreamState:
    """Reads SSE lines into text deltas, remembering what the last chunk said."""

    def __init__(self):
        self.text = ""
        self.finish_reason: str | None = None
        self.usage: dict | None = None
        self.model: str | None = None
        self.id: str | None = None
        self.media: list[str] = []
        self.done = False
        self._event = "message"
        self._data: list[str] = []

    def feed(self, line: str) -> Iterable[str]:
        """One line of the stream -> the text deltas it completes (at a blank line)."""
        if line.startswith(":"):
            return ()
        if line:
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "event":
                self._event = value
            elif name == "data":
                self._data.append(value)
            return ()
        event, data = self._event, "\n".join(self._data)
        self._event, self._data = "message", []
        return self._dispatch(event, data) if data else ()

    def _dispatch(self, event: str, data: str) -> Iterable[str]:
        if data == "[DONE]":
            self.done = True
            return ()
        try:
            payload = json.loads(data)
        except json.JSONDecodeError:
            raise OneLLMError(f"the server sent an unreadable event: {data[:200]!r}") from None
        if event == "error":
            raise error_from_body(payload)
        self.id = payload.get("id", self.id)
        self.model = payload.get("model", self.model)
        self.usage = payload.get("usage") or self.usage
        deltas = []
        for choice in payload.get("choices") or ():
            content = (choice.get("delta") or {}).get("content")
            if content:
                deltas.append(content)
            self.finish_reason = choice.get("finish_reason") or self.finish_reason
        self.text += "".join(deltas)
        return deltas

    def result(self) -> ChatResult:
        return ChatResult(self.text, self.finish_reason, self.usage, self.model, self.id, media=self.media)


def result_from_completion(body: dict, headers) -> ChatResult:
    choice = body["choices"][0]
    return ChatResult(choice["message"]["content"], choice.get("finish_reason"), body.get("usage"),
                      body.get("model"), body.get("id"), body, media_uuids(headers))
