"""How a failure reaches the client, through a real gateway over a stand-in vLLM on loopback
(tests/vllm_standin.py): a stream that has started always ends in its error event (and [DONE]),
counted under its real status; error bodies name no backend and pass on no text of vLLM's, but the
request id under which the log has the detail."""

import json

import httpx
import pytest

from gateway_helpers import assert_error, metric
from gateway_process import GatewayProcess
from vllm_standin import ANSWER, BAD_JSON, BAD_UTF8, CUT_AFTER_TEXT, RECORDED_DELTAS, REJECT

MESSAGES = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def gateway(model_dir, standin, tmp_path_factory):
    # its own gateway: the failures it is shown are logged with their tracebacks, on purpose
    server = GatewayProcess(model_dir, tmp_path_factory.mktemp("stream-failures"), ["--vllm-url", standin.url])
    server.start()
    yield server
    assert server.stop() == 0


@pytest.fixture
def client(gateway, standin):
    standin.completions = ANSWER
    with httpx.Client(base_url=gateway.url, timeout=60) as client:
        yield client


def events_of(response: httpx.Response) -> list[str]:
    assert response.status_code == 200, response.text
    return [e for e in response.text.split("\n\n") if e.strip()]


def stream_past_first_text(client, standin, path: str, body: dict) -> tuple[httpx.Response, list[str]]:
    """Streams `path`; once the first text has come, the stand-in sends the rest (its fault)."""
    standin.release.clear()
    with client.stream("POST", path, json={**body, "stream": True}) as response:
        assert response.status_code == 200, response.read()
        text = ""
        for chunk in response.iter_text():
            text += chunk
            if RECORDED_DELTAS[0] in text:
                standin.release.set()
    return response, [e for e in text.split("\n\n") if e.strip()]


def counted(client, status: str) -> float:
    return metric(client, "onellm_requests_total", modality="text", status=status)


@pytest.mark.parametrize("fault", [BAD_JSON, BAD_UTF8])
def test_an_unreadable_event_from_vllm_ends_the_chat_stream_with_a_500_error_event(client, gateway, standin, fault):
    standin.completions = fault
    failed, dropped = counted(client, "500"), counted(client, "499")
    tracebacks = gateway.log().count("Traceback")
    response, events = stream_past_first_text(client, standin, "/v1/chat/completions", {"messages": MESSAGES})
    assert events[-1] == "data: [DONE]"
    assert events[-2].startswith("event: error\n")
    error = json.loads(events[-2].split("data: ", 1)[1])["error"]
    assert error["type"] == "internal_error"
    assert response.headers["x-request-id"] in error["message"]
    contents = [json.loads(e[len("data: "):])["choices"][0]["delta"].get("content") for e in events[:-2]]
    assert "".join(c or "" for c in contents) == RECORDED_DELTAS[0]
    assert counted(client, "500") == failed + 1 and counted(client, "499") == dropped
    # once, with its traceback, under the request's id
    log = gateway.log()
    assert log.count("Traceback") == tracebacks + 1
    assert f"[{response.headers['x-request-id']}] the answer failed mid-stream" in log


def test_an_unreadable_event_from_vllm_ends_the_responses_stream_with_response_failed(client, standin):
    standin.completions = BAD_JSON
    failed, dropped = counted(client, "500"), counted(client, "499")
    response, events = stream_past_first_text(client, standin, "/v1/responses", {"input": "Hi"})
    assert events[-1].startswith("event: response.failed\n")
    failure = json.loads(events[-1].split("data: ", 1)[1])["response"]
    assert failure["status"] == "failed"
    assert response.headers["x-request-id"] in failure["error"]["message"]
    assert counted(client, "500") == failed + 1 and counted(client, "499") == dropped


def test_a_backend_failing_mid_stream_is_a_503_event_that_names_no_backend(client, gateway, standin):
    standin.completions = CUT_AFTER_TEXT
    response = client.post("/v1/chat/completions", json={"messages": MESSAGES, "stream": True})
    events = events_of(response)
    assert events[-1] == "data: [DONE]"
    error = json.loads(events[-2].split("data: ", 1)[1])["error"]
    assert error["type"] == "service_unavailable" and error["code"] == "engine_unavailable"
    assert str(standin.port) not in error["message"]
    assert response.headers["x-request-id"] in error["message"]
    assert f"[{response.headers['x-request-id']}]" in gateway.log()


def test_a_prompt_vllm_refuses_is_a_400_in_our_words(client, gateway, standin):
    standin.completions = REJECT
    response = client.post("/v1/chat/completions", json={"messages": MESSAGES})
    error = assert_error(response, 400, "messages")
    assert error["code"] == "context_length_exceeded"
    assert "maximum context length" not in error["message"]  # vLLM's words, which the log keeps
    assert "maximum context length" in gateway.log()


def test_an_unreachable_backend_is_a_503_that_names_no_backend(client, gateway, standin):
    standin.stop()
    try:
        response = client.post("/v1/chat/completions", json={"messages": MESSAGES})
        error = assert_error(response, 503)
        assert str(standin.port) not in error["message"] and "127.0.0.1" not in error["message"]
        assert response.headers["x-request-id"] in error["message"]
        assert str(standin.port) in gateway.log()  # the operators' detail
    finally:
        standin.start()


def test_a_prompt_vllm_refuses_names_the_responses_input(client, standin):
    standin.completions = REJECT
    response = client.post("/v1/responses", json={"input": "Hi"})
    error = assert_error(response, 400, "input")
    assert error["code"] == "context_length_exceeded"
