"""`onellm serve --vllm-url A,B`: a real gateway process over two stand-in vLLMs on loopback
(tests/vllm_standin.py). Real vLLM replicas, killed for real, are the scale tier's."""

import base64
import json
import math
import time

import httpx
import pytest

import media
from gateway_helpers import assert_error, metric, metrics, parse_sse
from gateway_process import GatewayProcess
from vllm_standin import ANSWER, CUT_AFTER_TEXT, LIVE, RECORDED_DELTAS, vllm_metrics

BACKEND_FAMILIES = ("onellm_vllm_backend_requests_total", "onellm_vllm_backend_failures_total",
                    "onellm_vllm_backend_in_flight", "onellm_vllm_backend_healthy")


@pytest.fixture(scope="module")
def gateway(model_dir, standins, tmp_path_factory):
    server = GatewayProcess(model_dir, tmp_path_factory.mktemp("backends"),
                            ["--vllm-url", ",".join(s.url for s in standins)])
    server.start()
    yield server
    assert server.stop() == 0
    assert "Traceback" not in server.log(), server.log()[-5000:]


@pytest.fixture
def client(gateway, standins):
    """A client of the gateway once both stand-ins answer normally again and it knows so."""
    for server in standins:
        server.completions = ANSWER
        server.healthy = True
        server.metrics = LIVE
        if server.port_closed():
            server.start()
    with httpx.Client(base_url=gateway.url, timeout=60) as client:
        deadline = time.monotonic() + 30
        while not all(metric(client, "onellm_vllm_backend_healthy", backend=s.url) == 1 for s in standins):
            assert time.monotonic() < deadline, "the gateway did not see both backends healthy"
            time.sleep(0.1)
        yield client


def turn(history: list[dict], text: str, image: bytes | None = None) -> list[dict]:
    content = [{"type": "text", "text": text}]
    if image is not None:
        url = "data:image/png;base64," + base64.b64encode(image).decode()
        content.insert(0, {"type": "image_url", "image_url": {"url": url}})
    return [*history, {"role": "user", "content": content}]


def ask(client: httpx.Client, messages: list[dict]) -> str:
    response = client.post("/v1/chat/completions", json={"messages": messages, "stream": True, "max_tokens": 8})
    text, _ = parse_sse(response)
    return text


def test_the_turns_of_a_chat_reach_the_same_vllm(client, standins):
    for chat in range(8):
        # the first turn's image and text are the chat's; later turns add text and attachments
        messages = turn([], f"What is in picture {chat}?", media.image("png", seed=chat))
        served = []
        for follow_up in range(3):
            before = [len(s.posted) for s in standins]
            answer = ask(client, messages)
            assert answer == "".join(RECORDED_DELTAS)
            served.append([len(s.posted) - b for s, b in zip(standins, before)])
            image = media.image("png", seed=100 + chat) if follow_up == 1 else None
            messages = turn([*messages, {"role": "assistant", "content": answer}], f"And then {follow_up}?", image)
        assert served[0] in ([1, 0], [0, 1]) and served == [served[0]] * 3, served


def test_metrics_name_every_backend(client, standins):
    ask(client, turn([], "Hello?"))
    samples = {(name, dict(labels).get("backend")) for name, labels in metrics(client)}
    for family in BACKEND_FAMILIES:
        assert {(family, s.url) for s in standins} <= samples, family
    assert ("onellm_vllm_retries_total", None) in samples
    assert sum(metric(client, "onellm_vllm_backend_requests_total", backend=s.url) for s in standins) >= 1


def test_the_gateway_shows_each_backends_load_as_its_metrics_say_and_forgets_it_when_unreadable(client, standins):
    def shown(measure: str) -> float:
        return metric(client, "onellm_vllm_backend_reported_load", backend=standins[0].url, measure=measure)

    def wait(condition, what: str) -> None:
        deadline = time.monotonic() + 20  # reads every second (the default), unknown after three missed
        while not condition():
            assert time.monotonic() < deadline, what
            time.sleep(0.1)

    failures = metric(client, "onellm_vllm_backend_load_scrape_failures_total", backend=standins[0].url)
    standins[0].metrics = vllm_metrics(waiting=3, running=4, kv_usage=0.5)
    wait(lambda: shown("waiting") == 3, "the reported queue was not shown")
    assert (shown("running"), shown("kv_cache_usage")) == (4, 0.5)
    standins[0].metrics = None  # its /metrics answers 500 from now on
    wait(lambda: math.isnan(shown("running")), "an unreadable load was still shown")
    assert metric(client, "onellm_vllm_backend_load_scrape_failures_total", backend=standins[0].url) >= failures + 3
    assert metric(client, "onellm_vllm_backend_reported_load", backend=standins[1].url, measure="waiting") == 0


def test_a_backend_gone_costs_no_request(client, standins):
    retries = metric(client, "onellm_vllm_retries_total")
    standins[0].stop()
    # a chat sent to the closed port fails to connect before any text and goes to the other
    # backend, unless the gateway's probe has noticed the port closed first
    for chat in range(16):
        assert ask(client, turn([], f"Tell me about place {chat}.")) == "".join(RECORDED_DELTAS)
    assert metric(client, "onellm_vllm_retries_total") - retries in (0, 1)
    assert metric(client, "onellm_vllm_backend_healthy", backend=standins[0].url) == 0
    assert httpx.get(f"{client.base_url}/ready", timeout=10).status_code == 200


def test_a_backend_failing_mid_answer_ends_the_stream_with_an_error_event(client, standins):
    for server in standins:
        server.completions = CUT_AFTER_TEXT
    response = client.post("/v1/chat/completions", json={"messages": turn([], "Hi"), "stream": True})
    assert response.status_code == 200
    events = [e for e in response.text.split("\n\n") if e.strip()]
    assert events[-1] == "data: [DONE]"
    assert events[-2].startswith("event: error\n")
    assert json.loads(events[-2].split("data: ", 1)[1])["error"]["type"] == "service_unavailable"
    contents = [json.loads(e[len("data: "):])["choices"][0]["delta"].get("content") for e in events[:-2]]
    assert "".join(c or "" for c in contents) == RECORDED_DELTAS[0]  # one backend's text, once


def test_ready_while_one_backend_answers(client, standins):
    standins[0].healthy = False
    for _ in range(10):
        assert client.get("/ready").status_code == 200
    standins[1].stop()
    deadline = time.monotonic() + 30
    while (ready := client.get("/ready")).status_code == 200:
        assert time.monotonic() < deadline, "/ready kept saying 200 with no backend answering"
        time.sleep(0.1)
    assert_error(ready, 503)
    error = assert_error(client.post("/v1/chat/completions", json={"messages": turn([], "Hi")}), 503)
    assert error["type"] == "service_unavailable"
    standins[0].healthy = True
    # nothing was known to answer, so the gateway asks the backends at once
    assert client.get("/ready").status_code == 200
    assert ask(client, turn([], "Hi")) == "".join(RECORDED_DELTAS)
