"""SIGTERM while an answer streams, on a gateway of its own (it exits) over a stand-in vLLM that
holds the answer after its first text: a request on a kept-alive connection gets 503 and the
connection is closed; the held answer is cut once `drain_timeout_s` has passed; the exit status is 0.
"""

import os
import signal
import socket

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


def kept_alive(port: int) -> socket.socket:
    """A connection that has had one request answered and stays open for the next."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE_S)
    sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: gateway\r\n\r\n")
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(4096)
    head, body = head.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200 "), head
    length = int(next(line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:"))[15:])
    while len(body) < length:
        body += sock.recv(4096)
    return sock


def until_closed(sock: socket.socket) -> bytes:
    answer = b""
    while chunk := sock.recv(4096):
        answer += chunk
    return answer


def test_sigterm_refuses_a_kept_alive_connection_and_cuts_the_answer_at_the_drain_timeout(gateway, standin):
    standin.completions = HOLD  # never released: only the drain timeout ends the answer
    kept = kept_alive(gateway.port)
    with httpx.Client(timeout=DEADLINE_S) as client, client.stream(
            "POST", f"{gateway.url}/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "Hi"}], "stream": True}) as held:
        chunks = held.iter_text()  # kept: a dropped iterator would close the response
        text = ""
        while RECORDED_DELTAS[0] not in text:
            text += next(chunks)
        # the next request waits in the socket while the gateway is stopped, so that it is read
        # after SIGTERM and before uvicorn closes the connection at its next tick
        os.kill(gateway.pid, signal.SIGSTOP)
        try:
            kept.sendall(b"GET /v1/models HTTP/1.1\r\nHost: gateway\r\n\r\n")
            os.kill(gateway.pid, signal.SIGTERM)
        finally:
            os.kill(gateway.pid, signal.SIGCONT)
        refused = until_closed(kept)
        with pytest.raises(httpx.RemoteProtocolError):  # the connection drops mid-answer
            for chunk in chunks:
                text += chunk
    head, body = refused.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 503 "), refused
    assert b"connection: close" in head.lower() and b"retry-after: 1" in head.lower(), head
    assert b"shutting down" in body, body
    assert "[DONE]" not in text
    assert gateway.process.wait(DEADLINE_S) == 0
    # the errors logged are uvicorn's report of the one answer it cut, under that request's id
    errors = [line for line in gateway.log().splitlines() if " ERROR " in line]
    assert len(errors) == 2, errors
    assert "Cancel 1 running task(s), timeout graceful shutdown exceeded" in errors[0]
    assert f"[{held.headers['x-request-id']}] Exception in ASGI application" in errors[1]
