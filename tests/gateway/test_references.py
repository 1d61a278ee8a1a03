"""Attachments sent once: the gateway names each attachment by a uuid (its content hash, or the
client's own name for it) and later turns send the uuid instead of the bytes."""

import base64
import re

import media
from gateway_helpers import assert_error, metric

VIDEO = media.video("mp4", seed=41)
IMAGE = media.image("png", seed=42)
GREEDY = {"max_tokens": 6, "temperature": 0}


def data_url(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def video_part(data: bytes | None = None, uuid: str | None = None) -> dict:
    part = {"type": "video_url"}
    if data is not None:
        part["video_url"] = {"url": data_url(data, "video/mp4")}
    return part | ({"uuid": uuid} if uuid else {})


def turn(text: str, *parts: dict) -> dict:
    return {"role": "user", "content": [*parts, {"type": "text", "text": text}]}


def complete(client, messages: list[dict]):
    return client.post("/v1/chat/completions", json={"messages": messages, **GREEDY})


def answer(response) -> str:
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def conversation(first_part: dict, later_part: dict, client) -> list[str]:
    """Three turns about one video: its first part as given, the later turns' as `later_part`.
    Returns the answers."""
    messages, answers = [], []
    for i, question in enumerate(["What happens?", "And then?", "Why?"]):
        messages.append(turn(question, first_part if i == 0 else later_part))
        answers.append(answer(complete(client, messages)))
        messages[-1] = turn(question, later_part)  # history holds the reference from now on
        messages.append({"role": "assistant", "content": answers[-1]})
    return answers


def test_each_attachment_is_named_in_a_header_and_in_usage(client):
    response = complete(client, [turn("Compare them.", video_part(VIDEO),
                                      {"type": "image_url", "image_url": {"url": data_url(IMAGE, "image/png")}})])
    uuids = response.headers["X-Media-UUIDs"].split(",")
    assert len(uuids) == 2 and all(re.fullmatch(r"[0-9a-f]{64}", u) for u in uuids) and uuids[0] != uuids[1]
    assert response.json()["usage"]["media"] == uuids
    text_only = complete(client, [{"role": "user", "content": "Hello"}])
    assert "X-Media-UUIDs" not in text_only.headers and "media" not in text_only.json()["usage"]


def test_follow_ups_by_uuid_answer_as_resending(client):
    video = media.video("mp4", seed=43)
    resent = conversation(video_part(video), video_part(video), client)
    uuid = complete(client, [turn("What happens?", video_part(video))]).headers["X-Media-UUIDs"]
    served = metric(client, "onellm_media_references_total", outcome="served")
    assert conversation(video_part(video), video_part(uuid=uuid), client) == resent
    # each earlier turn of the history is a reference too: 2 in turn 2, 3 in turn 3
    assert metric(client, "onellm_media_references_total", outcome="served") == served + 5


def test_a_client_may_name_the_bytes_itself(client):
    video = media.video("mp4", seed=44)
    resent = conversation(video_part(video), video_part(video), client)
    assert conversation(video_part(video, uuid="clip-44"), video_part(uuid="clip-44"), client) == resent


def test_a_name_given_again_with_other_bytes_means_the_new_bytes(client):
    first, second = media.video("mp4", seed=45), media.video("mp4", seed=46)
    assert answer(complete(client, [turn("Describe.", video_part(first, uuid="renamed"))]))
    expected = answer(complete(client, [turn("Describe.", video_part(second))]))
    answer(complete(client, [turn("Describe.", video_part(second, uuid="renamed"))]))
    assert answer(complete(client, [turn("Describe.", video_part(uuid="renamed"))])) == expected


def test_an_unknown_uuid_asks_for_the_data_again_naming_the_part(client):
    not_found = metric(client, "onellm_media_references_total", outcome="not_found")
    response = complete(client, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                                 turn("And this?", video_part(uuid="never-sent"))])
    error = assert_error(response, 400, "messages[2].content[0]")
    assert error["code"] == "media_not_found" and "never-sent" in error["message"] and "again" in error["message"]
    assert metric(client, "onellm_media_references_total", outcome="not_found") == not_found + 1


def test_a_uuid_in_a_part_of_another_modality_is_refused(client):
    uuid = complete(client, [turn("What happens?", video_part(VIDEO))]).headers["X-Media-UUIDs"]
    response = complete(client, [turn("And this?", {"type": "image_url", "uuid": uuid})])
    assert "video" in assert_error(response, 400, "messages[0].content[0]")["message"]


def test_bad_uuids_and_empty_parts_are_refused(client):
    assert_error(complete(client, [turn("x", video_part(VIDEO, uuid="no spaces"))]), 400, "messages[0].content[0].uuid")
    assert_error(complete(client, [turn("x", {"type": "video_url", "uuid": 7})]), 400, "messages[0].content[0].uuid")
    error = assert_error(complete(client, [turn("x", {"type": "video_url"})]), 400, "messages[0].content[0]")
    assert "uuid" in error["message"]


def test_an_image_with_its_depth_map_is_one_reference(client):
    image, depth = media.image("png", seed=47), media.depth_map(seed=47)
    pair = [{"type": "image_url", "image_url": {"url": data_url(image, "image/png")}},
            {"type": "input_depth", "input_depth": {"data": base64.b64encode(depth).decode()}}]
    first = complete(client, [turn("What is near?", *pair)])
    expected = answer(complete(client, [turn("And far?", *pair)]))
    uuid = first.headers["X-Media-UUIDs"]
    assert answer(complete(client, [turn("And far?", {"type": "image_url", "uuid": uuid})])) == expected
    by_depth = complete(client, [turn("And far?", {"type": "input_depth", "uuid": uuid})])
    assert "image" in assert_error(by_depth, 400, "messages[0].content[0]")["message"]


def test_a_streamed_answer_names_its_attachments_in_the_header(client):
    with client.stream("POST", "/v1/chat/completions",
                       json={"messages": [turn("Go", video_part(VIDEO))], "stream": True, **GREEDY}) as response:
        assert response.status_code == 200
        uuid = response.headers["X-Media-UUIDs"]
        response.read()
    plain = complete(client, [turn("Go", video_part(VIDEO))])
    assert uuid == plain.headers["X-Media-UUIDs"]


def test_the_form_endpoint_takes_references(client):
    video = media.video("mp4", seed=48)
    form = {"prompt": "What happens?", "stream": "false", "max_tokens": "6", "temperature": "0"}
    sent = client.post("/v1/chat", data=form, files={"video": ("clip.mp4", video)})
    uuid = sent.headers["X-Media-UUIDs"]
    assert answer(client.post("/v1/chat", data={**form, "video_ref": uuid})) == answer(sent)
    # a history message names its attachment; the reference fills it as an upload would
    history = '[{"role": "user", "content": "What happens?", "attachments": ["video"]}, ' \
              f'{{"role": "assistant", "content": "{answer(sent)}"}}]'
    follow_up = {**form, "prompt": "And then?", "messages": history}
    by_upload = client.post("/v1/chat", data=follow_up, files={"video": ("clip.mp4", video)})
    assert answer(client.post("/v1/chat", data={**follow_up, "video_ref": uuid})) == answer(by_upload)
    error = assert_error(client.post("/v1/chat", data={**form, "video_ref": "never-sent"}), 400, "video_ref")
    assert error["code"] == "media_not_found"
    assert_error(client.post("/v1/chat", data={**form, "video_ref": "bad ref"}), 400, "video_ref")
