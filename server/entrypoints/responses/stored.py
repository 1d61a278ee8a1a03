"""Stored responses: the conversation each keeps as text and attachment references, never bytes,
so that `previous_response_id` continues it with nothing sent again: each attachment comes back
from its stored file when it had one, else by its uuid from the prefix caches."""

import json

from fastapi import Request

from server.core.answers import Answer
from server.core.chat import Attachment, Chat, Turn
from server.errors import InputError
from server.media.fetch import Fetcher
from server.media.modalities import MODALITIES
from server.traffic.access import tenant_of


def conversation_record(chat: Chat, system: str | None, answer: Answer, text: str) -> dict:
    """The conversation as a stored response keeps it: the input's system message (instructions
    belong to their request alone, as in OpenAI's API), the turns that were in the prompt, each
    attachment as its modality, uuid and stored files, and the answer."""
    prepared = answer.generation.prepared
    keys = iter(prepared.media)
    turns = [{"role": t.role, "text": t.text,
              "attachments": [{"modality": a.modality, "uuid": next(keys), "options": a.options,
                               "file_ids": a.file_ids} for a in t.attachments]}
             for t in chat.turns[prepared.first_turn:]]
    return {"system": system, "turns": turns + [{"role": "assistant", "text": text, "attachments": []}]}


async def stored_turns(fetcher: Fetcher, record: dict) -> list[Turn]:
    turns = []
    for turn in record["turns"]:
        attachments = []
        for a in turn["attachments"]:
            fields = MODALITIES[a["modality"]].fields
            if set(fields) <= a["file_ids"].keys():  # its stored files outlive any cache
                files = {f: (await fetcher.stored(a["file_ids"][f], "previous_response_id"))[1] for f in fields}
                attachments.append(Attachment(a["modality"], files, a["options"], file_ids=a["file_ids"]))
            else:
                attachments.append(Attachment(a["modality"], {}, a["options"], {fields[0]: "previous_response_id"},
                                              reference=a["uuid"]))
        turns.append(Turn(turn["role"], turn["text"], attachments))
    return turns


async def previous_record(request: Request, response_id: str) -> dict:
    record = await request.app.state.stored_responses.get(tenant_of(request), response_id)
    if record is None:
        raise InputError(400, f"no stored response '{response_id}' for this API key (it may have expired, been "
                              "deleted, or been made with store=false)", "previous_response_id",
                         code="previous_response_not_found")
    return json.loads(record)
