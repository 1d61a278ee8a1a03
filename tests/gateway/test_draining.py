"""SIGTERM while an answer streams, on a gateway of its own (it exits) over a stand-in vLLM that
holds the answer after its first text: the held answer is cut once `drain_timeout_s` has passed,
and the exit status is 0. (A request that arrives while draining gets 503: hardening/test_overload.py.)
"""

import signal
import time

import httpx
import pytest

from gateway_process import GatewayProcess, flags
from vllm_standin import HOLD, RECORDED_DELTAS

DRAIN_TIMEOUT_S = 2
DEADLINE_S = 60  # generous: the machine is shared


@pytest.fixture(scope="module")
def gateway(model_dir, standin, tmp_path_factory):
    server = GatewayProcess(model_dir, tmp_path_factory.mktemp("draining"),
                            ["--vllm-url", standin.url, *flags({"drain_timeout_s": DRAIN_TIMEOUT_S})])
    server.start()
    yield server
    server.stop()


def test_sigterm_cuts_the_answer_in_flight_once_drain_timeout_s_has_passed(gateway, standin):
    standin.completions = HOLD  # never released: only the drain timeout ends the answer
    with httpx.Client(timeout=DEADLINE_S) as client, client.stream(
            "POST", f"{gateway.url}/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "Hi"}], "stream": True}) as held:
        chunks = held.iter_text()  # kept: a dropped iterator would close the response
        text = ""
        while RECORDED_DELTAS[0] not in text:
            text += next(chunks)
        gateway.process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        with pytest.raises(httpx.RemoteProtocolError):  # the connection drops mid-answer
            for chunk in chunks:
                text += chunk
    assert time.monotonic() - signalled >= DRAIN_TIMEOUT_S  # it was given its time to finish
    assert "[DONE]" not in text
    assert gateway.process.wait(DEADLINE_S) == 0
    # the errors logged are uvicorn's report of the one answer it cut, under that request's id
    errors = [line for line in gateway.log().splitlines() if " ERROR " in line]
    assert len(errors) == 2, errors
    assert "Cancel 1 running task(s), timeout graceful shutdown exceeded" in errors[0]
    assert f"[{held.headers['x-request-id']}] Exception in ASGI application" in errors[1]
