"""Chat-completions messages -> the internal chat. A message's content is text or a list of parts:
`text`, `image_url`, `video_url`, `input_audio`, `file`, and `input_<field>` for any upload field,
each nesting its body under its type ({"type": "input_fmri", "input_fmri": {"data": ...}})."""

from server.core.chat import UPLOAD_FIELDS, Chat, Turn, Upload, chat_of, turn_of
from server.core.parts import References, checked_uuid, media_upload
from server.entrypoints.chat_completions.protocol import ChatCompletionRequest
from server.errors import InputError
from server.media.fetch import Fetched

# the content part that carries each upload field (and `input_<field>` for any of them)
PART_FIELDS = {"image_url": "image", "video_url": "video", "input_audio": "audio"}
URL_PARTS = ("image_url", "video_url")


def _parts(request: ChatCompletionRequest):
    """(where, type, body) of every content part of the request's messages."""
    for i, message in enumerate(request.messages):
        for j, part in enumerate(message.content if isinstance(message.content, list) else []):
            kind = part.get("type")
            yield f"messages[{i}].content[{j}]", kind, part.get(kind) if isinstance(kind, str) else None


def _media_field(kind: object) -> str | None:
    """The upload field a content part of this type carries; None for text and unknown types.
    A `file` part's modality comes from its bytes, but it is one attachment whatever it is."""
    if not isinstance(kind, str):  # any JSON value may come here
        return None
    if kind == "file" or kind in PART_FIELDS:
        return PART_FIELDS.get(kind, "file")
    return kind[6:] if kind.startswith("input_") and kind[6:] in UPLOAD_FIELDS else None


def references(request: ChatCompletionRequest) -> References:
    """The upload field of every media part, whether it carries its bytes, a file_id, a URL or only
    a uuid; and the remote URLs of image and video parts and the stored files parts name."""
    found = References()
    for where, kind, body in _parts(request):
        if (name := _media_field(kind)) is not None:
            found.fields.append(name)
        found.add(body, where, f"{kind}.", "url" if kind in URL_PARTS else None)
    return found


def chat_from_openai(request: ChatCompletionRequest, fetched: Fetched) -> Chat:
    """`fetched`: what the request's remote URLs and file ids point at, read beforehand."""
    options = {"imu_sample_rate": request.imu_sample_rate}
    return chat_of([_turn(m.role, m.content, i, options, fetched) for i, m in enumerate(request.messages)])


def _turn(role: str, content, index: int, options: dict, fetched: Fetched) -> Turn:
    if content is None or isinstance(content, str):
        return Turn(role, content or "")
    texts, uploads = [], []
    for j, part in enumerate(content):
        where = f"messages[{index}].content[{j}]"
        kind = part.get("type")
        if kind == "text":
            texts.append(str(part.get("text", "")))
        elif (name := _media_field(kind)) is not None:
            uploads.append(_upload(name, kind, part, where, fetched))
        else:
            raise InputError(400, f"unsupported content part type {kind!r}", f"{where}.type")
    return turn_of(role, texts, uploads, options, f"messages[{index}].content")


def _upload(name: str, kind: str, part: dict, where: str, fetched: Fetched) -> Upload:
    uuid = checked_uuid(part.get("uuid"), f"{where}.uuid")
    body = part.get(kind)
    if kind != "file" and body is not None and not isinstance(body, dict):
        raise InputError(400, f"'{kind}' must be an object", f"{where}.{kind}")
    return media_upload(name, body, "url" if kind in URL_PARTS else "data", uuid, where, f"{kind}.", fetched)
