"""The chat every API parses into: turns of text and attachments, an attachment being the uploads
of one input (an image, or an image with its depth map, ...) or a reference to one sent before;
and the limits on a chat once it is parsed."""

from dataclasses import dataclass, field
from typing import NamedTuple

from server.budget import format_bytes
from server.config import Settings
from server.errors import InputError
from server.media.modalities import MODALITIES

# a field that alone makes an attachment (image, video, audio, point, fmri, imu) ...
SINGLE_FIELDS = {m.fields[0]: m.name for m in MODALITIES.values() if len(m.fields) == 1}
# ... and one that turns an attachment of its partner field into another modality (depth: image -> rgbd)
PAIRING_FIELDS = {m.fields[-1]: m for m in MODALITIES.values() if len(m.fields) > 1}
UPLOAD_FIELDS = tuple(SINGLE_FIELDS) + tuple(PAIRING_FIELDS)


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
    messages_param: str = "messages"  # the request field holding the chat, named in errors about it as a whole


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


def turn_of(role: str, texts: list[str], uploads: list[Upload], options: dict, param: str) -> Turn:
    """A message of text parts and media parts (`param`: the message's content)."""
    if uploads and role != "user":
        raise InputError(400, "only user messages may carry attachments", param)
    return Turn(role, "\n".join(texts), group_uploads(uploads, options, param))


def chat_of(turns: list[Turn], param: str = "messages") -> Chat:
    """The chat of a request's messages in order: a system message is the system prompt (the
    last one, if several); `param` names the messages, for errors about them all."""
    system = None
    for turn in turns:
        if turn.role == "system":
            system = turn.text
    chat = Chat([turn for turn in turns if turn.role != "system"], system, param)
    check_turns(chat.turns, param)
    return chat


def check_turns(turns: list[Turn], param: str = "messages") -> None:
    if not turns or turns[-1].role != "user":
        raise InputError(400, "the last message must be from the user", param)
    if not turns[-1].text.strip() and not turns[-1].attachments:
        raise InputError(400, "the last message is empty: send a prompt or an attachment", param)


def attachment_count(fields: list[str]) -> int:
    """The attachments that uploads of these fields make, known before any is read: a depth or
    normal map joins an image, so the maps add to the count only where they outnumber the rest
    (which is refused later anyway)."""
    maps = sum(1 for name in fields if name in PAIRING_FIELDS)
    return max(len(fields) - maps, maps)


def check_attachment_count(count: int, max_attachments: int, param: str = "messages") -> None:
    """Checked on the parts before anything they name is fetched, and on the chat they made."""
    if count > max_attachments:
        raise InputError(400, f"the request carries {count} attachments, more than the limit of "
                              f"{max_attachments} (max_attachments)", param)


def check_chat(chat: Chat, limits: Settings, max_tokens: int | None, max_tokens_param: str = "max_tokens",
               text_param: str = "messages", messages_param: str = "messages") -> None:
    """The limits on a parsed chat; the params name the request's fields (they differ between
    the endpoints)."""
    if max_tokens is not None and max_tokens > limits.max_tokens_limit:
        raise InputError(400, f"{max_tokens_param}={max_tokens} is more than this server's limit of "
                              f"{limits.max_tokens_limit} (max_tokens_limit)", max_tokens_param)
    if len(chat.turns) > limits.max_turns:
        raise InputError(400, f"the chat has {len(chat.turns)} messages, more than the limit of "
                              f"{limits.max_turns} (max_turns)", messages_param)
    chars = sum(len(t.text) for t in chat.turns) + len(chat.system or "")
    if chars > limits.max_text_chars:
        raise InputError(413, f"the messages hold {chars} characters of text, more than the limit of "
                              f"{limits.max_text_chars} (max_text_chars)", text_param)
    attachments = [a for t in chat.turns for a in t.attachments]
    check_attachment_count(len(attachments), limits.max_attachments, messages_param)
    for attachment in attachments:
        for name, data in attachment.files.items():
            if len(data) > limits.max_file_bytes:
                param = attachment.params.get(name, name)
                raise InputError(413, f"the '{param}' upload is larger than the limit of "
                                      f"{format_bytes(limits.max_file_bytes)} (max_file_bytes)", param)
