"""Responses input items -> the internal chat, each error naming the item and part as the client
sent them (`input[i].content[j]...`). A part carries its fields flat ({"type": "input_image",
"image_url": ...}, {"type": "input_fmri", "data": ...}); a media part may also nest its body as a
chat-completions part does ({"type": "input_fmri", "input_fmri": {"data": ...}})."""

from dataclasses import dataclass

from server.core.chat import UPLOAD_FIELDS, Chat, Turn, Upload, chat_of, turn_of
from server.core.parts import References, checked_uuid, media_upload
from server.entrypoints.responses.protocol import ResponsesRequest
from server.errors import InputError
from server.media.fetch import Fetched

TEXT_PARTS = ("input_text", "output_text")  # output_text: an earlier answer sent back
URL_PARTS = {"input_image": "image_url", "input_video": "video_url"}  # and the key of each one's URL


@dataclass
class Item:
    """An input message, its shape checked; its parts' data is read once what they point at is fetched."""

    role: str  # user, assistant or system (a developer message is a system one)
    content: str | list[dict] | None
    where: str


def input_items(body: ResponsesRequest) -> list[Item]:
    items = [{"role": "user", "content": body.input}] if isinstance(body.input, str) else body.input
    if not isinstance(items, list) or not items:
        raise InputError(400, "input is text or a list of messages, at least one", "input")
    return [_item(item, f"input[{i}]") for i, item in enumerate(items)]


def _item(item, where: str) -> Item:
    # any JSON value may come here: beyond the type checks, only == comparisons, which never raise
    if not isinstance(item, dict):
        raise InputError(400, "an input item is a message: an object with a 'role' and 'content'", where)
    kind = item.get("type", "message")
    if kind != "message":
        raise InputError(400, f"input items of type {kind!r} are not supported; send messages", f"{where}.type")
    role = "system" if item.get("role") == "developer" else item.get("role")
    if role not in ("system", "user", "assistant"):
        raise InputError(400, "an input message's role is user, assistant, system or developer", f"{where}.role")
    content = item.get("content")
    if isinstance(content, list):
        for j, part in enumerate(content):
            _check_type(part, f"{where}.content[{j}]")
    elif content is not None and not isinstance(content, str):
        raise InputError(400, "a message's content is text or a list of content parts", f"{where}.content")
    return Item(role, content, where)


def _check_type(part, where: str) -> None:
    if not isinstance(part, dict) or not isinstance(part.get("type"), str):
        raise InputError(400, "a content part is an object with a 'type'", where)
    kind = part["type"]
    if kind not in TEXT_PARTS and _field(kind) is None:
        raise InputError(400, f"unsupported content part type {kind!r}", f"{where}.type")


def _field(kind: str) -> str | None:
    """The upload field of a media part's type ("file": its bytes tell); None for any other type."""
    if kind in URL_PARTS:
        return URL_PARTS[kind].removesuffix("_url")
    if kind == "input_file":
        return "file"
    return kind[6:] if kind.startswith("input_") and kind[6:] in UPLOAD_FIELDS else None


def _given(part: dict, *keys: str) -> dict:
    # a client may send a key it does not use as null
    return {k: part[k] for k in keys if part.get(k) is not None}


def _body(part: dict) -> tuple[dict | None, str]:
    """(a media part's body, how params name its keys below the part): the part's own fields, or
    the body it nests under its type."""
    kind = part["type"]
    if kind in URL_PARTS:
        return _given(part, "file_id") or _given(part, URL_PARTS[kind]) or None, ""
    if kind == "input_file":
        return _given(part, "file_id", "file_data", "filename"), ""
    if isinstance(part.get(kind), dict):
        return part[kind], f"{kind}."
    return _given(part, "data", "file_id", "sample_rate") or None, ""


def _media_parts(items: list[Item]):
    """(where, part) of every media part of the items."""
    for item in items:
        for j, part in enumerate(item.content if isinstance(item.content, list) else []):
            if part["type"] not in TEXT_PARTS:
                yield f"{item.where}.content[{j}]", part


def references(items: list[Item]) -> References:
    """The upload field of every media part, and the remote URLs and stored files they name."""
    found = References()
    for where, part in _media_parts(items):
        body, keys = _body(part)
        found.fields.append(_field(part["type"]))
        found.add(body, where, keys, URL_PARTS.get(part["type"]))
    return found


def chat_from_items(items: list[Item], options: dict, fetched: Fetched) -> Chat:
    """`fetched`: what the items' remote URLs and file ids point at, read beforehand."""
    return chat_of([_turn(item, options, fetched) for item in items], "input")


def _turn(item: Item, options: dict, fetched: Fetched) -> Turn:
    if not isinstance(item.content, list):
        return Turn(item.role, item.content or "")
    texts, uploads = [], []
    for j, part in enumerate(item.content):
        if part["type"] in TEXT_PARTS:
            texts.append(str(part.get("text", "")))
        else:
            uploads.append(_upload(part, f"{item.where}.content[{j}]", fetched))
    return turn_of(item.role, texts, uploads, options, f"{item.where}.content")


def _upload(part: dict, where: str, fetched: Fetched) -> Upload:
    uuid = checked_uuid(part.get("uuid"), f"{where}.uuid")
    body, keys = _body(part)
    kind = part["type"]
    return media_upload(_field(kind), body, URL_PARTS.get(kind, "data"), uuid, where, keys, fetched)
