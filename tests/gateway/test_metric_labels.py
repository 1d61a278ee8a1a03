"""/metrics has a bounded set of series whatever clients send: a request's `modality` label comes
from the modality registry (or "mixed", "text", "unread"), never from the order or number of its
attachments."""

import random

from gateway_helpers import metrics

FIELDS = ["image", "audio", "video", "point", "fmri", "imu"]  # the upload fields that stand alone


def request_series(client) -> dict[tuple, float]:
    return {labels: value for (name, labels), value in metrics(client).items() if name == "onellm_requests_total"}


def test_requests_in_any_order_of_modalities_add_no_series(client):
    rng = random.Random(0)
    before = request_series(client)
    sent = 1000
    for _ in range(sent):
        # bytes no decoder reads: refused while decoding, once the chat is read and its label known
        fields = rng.sample(FIELDS, rng.randrange(2, 5))
        response = client.post("/v1/chat", data={"prompt": "What is it?", "max_tokens": "1"},
                               files=[(f, ("x.bin", b"not media", "application/octet-stream")) for f in fields])
        assert 400 <= response.status_code < 500, response.text
    after = request_series(client)
    counted = {labels: value - before.get(labels, 0.0) for labels, value in after.items()
               if value != before.get(labels, 0.0)}
    assert sum(counted.values()) == sent
    assert {dict(labels)["modality"] for labels in counted} == {"mixed"}, counted
