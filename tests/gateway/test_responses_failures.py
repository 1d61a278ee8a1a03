"""`POST /v1/responses` when a request cannot be served, on a gateway over a stand-in vLLM on
loopback (tests/vllm_standin.py) with one slot, no queue and a 4 s request timeout: 429 past the
queue, 503 when the backend is gone before the response starts, `response.failed` counted 503 when
it is cut after, and 504 once the request timeout passes."""

import json
import time

import httpx
import pytest

from gateway_helpers import assert_error, metric
from gateway_process import GatewayProcess, flags, serving
from vllm_standin import ANSWER, CUT_AFTER_TEXT, HOLD, RECORDED_DELTAS

SETTINGS = {"max_concurrent": 1, "max_queued": 0, "request_timeout_s": 4}
REQUEST = {"input": "Hi", "max_output_tokens": 8}


@pytest.fixture(scope="module")
def gateway(model_dir, standin, tmp_path_factory):
    yield from serving(GatewayProcess(model_dir, tmp_path_factory.mktemp("responses-failures"),
                                      ["--vllm-url", standin.url, *flags(SETTINGS)]))


@pytest.fixture
def client(gateway, standin):
    standin.completions = ANSWER
    standin.release.clear()
    with httpx.Client(base_url=gateway.url, timeout=60) as client:
        yield client
        standin.release.set()
        until_the_slot_is_free(client)  # the next test needs it


def until_the_slot_is_free(client: httpx.Client) -> None:
    """The one slot is free a moment after a response's last byte, not at once."""
    deadline = time.monotonic() + 30
    while metric(client, "onellm_queue_depth") > 0:
        assert time.monotonic() < deadline, "a request still holds the slot"
        time.sleep(0.05)


def events_of(text: str) -> list[tuple[str, dict]]:
    """(event name, data) of each Responses event."""
    events = []
    for block in filter(str.strip, text.split("\n\n")):
        name, data = block.split("\n", 1)
        events.append((name.removeprefix("event: "), json.loads(data.removeprefix("data: "))))
    return events


def counted(client, status: str) -> float:
    return metric(client, "onellm_requests_total", modality="text", status=status)


def test_a_response_past_the_queue_is_a_429(client, standin):
    standin.completions = HOLD  # the first text, then the rest once released
    refused = metric(client, "onellm_rejected_requests_total", reason="overloaded")
    with client.stream("POST", "/v1/responses", json={**REQUEST, "stream": True}) as held:
        chunks = held.iter_text()  # kept: a dropped iterator would close the response
        text = ""
        while RECORDED_DELTAS[0] not in text:
            text += next(chunks)
        over = client.post("/v1/responses", json=REQUEST)
        standin.release.set()
        text += "".join(chunks)
    error = assert_error(over, 429)
    assert "max_concurrent, max_queued" in error["message"], error
    assert over.headers["retry-after"] == "1"
    assert metric(client, "onellm_rejected_requests_total", reason="overloaded") == refused + 1
    assert events_of(text)[-1][0] == "response.incomplete"  # the held one went on to its end


def test_a_backend_gone_before_the_response_starts_is_a_503(client, standin):
    standin.stop()
    try:
        for stream in (False, True):
            response = client.post("/v1/responses", json={**REQUEST, "stream": stream})
            error = assert_error(response, 503)
            assert error["code"] == "engine_unavailable" and response.headers["retry-after"] == "1"
            assert str(standin.port) not in error["message"]
            until_the_slot_is_free(client)
    finally:
        standin.start()


def test_a_backend_cut_mid_response_is_response_failed_counted_503(client, standin):
    standin.completions = CUT_AFTER_TEXT
    failed = counted(client, "503")
    response = client.post("/v1/responses", json={**REQUEST, "stream": True})
    assert response.status_code == 200
    events = events_of(response.text)
    names = [name for name, _ in events]
    assert names[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"], names
    assert names[4:] == ["response.output_text.delta", "response.failed"], names
    failure = events[-1][1]["response"]
    assert failure["status"] == "failed" and response.headers["x-request-id"] in failure["error"]["message"]
    assert [data["sequence_number"] for _, data in events] == list(range(len(events)))
    assert counted(client, "503") == failed + 1


def test_a_response_past_the_request_timeout_is_a_504(client, standin):
    standin.completions = HOLD  # never released: only the request timeout ends these
    timeouts = metric(client, "onellm_rejected_requests_total", reason="timeout")
    # one after the other, the gateway has one slot; a request that hung would fail at 60 s
    answers = {}
    for stream in (False, True):
        answers[stream] = client.post("/v1/responses", json={**REQUEST, "stream": stream})
        until_the_slot_is_free(client)
    error = assert_error(answers[False], 504)
    assert "(request_timeout_s)" in error["message"], error
    streamed = answers[True]
    assert streamed.status_code == 200
    blocks = [b for b in streamed.text.split("\n\n") if b.strip()]
    assert blocks[0].startswith("event: response.created\n")
    assert RECORDED_DELTAS[0] in streamed.text  # it had started when the timeout cut it
    # the chat endpoints' error event (docs/reliability.md, Not covered), then the end
    assert blocks[-2].startswith("event: error\n") and blocks[-1] == "data: [DONE]", blocks[-2:]
    assert json.loads(blocks[-2].split("data: ", 1)[1])["error"]["type"] == "timeout"
    assert metric(client, "onellm_rejected_requests_total", reason="timeout") == timeouts + 2
