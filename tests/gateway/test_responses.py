"""OpenAI's Responses API through the official `openai` SDK, against the session's real `onellm serve`.

A response is the chat /v1/chat/completions makes of the same parts, so every answer here is
checked against that endpoint's answer to the same conversation under the same sampling (greedy
unless a seed is given), and its prompt size against the spec's (gateway_helpers)."""

import base64

import openai
import pytest

import media
from gateway_helpers import expected_prompt_tokens

PROMPT = "Describe it in detail."
GREEDY = {"temperature": 0, "max_output_tokens": 6}
STREAM_START = ["response.created", "response.in_progress", "response.output_item.added",
                "response.content_part.added"]  # then the deltas, STREAM_END, and completed | incomplete
STREAM_END = ["response.output_text.done", "response.content_part.done", "response.output_item.done"]


@pytest.fixture(scope="module")
def sdk(base_url):
    with openai.OpenAI(base_url=f"{base_url}/v1", api_key="not-needed", max_retries=0, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def respond(sdk, served_model):
    """`client.responses.create` for the served model."""
    return lambda **fields: sdk.responses.create(model=served_model, **fields)


def data_url(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def user(text: str, *parts: dict, kind: str = "input_text") -> dict:
    return {"role": "user", "content": [{"type": kind, "text": text}, *parts]}


def chat_completion(client, messages: list[dict], max_tokens: int = GREEDY["max_output_tokens"], **sampling) -> dict:
    response = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": max_tokens,
                                                         **({"temperature": 0} | sampling)})
    assert response.status_code == 200, response.text
    return response.json()


def assert_same_answer(response, chat: dict) -> None:
    """A response and a chat completion of the same conversation: the same text, prompt and attachments."""
    assert response.output_text == chat["choices"][0]["message"]["content"]
    assert response.usage.input_tokens == chat["usage"]["prompt_tokens"]
    assert response.usage.output_tokens == chat["usage"]["completion_tokens"]
    assert response.usage.total_tokens == response.usage.input_tokens + response.usage.output_tokens
    assert response.usage.media == chat["usage"].get("media")


# --- one attachment of each modality ------------------------------------------------------------

def image(data: bytes, mime: str = "image/png") -> tuple[dict, dict]:
    """(the Responses part, the chat-completions part) of one image."""
    url = data_url(data, mime)
    return {"type": "input_image", "image_url": url}, {"type": "image_url", "image_url": {"url": url}}


def array(field: str, data: bytes, **options) -> tuple[dict, dict]:
    """An upload as Responses parts carry it (flat) and as chat parts do (nested)."""
    body = {"data": base64.b64encode(data).decode(), **options}
    return {"type": f"input_{field}", **body}, {"type": f"input_{field}", f"input_{field}": body}


def attachment(name: str, seed: int) -> list[tuple[dict, dict]]:
    """The (Responses part, chat part) pairs that carry one attachment of `name`."""
    if name == "image":
        return [image(media.image("png", seed))]
    if name == "video":
        url = data_url(media.video("mp4", seed), "video/mp4")
        return [({"type": "input_video", "video_url": url}, {"type": "video_url", "video_url": {"url": url}})]
    if name == "audio":
        audio = {"data": base64.b64encode(media.audio("wav", seed)).decode(), "format": "wav"}
        return [({"type": "input_audio", "input_audio": audio}, {"type": "input_audio", "input_audio": audio})]
    if name == "point":
        return [array("point", media.point("ply", seed))]
    if name == "rgbd":
        return [image(media.image("jpg", seed), "image/jpeg"), array("depth", media.depth_map(seed))]
    if name == "rgbn":
        return [image(media.image("webp", seed), "image/webp"), array("normal", media.normal_map(seed))]
    if name == "fmri":
        return [array("fmri", media.fmri("npy", seed))]
    if name == "fmri-nested":  # the chat part's own shape is a Responses part too
        chat_part = array("fmri", media.fmri("csv", seed))[1]
        return [(chat_part, chat_part)]
    if name == "imu":
        return [array("imu", media.imu("csv", seed, rate=50), sample_rate=50)]
    raise AssertionError(name)


KINDS = ["image", "video", "audio", "point", "rgbd", "rgbn", "fmri", "fmri-nested", "imu"]


@pytest.mark.parametrize("name", KINDS)
def test_every_modality_answers_as_chat_completions(respond, client, model_dir, name):
    pairs = attachment(name, seed=300 + KINDS.index(name))
    response = respond(input=[user(PROMPT, *(r for r, _ in pairs))], **GREEDY)
    assert response.object == "response" and response.id.startswith("resp_")
    assert [(item.type, item.role) for item in response.output] == [("message", "assistant")]
    assert response.usage.input_tokens == expected_prompt_tokens(model_dir, [("user", PROMPT)], attachments=1)
    assert_same_answer(response, chat_completion(client, [user(PROMPT, *(c for _, c in pairs), kind="text")]))


@pytest.mark.parametrize("part", ["input_image", "input_file"])
def test_a_stored_file_answers_as_its_bytes_sent_inline(sdk, served_model, client, part):
    data = media.image("png", seed=320)
    stored = sdk.files.create(file=("photo.png", data), purpose="vision")
    raw = sdk.responses.with_raw_response.create(model=served_model, **GREEDY,
                                                 input=[user(PROMPT, {"type": part, "file_id": stored.id})])
    response = raw.parse()
    assert_same_answer(response, chat_completion(client, [user(PROMPT, image(data)[1], kind="text")]))
    assert raw.headers["X-Media-UUIDs"] == ",".join(response.usage.media)


# --- streaming, and how an answer ends ----------------------------------------------------------

def stopping_seed(client, messages: list[dict]) -> tuple[int, dict]:
    """A seed whose sampled answer (temperature 2) ends by itself, not empty, before 48 tokens,
    found through chat completions; the tiny model's greedy answers never do."""
    for seed in range(200):
        chat = chat_completion(client, messages, max_tokens=48, temperature=2.0, seed=seed)
        if chat["choices"][0]["finish_reason"] == "stop" and chat["choices"][0]["message"]["content"]:
            return seed, chat
    pytest.fail("no seed in 200 made an answer that stops by itself")


def ending(client, prompt: str, how: str) -> tuple[dict, dict]:
    """(the Responses fields, the chat completion they must match) of an answer that is cut by
    max_output_tokens (`how` = "cut") or that stops by itself ("stopped")."""
    messages = [{"role": "user", "content": prompt}]
    if how == "cut":
        chat = chat_completion(client, messages, max_tokens=5)
        assert chat["choices"][0]["finish_reason"] == "length"
        return {"max_output_tokens": 5, "temperature": 0}, chat
    seed, chat = stopping_seed(client, messages)
    return {"max_output_tokens": 48, "temperature": 2.0, "extra_body": {"seed": seed}}, chat


@pytest.mark.parametrize("how, status", [("cut", "incomplete"), ("stopped", "completed")])
def test_a_stream_is_the_documented_event_sequence(sdk, respond, client, how, status):
    prompt = f"Tell me a story ({how})."
    fields, chat = ending(client, prompt, how)
    events = list(respond(input=prompt, stream=True, **fields))

    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert deltas, "the answer came in no delta"
    assert [e.type for e in events] == [*STREAM_START, *["response.output_text.delta"] * len(deltas), *STREAM_END,
                                        f"response.{status}"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(d.delta for d in deltas)
    done, final = events[-4], events[-1].response
    assert done.text == text and events[-3].part.text == text and events[-2].item.content[0].text == text
    assert final.status == status and final.output_text == text and final.output[0].status == status
    assert getattr(final.incomplete_details, "reason", None) == (None if status == "completed" else "max_output_tokens")
    assert events[0].response.id == final.id and events[0].response.status == "in_progress"
    assert {e.item_id for e in events if hasattr(e, "item_id")} == {final.output[0].id}
    assert_same_answer(final, chat)
    # unstreamed, the same request is the same answer; the streamed one was stored as it was sent
    whole = respond(input=prompt, **fields)
    assert whole.status == status and whole.incomplete_details == final.incomplete_details
    assert_same_answer(whole, chat)
    assert sdk.responses.retrieve(final.id) == final


# --- conversations: instructions, system messages, previous_response_id -------------------------

QUESTIONS = ["What is in it?", "Which colours?", "Why?"]


def chain(respond, first_input: list[dict], questions: list[str], **fields) -> list:
    """The responses of a conversation whose first turn is `first_input` and whose later turns
    send only their question, with the previous response's id."""
    responses = [respond(input=first_input, **GREEDY, **fields)]
    for question in questions:
        responses.append(respond(input=question, previous_response_id=responses[-1].id, **GREEDY))
        assert responses[-1].previous_response_id == responses[-2].id
    return responses


def assert_answers_as_resent(client, responses: list, messages: list[dict], questions: list[str]) -> None:
    """Each response of a chain against the chat completion of the whole conversation so far,
    `messages` being its first turn with every attachment's data."""
    messages = list(messages)
    for response, question in zip(responses, [None, *questions]):
        if question is not None:
            messages.append({"role": "user", "content": question})
        assert_same_answer(response, chat_completion(client, messages))
        messages.append({"role": "assistant", "content": response.output_text})


@pytest.mark.parametrize("name, seed", [("image", 331), ("rgbd", 332), ("audio", 333)])
def test_previous_response_id_answers_as_the_conversation_resent(respond, client, name, seed):
    pairs = attachment(name, seed)
    responses = chain(respond, [user(QUESTIONS[0], *(r for r, _ in pairs))], QUESTIONS[1:])
    assert_answers_as_resent(client, responses, [user(QUESTIONS[0], *(c for _, c in pairs), kind="text")],
                             QUESTIONS[1:])


def test_a_conversation_reads_its_stored_file_back(sdk, respond, client):
    data = media.image("png", seed=334)
    stored = sdk.files.create(file=("a.png", data), purpose="vision")
    responses = chain(respond, [user(QUESTIONS[0], {"type": "input_image", "file_id": stored.id})], QUESTIONS[1:])
    assert_answers_as_resent(client, responses, [user(QUESTIONS[0], image(data)[1], kind="text")], QUESTIONS[1:])


def test_instructions_are_the_system_prompt_of_their_own_request(respond, client, model_dir):
    instructions = "You answer in one word."
    responses = chain(respond, [user("Hello there")], ["And now?"], instructions=instructions)
    assert responses[0].instructions == instructions and responses[1].instructions is None
    assert responses[0].usage.input_tokens == expected_prompt_tokens(model_dir, [("user", "Hello there")], 0,
                                                                     system=instructions)
    assert_same_answer(responses[0], chat_completion(client, [{"role": "system", "content": instructions},
                                                              user("Hello there", kind="text")]))
    # as in OpenAI's API, the next response does not inherit them: it has the model's own system prompt
    assert_answers_as_resent(client, responses[1:], [user("Hello there", kind="text"),
                                                     {"role": "assistant", "content": responses[0].output_text},
                                                     {"role": "user", "content": "And now?"}], [])


@pytest.mark.parametrize("role", ["system", "developer"])
def test_a_system_message_in_the_input_stays_in_the_conversation(respond, client, role):
    system = "You are a careful art critic."
    responses = chain(respond, [{"role": role, "content": system}, user(QUESTIONS[0])], QUESTIONS[1:])
    assert_answers_as_resent(client, responses, [{"role": "system", "content": system},
                                                 user(QUESTIONS[0], kind="text")], QUESTIONS[1:])


def test_earlier_answers_sent_back_as_input_are_history(respond, client):
    first = respond(input="Name a colour.", **GREEDY)
    history = [user("Name a colour."), *[item.model_dump() for item in first.output], user("Another one?")]
    response = respond(input=history, store=False, **GREEDY)
    assert_same_answer(response, chat_completion(client, [user("Name a colour.", kind="text"),
                                                          {"role": "assistant", "content": first.output_text},
                                                          user("Another one?", kind="text")]))


# --- stored responses ---------------------------------------------------------------------------

def assert_refused(error: openai.APIStatusError, param: str | None, code: str | None) -> None:
    assert error.body["param"] == param and error.body["code"] == code, error.body
    assert error.body["message"] and "Traceback" not in error.body["message"]


def test_a_stored_response_is_retrieved_until_deleted(sdk, respond):
    response = respond(input="Hi there", metadata={"case": "retrieve"}, **GREEDY)
    assert response.store is True and response.metadata == {"case": "retrieve"}
    assert sdk.responses.retrieve(response.id) == response
    sdk.responses.delete(response.id)
    for gone in (sdk.responses.retrieve, sdk.responses.delete):
        with pytest.raises(openai.NotFoundError) as raised:
            gone(response.id)
        assert_refused(raised.value, "response_id", "response_not_found")
    with pytest.raises(openai.BadRequestError) as raised:
        respond(input="More?", previous_response_id=response.id, **GREEDY)
    assert_refused(raised.value, "previous_response_id", "previous_response_not_found")


def test_an_unstored_response_can_be_neither_continued_nor_read(sdk, respond):
    response = respond(input="Hi there", store=False, **GREEDY)
    assert response.store is False and response.output_text
    with pytest.raises(openai.BadRequestError) as raised:
        respond(input="More?", previous_response_id=response.id, **GREEDY)
    assert_refused(raised.value, "previous_response_id", "previous_response_not_found")
    with pytest.raises(openai.NotFoundError):
        sdk.responses.retrieve(response.id)


# --- errors, in OpenAI's shape ------------------------------------------------------------------

def hi(*parts: dict) -> list[dict]:
    return [user("Hi", *parts)]


REFUSED = {  # what is wrong: (the request's fields, the param and code of the error)
    "unknown previous_response_id": ({"input": "Hi", "previous_response_id": "resp_never_made"},
                                     "previous_response_id", "previous_response_not_found"),
    "unsupported part": ({"input": hi({"type": "input_hologram", "data": "AAAA"})}, "input[0].content[1].type", None),
    "tools": ({"input": "Hi", "tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}}]},
              "tools", None),
    "uuid never sent": ({"input": hi({"type": "input_image", "uuid": "never-sent-0001"})}, "input[0].content[1]",
                        "media_not_found"),
    "content hash never sent": ({"input": hi({"type": "input_video", "uuid": "f" * 64})}, "input[0].content[1]",
                                "media_not_found"),
    "file never stored": ({"input": hi({"type": "input_image", "file_id": "file-" + "0" * 24})},
                          "input[0].content[1].file_id", "file_not_found"),
    "URL scheme": ({"input": hi({"type": "input_image", "image_url": "ftp://example.com/a.png"})},
                   "input[0].content[1].image_url", None),
    "base64, flat": ({"input": hi({"type": "input_fmri", "data": "not base64!"})}, "input[0].content[1].data", None),
    "base64, nested": ({"input": hi({"type": "input_fmri", "input_fmri": {"data": "not base64!"}})},
                       "input[0].content[1].input_fmri.data", None),
    "sample rate": ({"input": hi({"type": "input_imu", "data": "AAAA", "sample_rate": -1})},
                    "input[0].content[1].sample_rate", None),
    "depth without image": ({"input": hi({"type": "input_depth", "data": "AAAA"})}, "input[0].content", None),
    "insane uuid": ({"input": hi({"type": "input_image", "uuid": "has spaces"})}, "input[0].content[1].uuid", None),
    "part type not a string": ({"input": hi({"type": ["input_text"]})}, "input[0].content[1]", None),
    "role not a string": ({"input": [{"role": ["user"], "content": "Hi"}]}, "input[0].role", None),
    "content an object": ({"input": [{"role": "user", "content": {"text": "Hi"}}]}, "input[0].content", None),
    "item not a message": ({"input": [{"type": "function_call_output", "call_id": "c", "output": "x"}]},
                           "input[0].type", None),
    "item not an object": ({"input": ["Hi"]}, "input[0]", None),
    "no item": ({"input": []}, "input", None),
    "last message not the user's": ({"input": [{"role": "user", "content": "Hi"},
                                               {"role": "assistant", "content": "Hello"}]}, "input", None),
    "attachment from the assistant": ({"input": [{"role": "assistant", "content": [
        {"type": "input_image", "image_url": "data:image/png;base64,"}]}, {"role": "user", "content": "Hi"}]},
        "input[0].content", None),
    "max_output_tokens over the limit": ({"input": "Hi", "max_output_tokens": 100_000}, "max_output_tokens", None),
    "longer than the context window": ({"input": "word " * 4000, "max_output_tokens": 8}, "input", None),
    # metadata is stored with the response, in Redis too: bounded as OpenAI bounds it
    "metadata, 17 pairs": ({"input": "Hi", "metadata": {f"k{i}": "v" for i in range(17)}}, "metadata", None),
    "metadata, a long key": ({"input": "Hi", "metadata": {"k" * 65: "v"}}, "metadata", None),
    "metadata, a long value": ({"input": "Hi", "metadata": {"k": "v" * 513}}, "metadata", None),
}


@pytest.mark.parametrize("fields, param, code", REFUSED.values(), ids=REFUSED.keys())
def test_a_refused_request_names_its_field(respond, fields, param, code):
    with pytest.raises(openai.BadRequestError) as raised:
        respond(**fields)
    assert raised.value.body["type"] == "invalid_request_error"
    assert_refused(raised.value, param, code)


def test_a_model_not_served_is_a_404(sdk):
    with pytest.raises(openai.NotFoundError) as raised:
        sdk.responses.create(model="gpt-4o", input="Hi", max_output_tokens=1)
    assert_refused(raised.value, "model", None)
