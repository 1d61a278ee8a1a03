"""From what clients send (multipart uploads, OpenAI content parts) to a chat of turns and attachments."""

import binascii
import json
import re
from dataclasses import dataclass, field
from typing import NamedTuple

import pydantic_core
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

from server.entrypoints.protocol import ChatCompletionRequest
from server.errors import InputError
from server.media.sniff import Kind, sniff
from server.media.modalities import MODALITIES

# a field that alone makes an attachment (image, video, audio, point, fmri, imu) ...
SINGLE_FIELDS = {m.fields[0]: m.name for m in MODALITIES.values() if len(m.fields) == 1}
# ... and one that turns an attachment of its partner field into another modality (depth: image -> rgbd)
PAIRING_FIELDS = {m.fields[-1]: m for m in MODALITIES.values() if len(m.fields) > 1}
UPLOAD_FIELDS = tuple(SINGLE_FIELDS) + tuple(PAIRING_FIELDS)
# the OpenAI content part that carries each upload field (and `input_<field>` for any of them)
PART_FIELDS = {"image_url": "image", "video_url": "video", "input_audio": "audio"}
# the upload field of a stored file, from what its bytes are; arrays and text could be any of
# several modalities, so those are sent in a part that names one
FILE_FIELDS = {"image": "image", "video": "video", "audio": "audio", "mesh": "point"}
SANE_UUID = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")


@dataclass
class Attachment:
    modality: str
    files: dict[str, bytes]  # upload field -> bytes; empty for a reference
    options: dict = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)  # upload field -> where the client sent it, when not the field
    reference: str | None = None  # the uuid of an attachment sent before, sent without its data
    uuid: str | None = None  # the client's own name for the bytes sent, to refer back to them
    file_ids: dict[str, str] = field(default_factory=dict)  # upload field -> the stored file its bytes came from


class Upload(NamedTuple):
    """One uploaded file (or a reference to one sent before) as a request carries it."""

    field: str
    data: bytes | None  # None: a reference, by `uuid`
    where: str | None = None  # the content part that carried it, for errors about its bytes
    uuid: str | None = None
    file_id: str | None = None
    options: dict | None = None  # this part's own preprocess options, over the request's


@dataclass
class Turn:
    role: str  # "user" or "assistant"
    text: str
    attachments: list[Attachment] = field(default_factory=list)


@dataclass
class Chat:
    turns: list[Turn]
    system: str | None = None  # None: the model's own system prompt


def group_uploads(uploads: list[Upload | tuple[str, bytes]], options: dict, param: str) -> list[Attachment]:
    """Uploads in request order -> attachments; a depth/normal map joins the first unpaired image."""
    uploads = [u if isinstance(u, Upload) else Upload(*u) for u in uploads]
    attachments = [_attachment(u, options) for u in uploads if u.field in SINGLE_FIELDS]
    for upload in uploads:
        name = upload.field
        if name in SINGLE_FIELDS:
            continue
        if name not in PAIRING_FIELDS:
            raise InputError(400, f"unknown upload field '{name}'; accepted: {', '.join(UPLOAD_FIELDS)}", name)
        modality = PAIRING_FIELDS[name]
        if upload.data is None:
            raise InputError(400, f"a '{name}' map is referred to by the uuid of the {modality.fields[0]} it came "
                                  "with: send that uuid alone", upload.where or name)
        partner = next((a for a in attachments if a.modality == SINGLE_FIELDS.get(modality.fields[0])
                        and a.reference is None), None)
        if partner is None:
            raise InputError(400, f"'{name}' needs an '{modality.fields[0]}' in the same message "
                                  f"(together they make a '{modality.name}' input)", param or name)
        partner.modality = modality.name
        partner.files[name] = upload.data
        if upload.where:
            partner.params[name] = upload.where
        if upload.file_id:
            partner.file_ids[name] = upload.file_id
        partner.uuid = partner.uuid or upload.uuid
    return attachments


def _attachment(upload: Upload, options: dict) -> Attachment:
    params = {upload.field: upload.where} if upload.where else {}
    options = {**options, **(upload.options or {})}
    if upload.data is None:
        return Attachment(SINGLE_FIELDS[upload.field], {}, options, params, reference=upload.uuid)
    return Attachment(SINGLE_FIELDS[upload.field], {upload.field: upload.data}, options, params, uuid=upload.uuid,
                      file_ids={upload.field: upload.file_id} if upload.file_id else {})


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


def parse_json_body(chunks: list[bytes], schema: type[BaseModel]) -> BaseModel:
    """A JSON request body (`schema`: its model), as it arrived. Parsed, then validated: half the
    time of pydantic's model_validate_json, and for a 40 MiB data URL that is ~25 ms less that the
    event loop's thread waits for the GIL."""
    try:
        data = pydantic_core.from_json(b"".join(chunks))
    except ValueError as e:
        raise InputError(400, f"the request body is not valid JSON ({e})") from None
    try:
        return schema.model_validate(data)
    except ValidationError as e:  # reported as FastAPI reports a body it validated
        raise RequestValidationError(e.errors(include_url=False)) from None


def _remote(url: object) -> bool:
    # not urlsplit: it copies the whole string a few times, and a data URL can be tens of MiB
    return isinstance(url, str) and url[:8].lower().startswith(("http://", "https://"))


def _parts(request: ChatCompletionRequest):
    """(where, type, body) of every content part of the request's messages."""
    for i, message in enumerate(request.messages):
        for j, part in enumerate(message.content if isinstance(message.content, list) else []):
            kind = part.get("type")
            yield f"messages[{i}].content[{j}]", kind, part.get(kind) if isinstance(kind, str) else None


def remote_urls(request: ChatCompletionRequest) -> dict[str, str]:
    """The http(s) URLs of the request's image and video parts, each with the param naming it."""
    urls = {}
    for where, kind, body in _parts(request):
        if kind in ("image_url", "video_url") and isinstance(body, dict) and _remote(url := body.get("url")):
            urls.setdefault(url, f"{where}.{kind}.url")
    return urls


def file_ids(request: ChatCompletionRequest) -> dict[str, str]:
    """The stored files the request's parts name (`file` parts, and media parts with a `file_id`),
    each with the param naming it."""
    ids = {}
    for where, kind, body in _parts(request):
        if isinstance(body, dict) and isinstance(file_id := body.get("file_id"), str):
            ids.setdefault(file_id, f"{where}.{kind}.file_id")
    return ids


def _media_field(kind: object) -> str | None:
    """The upload field a content part of this type carries; None for text and unknown types.
    A `file` part's modality comes from its bytes, but it is one attachment whatever it is."""
    if not isinstance(kind, str):  # any JSON value may come here
        return None
    if kind == "file" or kind in PART_FIELDS:
        return PART_FIELDS.get(kind, "file")
    return kind[6:] if kind.startswith("input_") and kind[6:] in UPLOAD_FIELDS else None


def media_fields(request: ChatCompletionRequest) -> list[str]:
    """The upload field of every media part of the request, whether it carries its bytes, a
    file_id, a URL or only a uuid."""
    return [name for _, kind, _ in _parts(request) if (name := _media_field(kind)) is not None]


def attachment_count(fields: list[str]) -> int:
    """The attachments that uploads of these fields make, known before any is read: a depth or
    normal map joins an image, so the maps add to the count only where they outnumber the rest
    (which is refused later anyway)."""
    maps = sum(1 for name in fields if name in PAIRING_FIELDS)
    return max(len(fields) - maps, maps)


@dataclass(frozen=True)
class Fetched:
    """What a request's parts point at, read before its parts are: remote URLs' bytes, and the
    stored files' (kind, bytes) by id."""

    urls: dict[str, bytes] = field(default_factory=dict)
    files: dict[str, tuple[str, bytes]] = field(default_factory=dict)


def url_bytes(url: object, param: str, fetched: Fetched) -> bytes:
    """A `data:` URL's bytes, or a remote URL's from those fetched (none when remote URLs are not allowed)."""
    if not isinstance(url, str):
        raise InputError(400, "expected a URL string", param)
    if url.startswith("data:"):
        comma = url.find(",")  # the payload is not copied out of the URL: it can be tens of MiB
        if comma < 0 or not url[:comma].endswith(";base64"):
            raise InputError(400, "expected a base64 data URL: data:<type>;base64,<data>", param)
        return decode_base64(url, param, start=comma + 1)
    if _remote(url):
        if url not in fetched.urls:
            raise InputError(400, "remote URLs are not accepted by this server; send the file as a data: URL", param)
        return fetched.urls[url]
    raise InputError(400, "unsupported URL scheme; send a data: URL", param)


def part_upload(kind: str, part: dict, where: str, fetched: Fetched) -> Upload:
    """A media content part -> its upload: the bytes inline (a data URL, base64 `data`), a stored
    file's (`file_id`), or none at all when the part carries only a `uuid` sent before."""
    body = part.get(kind)
    uuid = part.get("uuid")
    if uuid is not None and not (isinstance(uuid, str) and SANE_UUID.fullmatch(uuid)):
        raise InputError(400, "a uuid is 1 to 128 letters, digits or ._:@/+=-", f"{where}.uuid")
    if kind == "file":
        return _file_part(body, uuid, where, fetched)
    field_name = PART_FIELDS.get(kind) or kind.removeprefix("input_")
    inline = "url" if kind in ("image_url", "video_url") else "data"
    if isinstance(body, dict) and "file_id" in body:
        file_id, data = _stored(body["file_id"], f"{where}.{kind}.file_id", fetched)[::2]
        return Upload(field_name, data, f"{where}.{kind}.file_id", uuid, file_id)
    if isinstance(body, dict) and body.get(inline) is not None:
        param = f"{where}.{kind}.{inline}"
        data = url_bytes(body[inline], param, fetched) if inline == "url" else decode_base64(body[inline], param)
        return Upload(field_name, data, param, uuid)
    if body is not None and not isinstance(body, dict):
        raise InputError(400, f"'{kind}' must be an object", f"{where}.{kind}")
    if uuid is None:
        raise InputError(400, f"the part carries no data: send '{kind}.{inline}', a '{kind}.file_id', or the "
                              "'uuid' of an attachment sent before", where)
    return Upload(field_name, None, where, uuid)


def _file_part(body, uuid: str | None, where: str, fetched: Fetched) -> Upload:
    """OpenAI's `{"type": "file", "file": {"file_id" | "file_data", "filename"}}`: the modality is
    what the bytes are."""
    if not isinstance(body, dict) or not ({"file_id", "file_data"} & body.keys()):
        raise InputError(400, "a file part needs 'file.file_id' (from POST /v1/files) or 'file.file_data'", where)
    if "file_id" in body:
        param = f"{where}.file.file_id"
        file_id, stored_kind, data = _stored(body["file_id"], param, fetched)
    else:
        param, file_id = f"{where}.file.file_data", None
        data = url_bytes(body["file_data"], param, fetched) if str(body["file_data"]).startswith("data:") \
            else decode_base64(body["file_data"], param)
        stored_kind = (sniff(data) or Kind("", "")).family
    if stored_kind not in FILE_FIELDS:
        raise InputError(400, "a file part's bytes must be an image, a video, audio or a 3D mesh; send arrays "
                              "and other files in the part of their modality (input_fmri, input_imu, "
                              "input_point, input_depth, input_normal) with a file_id or data", param)
    return Upload(FILE_FIELDS[stored_kind], data, param, uuid, file_id)


def _stored(file_id: object, param: str, fetched: Fetched) -> tuple[str, str, bytes]:
    """(id, kind, bytes) of a stored file the request names (read beforehand: see file_ids)."""
    if not isinstance(file_id, str):
        raise InputError(400, "a file_id is a string, from POST /v1/files", param)
    return file_id, *fetched.files[file_id]


def parts_to_turn(role: str, content, index: int, options: dict, fetched: Fetched) -> Turn:
    if content is None or isinstance(content, str):
        return Turn(role, content or "")
    texts, uploads = [], []
    for j, part in enumerate(content):
        where = f"messages[{index}].content[{j}]"
        kind = part.get("type")
        if kind == "text":
            texts.append(str(part.get("text", "")))
        elif _media_field(kind) is not None:
            upload = part_upload(kind, part, where, fetched)
            body = part.get(kind)
            if isinstance(body, dict) and "sample_rate" in body:  # this part's rate, not the message's
                upload = upload._replace(options={
                    "imu_sample_rate": _positive(body["sample_rate"], f"{where}.{kind}.sample_rate")})
            uploads.append(upload)
        else:
            raise InputError(400, f"unsupported content part type {kind!r}", f"{where}.type")
    if uploads and role != "user":
        raise InputError(400, "only user messages may carry attachments", f"messages[{index}].content")
    return Turn(role, "\n".join(texts), group_uploads(uploads, options, f"messages[{index}].content"))


def _positive(value, param: str) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value <= 10000:
        raise InputError(400, "expected a number in (0, 10000]", param)
    return float(value)


def chat_from_openai(request: ChatCompletionRequest, fetched: Fetched) -> Chat:
    """`fetched`: what the request's remote URLs and file ids point at, read beforehand because
    this runs in a worker thread: decoding base64 does not belong on the event loop."""
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


def chat_from_form(prompt: str | None, messages: str | None, uploads: list[Upload | tuple[str, bytes]],
                   options: dict) -> Chat:
    """`/v1/chat`: a history message may name its files (`"attachments": ["image", ...]`); it takes
    the first remaining uploads of those fields (files, references or stored files), in order. The
    other files belong to the last user turn."""
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


def _take_uploads(remaining: list, names, role: str, param: str) -> list:
    """Moves the first remaining upload of each named field, in order, out of `remaining`."""
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise InputError(400, "attachments must be a list of upload field names", param)
    if names and role != "user":
        raise InputError(400, "only user messages may carry attachments", param)
    taken = []
    for name in names:
        at = next((j for j, upload in enumerate(remaining) if upload[0] == name), None)
        if at is None:
            raise InputError(400, f"names a '{name}' upload that the form does not hold", param)
        taken.append(remaining.pop(at))
    return taken
