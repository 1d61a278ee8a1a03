"""Stored responses belong to the API key that made them: another key can neither read, delete
nor continue one, and is answered as for an id that never was, so ids cannot be probed."""

import base64

import httpx
import openai
import pytest

import media
from gateways import ENV_KEYS, FILE_KEY

GREEDY = {"max_output_tokens": 4, "temperature": 0}


def sdk_for(hardened, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{hardened.url}/v1", api_key=key, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def owner(hardened):
    with sdk_for(hardened, ENV_KEYS[0]) as c:
        yield c


@pytest.fixture(scope="module")
def other(hardened):
    with sdk_for(hardened, FILE_KEY) as c:
        yield c


def refusal(call, *args, **kwargs) -> tuple[type, str, str]:
    """(error class, type, code) of a refused SDK call."""
    with pytest.raises(openai.APIStatusError) as raised:
        call(*args, **kwargs)
    return type(raised.value), raised.value.body["type"], raised.value.body["code"]


def test_responses_need_a_key(hardened):
    assert httpx.post(f"{hardened.url}/v1/responses", json={"input": "hi"}).status_code == 401
    assert httpx.get(f"{hardened.url}/v1/responses/resp_x").status_code == 401
    assert httpx.delete(f"{hardened.url}/v1/responses/resp_x").status_code == 401


def test_another_keys_response_is_as_one_never_made(owner, other):
    image = "data:image/png;base64," + base64.b64encode(media.image("png", seed=74)).decode()
    made = owner.responses.create(input=[{"role": "user", "content": [
        {"type": "input_image", "image_url": image}, {"type": "input_text", "text": "What is it?"}]}], **GREEDY)
    never = "resp_" + "0" * 32
    for call in (other.responses.retrieve, other.responses.delete):
        assert refusal(call, made.id) == refusal(call, never) == (openai.NotFoundError, "not_found_error",
                                                                  "response_not_found")
    assert refusal(other.responses.create, input="And?", previous_response_id=made.id, **GREEDY) == \
        (openai.BadRequestError, "invalid_request_error", "previous_response_not_found")
    # the owner's response is untouched by the other key's delete, and its conversation goes on
    assert owner.responses.retrieve(made.id) == made
    follow_up = owner.responses.create(input="And?", previous_response_id=made.id, **GREEDY)
    assert follow_up.usage.media == made.usage.media
