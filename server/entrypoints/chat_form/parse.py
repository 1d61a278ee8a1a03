"""`POST /v1/chat`'s form -> the internal chat: text fields, files, references to attachments sent
before (`<field>_ref`) and stored files (`<field>_file_id`). A history in `messages` may name the
uploads each of its messages carries; the other uploads belong to the last user message."""

import json

from pydantic import ValidationError
from starlette.datastructures import FormData, UploadFile

from server.core.chat import (UPLOAD_FIELDS, Chat, Turn, Upload, attachment_count, check_attachment_count, check_turns,
                              group_uploads)
from server.core.parts import checked_uuid
from server.entrypoints.chat_form.protocol import FILE_ID_FIELDS, REF_FIELDS, ChatForm
from server.errors import InputError
from server.media.fetch import Fetcher

FORM_FIELDS = set(ChatForm.model_fields)


async def form_uploads(form: FormData, fetcher: Fetcher, max_attachments: int) -> tuple[dict[str, str], list[Upload]]:
    """The form's text fields, and its uploads in order: files, references and stored files, the
    attachments they make counted before any is read."""
    media = [REF_FIELDS.get(name) or FILE_ID_FIELDS.get(name) or name for name, _ in form.multi_items()
             if name in REF_FIELDS or name in FILE_ID_FIELDS or name in UPLOAD_FIELDS]
    check_attachment_count(attachment_count(media), max_attachments)
    texts, uploads = {}, []
    for name, value in form.multi_items():
        if isinstance(value, UploadFile):
            if name not in UPLOAD_FIELDS:
                raise InputError(400, f"unknown upload field '{name}'; accepted: {', '.join(UPLOAD_FIELDS)}", name)
            uploads.append(Upload(name, await value.read()))
        elif name in UPLOAD_FIELDS:
            raise InputError(400, f"'{name}' must be a file upload (curl -F {name}=@file)", name)
        elif name in REF_FIELDS:
            uploads.append(Upload(REF_FIELDS[name], None, name, checked_uuid(value, name)))
        elif name in FILE_ID_FIELDS:
            _, data = await fetcher.stored(value, name)
            uploads.append(Upload(FILE_ID_FIELDS[name], data, name, None, value))
        elif name not in FORM_FIELDS:
            raise InputError(400, f"unknown form field '{name}'", name)
        else:
            texts[name] = value
    return texts, uploads


def form_fields(texts: dict[str, str]) -> ChatForm:
    try:
        return ChatForm.model_validate(texts)
    except ValidationError as e:
        first = e.errors()[0]
        raise InputError(400, f"{first['loc'][0]}: {first['msg']}", str(first["loc"][0])) from None


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


def form_stop(stop: str | None) -> str | list[str] | None:
    """A form's `stop` is one string, or a JSON list of strings; text that only looks like a list
    (`[END]`, not JSON) is the string itself."""
    if stop and stop.startswith("["):
        try:
            value = json.loads(stop)
        except json.JSONDecodeError:
            return stop
        if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
            raise InputError(400, "stop: expected a list of strings", "stop")
        return value
    return stop
