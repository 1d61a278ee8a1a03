"""From what clients send (multipart uploads, OpenAI content parts) to a chat of turns and attachments."""

import binascii
import json
from dataclasses import dataclass, field

import pydantic_core
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from server.api.schemas import ChatCompletionRequest
from server.errors import InputError
from server.modalities import MODALITIES

# a field that alone makes an attachment (image, video, audio, point, fmri, imu) ...
SINGLE_FIELDS = {m.fields[0]: m.name for m in MODALITIES.values() if len(m.fields) == 1}
# ... and one that turns an attachment of its partner field into another modality (depth: image -> rgbd)
PAIRING_FIELDS = {m.fields[-1]: m for m in MODALITIES.values() if len(m.fields) > 1}
UPLOAD_FIELDS = tuple(SINGLE_FIELDS) + tuple(PAIRING_FIELDS)


@dataclass
class Attachment:
    modality: str
    files: dict[str, bytes]  # upload field -> bytes
    options: dict = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)  # upload field -> where the client sent it, when not the field


@dataclass
class Turn:
    role: str  # "user" or "assistant"
    text: str
    attachments: list[Attachment] = field(default_factory=list)


@dataclass
class Chat:
    turns: list[Turn]
    system: str | None = None  # None: the model's own system prompt


def group_uploads(uploads: list[tuple[str, bytes]], options: dict, param: str,
                  where: list[str] | None = None) -> list[Attachment]:
    """[(field, bytes), ...] in upload order -> attachments; a depth/normal map joins the first unpaired image.

    `where[i]` names upload i in the request (an OpenAI content part) for errors about its bytes."""
    where = where or [None] * len(uploads)
    attachments = [Attachment(SINGLE_FIELDS[f], {f: data}, options, {f: w} if w else {})
                   for (f, data), w in zip(uploads, where) if f in SINGLE_FIELDS]
    for (name, data), w in zip(uploads, where):
        if name in SINGLE_FIELDS:
            continue
        if name not in PAIRING_FIELDS:
            raise InputError(400, f"unknown upload field '{name}'; accepted: {', '.join(UPLOAD_FIELDS)}", name)
        modality = PAIRING_FIELDS[name]
        partner = next((a for a in attachments if a.modality == SINGLE_FIELDS.get(modality.fields[0])), None)
        if partner is None:
            raise InputError(400, f"'{name}' needs an '{modality.fields[0]}' in the same message "
                                  f"(together they make a '{modality.name}' input)", param or name)
        partner.modality = modality.name
        partner.files[name] = data
        if w:
            partner.params[name] = w
    return attachments


def check_turns(turns: list[Turn]) -> None:
    if not turns or turns[-1].role != "user":
        raise InputError(400, "the last message must be from the user", "messages")
    if not turns[-1].text.strip() and not turns[-1].attachments:
        raise InputError(400, "the last message is empty: send a prompt or an attachment", "messages")


# binascii holds the GIL while it decodes, ~80 ms for a 40 MiB file. A piece (~1.5 ms; a multiple
# of 4 characters) at a time, the GIL can pass to the event loop's thread between pieces
BASE64_PIECE = 1 << 20


def decode_base64(text: object, param: str, start: int = 0) -> bytes:
    """`text[start:]` decoded, strictly: only the alphabet, padding only at the end."""
    if not isinstance(text, str):
        raise InputError(400, "expected a base64 string", param)
    pieces = []
    try:
        for at in range(start, len(text), BASE64_PIECE):
            piece = text[at:at + BASE64_PIECE]
            if at + BASE64_PIECE < len(text) and "=" in piece:
                raise binascii.Error("padding before the end")
            pieces.append(binascii.a2b_base64(piece, strict_mode=True))
    except (binascii.Error, ValueError):  # ValueError: characters beyond ASCII
        raise InputError(400, "not valid base64", param) from None
    return b"".join(pieces)


def parse_completion_request(chunks: list[bytes]) -> ChatCompletionRequest:
    """The JSON body of `/v1/chat/completions`, as it arrived. Parsed, then validated: half the
    time of pydantic's model_validate_json, and for a 40 MiB data URL that is ~25 ms less that the
    event loop's thread waits for the GIL."""
    try:
        data = pydantic_core.from_json(b"".join(chunks))
    except ValueError as e:
        raise InputError(400, f"the request body is not valid JSON ({e})") from None
    try:
        return ChatCompletionRequest.model_validate(data)
    except ValidationError as e:  # reported as FastAPI reports a body it validated
        raise RequestValidationError(e.errors(include_url=False)) from None


def _remote(url: object) -> bool:
    # not urlsplit: it copies the whole string a few times, and a data URL can be tens of MiB
    return isinstance(url, str) and url[:8].lower().startswith(("http://", "https://"))


def remote_urls(request: ChatCompletionRequest) -> dict[str, str]:
    """The http(s) URLs of the request's image and video parts, each with the param naming it."""
    urls = {}
    for i, message in enumerate(request.messages):
        for j, part in enumerate(message.content if isinstance(message.content, list) else []):
            kind = part.get("type")
            body = part.get(kind) if kind in ("image_url", "video_url") else None
            if isinstance(body, dict) and _remote(url := body.get("url")):
                urls.setdefault(url, f"messages[{i}].content[{j}].{kind}.url")
    return urls


def url_bytes(url: object, param: str, fetched: dict[str, bytes]) -> bytes:
    """A `data:` URL's bytes, or a remote URL's from those fetched (none when remote URLs are not allowed)."""
    if not isinstance(url, str):
        raise InputError(400, "expected a URL string", param)
    if url.startswith("data:"):
        comma = url.find(",")  # the payload is not copied out of the URL: it can be tens of MiB
        if comma < 0 or not url[:comma].endswith(";base64"):
            raise InputError(400, "expected a base64 data URL: data:<type>;base64,<data>", param)
        return decode_base64(url, param, start=comma + 1)
    if _remote(url):
        if url not in fetched:
            raise InputError(400, "remote URLs are not accepted by this server; send the file as a data: URL", param)
        return fetched[url]
    raise InputError(400, "unsupported URL scheme; send a data: URL", param)


def parts_to_turn(role: str, content, index: int, options: dict, fetched: dict[str, bytes]) -> Turn:
    if content is None or isinstance(content, str):
        return Turn(role, content or "")
    texts, uploads, wheres = [], [], []
    for j, part in enumerate(content):
        where = f"messages[{index}].content[{j}]"
        kind = part.get("type")
        body = part.get(kind) if isinstance(kind, str) else None
        if kind == "text":
            texts.append(str(part.get("text", "")))
        elif kind == "image_url" and isinstance(body, dict):
            uploads.append(("image", url_bytes(body.get("url"), f"{where}.image_url.url", fetched)))
            wheres.append(f"{where}.image_url.url")
        elif kind == "video_url" and isinstance(body, dict):
            uploads.append(("video", url_bytes(body.get("url"), f"{where}.video_url.url", fetched)))
            wheres.append(f"{where}.video_url.url")
        elif kind == "input_audio" and isinstance(body, dict):
            uploads.append(("audio", decode_base64(body.get("data"), f"{where}.input_audio.data")))
            wheres.append(f"{where}.input_audio.data")
        elif isinstance(kind, str) and kind.startswith("input_") and kind[6:] in UPLOAD_FIELDS and isinstance(body, dict):
            uploads.append((kind[6:], decode_base64(body.get("data"), f"{where}.{kind}.data")))
            wheres.append(f"{where}.{kind}.data")
            if "sample_rate" in body:
                options = {**options, "imu_sample_rate": _positive(body["sample_rate"], f"{where}.{kind}.sample_rate")}
        else:
            raise InputError(400, f"unsupported content part type {kind!r}", f"{where}.type")
    if uploads and role != "user":
        raise InputError(400, "only user messages may carry attachments", f"messages[{index}].content")
    return Turn(role, "\n".join(texts), group_uploads(uploads, options, f"messages[{index}].content", wheres))


def _positive(value, param: str) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value <= 10000:
        raise InputError(400, "expected a number in (0, 10000]", param)
    return float(value)


def chat_from_openai(request: ChatCompletionRequest, fetched: dict[str, bytes]) -> Chat:
    """`fetched`: the bytes of the request's remote URLs (see remote_urls), fetched beforehand
    because this runs in a worker thread: decoding base64 does not belong on the event loop."""
    system, turns = None, []
    options = {"imu_sample_rate": request.imu_sample_rate}
    for i, message in enumerate(request.messages):
        turn = parts_to_turn(message.role, message.content, i, options, fetched)
        if message.role == "system":
            system = turn.text
        else:
            turns.append(turn)
    check_turns(turns)
    return Chat(turns, system)


def chat_from_form(prompt: str | None, messages: str | None, uploads: list[tuple[str, bytes]], options: dict) -> Chat:
    """`/v1/chat`: a history message may name its files (`"attachments": ["image", ...]`); it takes
    the first remaining uploads of those fields, in order. The other files belong to the last user turn."""
    if messages is None and prompt is None:
        raise InputError(400, "send 'prompt' (text) or 'messages' (a JSON list of {role, content})", "prompt")
    system, turns, remaining = None, [], list(uploads)
    if messages is not None:
        try:
            history = json.loads(messages)
        except json.JSONDecodeError as e:
            raise InputError(400, f"'messages' is not valid JSON: {e.msg}", "messages") from None
        if not isinstance(history, list):
            raise InputError(400, "'messages' must be a JSON list of {role, content}", "messages")
        for i, m in enumerate(history):
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") or not isinstance(m.get("content"), str):
                raise InputError(400, "each message needs a role (system, user, assistant) and text content", f"messages[{i}]")
            if m["role"] == "system":
                system = m["content"]
            else:
                turns.append(Turn(m["role"], m["content"]))
                named = _take_uploads(remaining, m.get("attachments", []), m["role"], f"messages[{i}].attachments")
                turns[-1].attachments = group_uploads(named, options, f"messages[{i}].attachments")
    if prompt is not None:
        turns.append(Turn("user", prompt))
    if not turns or turns[-1].role != "user":
        raise InputError(400, "the last message must be from the user", "messages")
    turns[-1].attachments += group_uploads(remaining, options, "")
    check_turns(turns)
    return Chat(turns, system)


def _take_uploads(remaining: list[tuple[str, bytes]], names, role: str, param: str) -> list[tuple[str, bytes]]:
    """Moves the first remaining upload of each named field, in order, out of `remaining`."""
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise InputError(400, "attachments must be a list of upload field names", param)
    if names and role != "user":
        raise InputError(400, "only user messages may carry attachments", param)
    taken = []
    for name in names:
        at = next((j for j, (field_name, _) in enumerate(remaining) if field_name == name), None)
        if at is None:
            raise InputError(400, f"names a '{name}' upload that the form does not hold", param)
        taken.append(remaining.pop(at))
    return taken
