"""How `/v1/chat` forms become turns: which uploads belong to which message."""

import json

import pytest

from server.api.uploads import chat_from_form
from server.errors import InputError


def test_history_messages_take_their_named_uploads_and_the_rest_go_to_the_current_turn():
    history = [{"role": "user", "content": "What is this?", "attachments": ["image", "depth"]},
               {"role": "assistant", "content": "A room."}]
    uploads = [("image", b"old"), ("depth", b"old-depth"), ("image", b"new"), ("audio", b"sound")]
    chat = chat_from_form("And now?", json.dumps(history), uploads, {})
    first, answer, current = chat.turns
    assert [(a.modality, a.files) for a in first.attachments] == [("rgbd", {"image": b"old", "depth": b"old-depth"})]
    assert answer.attachments == []
    assert [(a.modality, a.files) for a in current.attachments] == [("image", {"image": b"new"}),
                                                                    ("audio", {"audio": b"sound"})]


def test_a_history_message_naming_a_missing_upload_is_refused():
    history = [{"role": "user", "content": "Hi", "attachments": ["video"]}, {"role": "assistant", "content": "Hello"}]
    with pytest.raises(InputError) as error:
        chat_from_form("More", json.dumps(history), [("image", b"x")], {})
    assert error.value.status == 400 and error.value.param == "messages[0].attachments"


def test_assistant_messages_carry_no_attachments():
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello", "attachments": ["image"]}]
    with pytest.raises(InputError) as error:
        chat_from_form("More", json.dumps(history), [("image", b"x")], {})
    assert error.value.param == "messages[1].attachments"
