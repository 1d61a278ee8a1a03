"""How `/v1/chat` forms become turns (which uploads belong to which message), and how base64
content parts become bytes."""

import base64
import binascii
import json
import os

import pytest

from server.core.parts import BASE64_PIECE, decode_base64
from server.entrypoints.chat_form.parse import chat_from_form, form_stop
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


# --- base64, decoded a piece at a time ----------------------------------------------------------

@pytest.mark.parametrize("stop, taken", [("[END]", "[END]"), ("[1,", "[1,"), ('["###", "END"]', ["###", "END"]),
                                         ("END", "END")])
def test_a_form_stop_is_a_json_list_of_strings_or_else_the_text_itself(stop, taken):
    assert form_stop(stop) == taken


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def refused(text: str) -> bool:
    try:
        decode_base64(text, "data")
    except InputError as e:
        assert (e.status, e.param) == (400, "data")
        return True
    return False


@pytest.mark.parametrize("size", [0, 1, 2, 3, BASE64_PIECE // 4 * 3, BASE64_PIECE // 4 * 3 + 1, 2 * BASE64_PIECE + 5])
def test_any_length_decodes_to_its_bytes(size):
    data = os.urandom(size)
    assert decode_base64(b64(data), "data") == data


def test_a_data_url_payload_is_decoded_from_its_offset():
    data = os.urandom(3 * BASE64_PIECE)
    url = f"data:image/png;base64,{b64(data)}"
    assert decode_base64(url, "data", start=url.index(",") + 1) == data


def test_padding_at_the_end_of_a_piece_that_is_not_the_last_is_refused():
    """Each piece alone would decode: "YQ==" is valid on its own, but not followed by more."""
    text = "A" * (BASE64_PIECE - 4) + "YQ==" + "AAAA"
    with pytest.raises(binascii.Error):
        base64.b64decode(text, validate=True)
    assert refused(text)


@pytest.mark.parametrize("bad", ["*", " ", "\n", "é", "="])
def test_a_character_outside_the_alphabet_in_any_piece_is_refused(bad):
    data = b64(os.urandom(2 * BASE64_PIECE))
    for at in (10, BASE64_PIECE + 10, len(data) - 10):
        assert refused(data[:at] + bad + data[at + 1:]), (bad, at)


def test_a_number_is_not_base64():
    assert refused(12)  # type: ignore[arg-type]
