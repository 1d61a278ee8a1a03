"""Each `input_imu` part of a message is read at its own `sample_rate`: two parts of one message
give the inputs each gives sent alone."""

import base64

import torch

import media
from server.config import Settings
from server.core.prefixes import preprocess_attachment
from server.entrypoints.chat_completions.parse import chat_from_openai
from server.entrypoints.chat_completions.protocol import ChatCompletionRequest
from server.media.fetch import Fetched


def imu_part(data: bytes, rate: float) -> dict:
    return {"type": "input_imu", "input_imu": {"data": base64.b64encode(data).decode(), "sample_rate": rate}}


def model_inputs(*parts: dict) -> list[torch.Tensor]:
    request = ChatCompletionRequest(messages=[{"role": "user", "content": [*parts, {"type": "text", "text": "?"}]}])
    (turn,) = chat_from_openai(request, Fetched()).turns
    return [preprocess_attachment(attachment, Settings().decoder_limits()) for attachment in turn.attachments]


def test_two_imu_parts_of_one_message_keep_their_own_sample_rates():
    slow, fast = imu_part(media.imu("npy", seed=1, rate=50), 50), imu_part(media.imu("npy", seed=2, rate=400), 400)
    (slow_alone,), (fast_alone,) = model_inputs(slow), model_inputs(fast)
    slow_together, fast_together = model_inputs(slow, fast)
    assert torch.equal(slow_together, slow_alone)
    assert torch.equal(fast_together, fast_alone)
    # and the rate matters: read at the other part's rate, the input is another one
    (slow_at_400,) = model_inputs(imu_part(media.imu("npy", seed=1, rate=50), 400))
    assert not torch.equal(slow_at_400, slow_alone)
