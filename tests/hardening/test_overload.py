"""Overload and shutdown on a gateway of its own: 2 requests run at once, 2 more may wait; it logs
at debug level, and the last test stops it with SIGTERM while an answer is under way. Deadlines
on another, where each request may take 2 s: on one gateway, the deadline would race the answers
that the other tests need to finish.

The local engine runs the tiny model at a few hundred tokens a second per answer when two run at
once on this machine, so max_tokens sets how long an answer takes: 100 tokens are quick, 2000
(capped at 1965 by the context window) take 4 s or more, twice the deadline.
"""

import http.client
import json
import signal
import threading
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway_process import GatewayProcess, flags

ADMISSION = {"max_concurrent": 2, "max_queued": 2}
TIMEOUT_S = 2


def serving(tiny_model, tmp_path_factory, name: str, args: list[str]):
    server = GatewayProcess(tiny_model, tmp_path_factory.mktemp(name), args)
    server.start()
    yield server
    server.stop()
    assert "Traceback" not in server.log(), server.log()[-5000:]


@pytest.fixture(scope="module")
def busy(tiny_model, tmp_path_factory):
    yield from serving(tiny_model, tmp_path_factory, "overload", [*flags(ADMISSION), "--log-level", "debug"])


@pytest.fixture(scope="module")
def strict(tiny_model, tmp_path_factory):
    yield from serving(tiny_model, tmp_path_factory, "deadline", ["--request-timeout-s", str(TIMEOUT_S)])


def metric(url: str, name: str, headers: dict | None = None, **labels) -> float:
    text = httpx.get(f"{url}/metrics", headers=headers).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return 0.0


def sse_events(text: str) -> list[str]:
    return [event for event in text.split("\n\n") if event.strip()]


def test_past_the_queue_requests_get_429_and_admitted_ones_complete(busy):
    limit = ADMISSION["max_concurrent"] + ADMISSION["max_queued"]
    count = 4 * limit
    start = threading.Barrier(count)
    responses: list[httpx.Response] = [None] * count

    def ask(i: int) -> None:
        with httpx.Client(base_url=busy.url, timeout=60) as client:
            client.get("/health")  # connected before the barrier, so all requests arrive together
            start.wait()
            responses[i] = client.post("/v1/chat", data={"prompt": f"Tell me story {i}.", "max_tokens": "100",
                                                         "stream": "false"})

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    served = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code == 429]
    assert len(served) + len(refused) == count, [r.status_code for r in responses]
    assert len(served) >= limit and len(refused) >= count - 2 * limit, [r.status_code for r in responses]
    for response in served:
        assert response.json()["choices"][0]["finish_reason"] in ("stop", "length")
    for response in refused:
        assert int(response.headers["retry-after"]) >= 1
        error = response.json()["error"]
        assert error["type"] == "rate_limit_exceeded" and "max_concurrent" in error["message"]
    assert metric(busy.url, "onellm_rejected_requests_total", reason="overloaded") == len(refused)
    assert metric(busy.url, "onellm_queue_depth") == 0
    assert metric(busy.url, "onellm_admission_waiting") == 0


def test_a_request_past_its_deadline_gets_504_or_an_error_event(strict):
    results = {}

    def ask(stream: bool) -> None:
        results[stream] = httpx.post(f"{strict.url}/v1/chat", timeout=60, data={
            "prompt": "Write a very long story.", "max_tokens": "2000", "stream": str(stream).lower()})

    threads = [threading.Thread(target=ask, args=(stream,)) for stream in (True, False)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert time.monotonic() - started < TIMEOUT_S + 5
    plain = results[False]
    assert plain.status_code == 504 and "request_timeout_s" in plain.json()["error"]["message"]
    streamed = results[True]
    assert streamed.status_code == 200
    events = sse_events(streamed.text)
    assert events[-1] == "data: [DONE]"
    assert events[-2].startswith("event: error\n")
    assert json.loads(events[-2].split("data: ", 1)[1])["error"]["type"] == "timeout"
    assert metric(strict.url, "onellm_rejected_requests_total", reason="timeout") == 2
    deadline = time.monotonic() + 5
    while metric(strict.url, "onellm_queue_depth") != 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metric(strict.url, "onellm_queue_depth") == 0


def test_a_client_leaving_mid_answer_frees_its_slot(busy):
    written_before = metric(busy.url, "onellm_output_tokens_total")
    for _ in range(ADMISSION["max_concurrent"] + 1):  # more than there are slots: each must come back
        with httpx.Client(base_url=busy.url, timeout=60) as client:
            with client.stream("POST", "/v1/chat", data={"prompt": "Go on.", "max_tokens": "2000"}) as response:
                for line in response.iter_lines():
                    if line.startswith("data: {") and '"content":"' in line and '"content":""' not in line:
                        break  # the answer has started: hang up
    response = httpx.post(f"{busy.url}/v1/chat", data={"prompt": "Still there?", "max_tokens": "5",
                                                        "stream": "false"}, timeout=120)
    assert response.status_code == 200, response.text
    # an abandoned answer that kept its slot would have run on to its end (1965 tokens, as far as
    # the context goes) and counted them; stopped, it counts none
    written = metric(busy.url, "onellm_output_tokens_total") - written_before
    assert written - response.json()["usage"]["completion_tokens"] < 1965, written
    assert metric(busy.url, "onellm_queue_depth") == 0


def test_debug_logging_shows_prompts_under_the_request_id(busy):
    httpx.post(f"{busy.url}/v1/chat", data={"prompt": "a debug-visible prompt", "max_tokens": "2"},
               headers={"X-Request-ID": "debug-7e1"}, timeout=30)
    lines = [line for line in busy.log().splitlines() if "debug-visible" in line]
    assert lines and all("[debug-7e1]" in line for line in lines)


def test_sigterm_drains_the_answer_in_flight_then_exits_0(busy):
    kept_alive = http.client.HTTPConnection("127.0.0.1", busy.port, timeout=30)
    kept_alive.request("GET", "/health")
    assert kept_alive.getresponse().read()
    with httpx.Client(base_url=busy.url, timeout=30) as client:
        with client.stream("POST", "/v1/chat", data={"prompt": "A story, please.", "max_tokens": "500"}) as response:
            lines = response.iter_lines()
            for line in lines:
                if line.startswith("data: {"):
                    break  # the stream has started
            # a request on the kept-alive connection arriving with the SIGTERM: held back (the
            # gateway stopped) until both are there, so that it reaches the app once draining has begun
            busy.process.send_signal(signal.SIGSTOP)
            kept_alive.request("POST", "/v1/chat", body="prompt=hi", headers={
                "Content-Type": "application/x-www-form-urlencoded"})
            busy.process.send_signal(signal.SIGTERM)
            busy.process.send_signal(signal.SIGCONT)
            late = kept_alive.getresponse()
            assert late.status == 503 and b"shutting down" in late.read()
            assert late.getheader("connection") == "close" and late.getheader("retry-after") == "1"
            kept_alive.close()
            rest = list(lines)
    events = [line for line in rest if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] == "length"
    assert busy.process.wait(30) == 0
    assert "Shutting down" in busy.log()
