"""deploy/haproxy/haproxy.cfg run by the real HAProxy on loopback, in front of small HTTP
servers that answer /ready as told and stream server-sent events on cue. They stand in for
gateways so that what the balancer does can be driven and watched; the real gateways behind
HAProxy are the scale-out tier's tests."""

import os
import socket
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from deploy_tools import DEPLOY, tool

DEADLINE = 60  # seconds for anything to happen on a loaded machine


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        """HAProxy closes a health check's connection once it has read the status."""


class Upstream:
    """An HTTP server that records every request and answers /ready with `ready_status`;
    GET /stream sends one event, then a second once `release` is set."""

    def __init__(self, name: str):
        self.name = name
        self.ready_status = 200
        self.requests: list[tuple[str, dict]] = []
        self.release = threading.Event()
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                upstream.requests.append((self.path, {k.lower(): v for k, v in self.headers.items()}))
                if self.path == "/ready":
                    self.answer(upstream.ready_status, b"{}")
                elif self.path == "/stream":
                    self.send_response(200)
                    self.send_header("Content-Type", "text/event-stream")
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    self.chunk(f"data: {upstream.name} 1\n\n".encode())
                    upstream.release.wait(DEADLINE)
                    self.chunk(f"data: {upstream.name} 2\n\n".encode())
                    self.chunk(b"")
                else:
                    self.answer(200, upstream.name.encode())

            def answer(self, status: int, body: bytes):
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def chunk(self, data: bytes):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                self.wfile.flush()

        self.server = QuietServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def served(self, path: str) -> int:
        return sum(1 for p, _ in self.requests if p == path)

    def stop(self):
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def balancer(tmp_path):
    """HAProxy with haproxy.cfg and a servers file naming two upstreams and a closed port."""
    upstreams = [Upstream("a"), Upstream("b")]
    closed = free_port()
    servers = tmp_path / "servers.cfg"
    servers.write_text("backend gateways\n"
                       + "".join(f"    server {u.name} 127.0.0.1:{u.port}\n" for u in upstreams)
                       # nothing listens there and it is never checked: only retries avoid it
                       + f"    server gone 127.0.0.1:{closed} no-check\n")
    port = free_port()
    log = (tmp_path / "haproxy.log").open("w")
    process = subprocess.Popen([tool("haproxy", "make system-packages installs it"), "-db",
                                "-f", str(DEPLOY / "haproxy" / "haproxy.cfg"), "-f", str(servers)],
                               env=os.environ | {"ONELLM_LB_BIND": f"127.0.0.1:{port}"}, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: connects(port), "HAProxy to listen")
        yield url, upstreams
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()
        for upstream in upstreams:
            upstream.stop()


def connects(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def wait_for(condition, what: str):
    deadline = time.monotonic() + DEADLINE
    while not condition():
        assert time.monotonic() < deadline, f"waited {DEADLINE} s for {what}"
        time.sleep(0.1)


def test_requests_get_through_with_the_client_address(balancer):
    url, upstreams = balancer
    response = httpx.get(url + "/v1/models", timeout=DEADLINE)
    assert response.status_code == 200
    [(path, headers)] = [r for u in upstreams for r in u.requests if r[0] == "/v1/models"]
    assert headers["x-forwarded-for"] == "127.0.0.1"


def test_health_checks_ask_ready_and_a_gateway_not_ready_gets_no_requests(balancer):
    url, (a, b) = balancer
    a.ready_status = 503
    # down after two failed checks
    wait_for(lambda: a.served("/ready") >= 3, "two failed checks of a")
    assert b.served("/ready") >= 1
    for _ in range(8):
        assert httpx.get(url + "/v1/models", timeout=DEADLINE).text == "b"
    assert a.served("/v1/models") == 0


def test_a_refused_connection_is_retried_on_another_gateway(balancer):
    """`gone` refuses every connection and is never checked down: without retries and
    redispatch, leastconn would hand it every third request."""
    url, upstreams = balancer
    answers = [httpx.get(url + "/v1/models", timeout=DEADLINE) for _ in range(9)]
    assert [r.status_code for r in answers] == [200] * 9
    assert sum(u.served("/v1/models") for u in upstreams) == 9


def test_events_pass_unbuffered_and_the_next_request_goes_to_the_idle_gateway(balancer):
    url, upstreams = balancer
    with httpx.Client(timeout=DEADLINE) as client, client.stream("GET", url + "/stream") as stream:
        lines = stream.iter_lines()
        first = next(line for line in lines if line)
        # the upstream holds its second event: the first got here on its own
        streaming = next(u for u in upstreams if first == f"data: {u.name} 1")
        [idle] = [u for u in upstreams if u is not streaming]
        # least connections: while the stream is open, a new request goes to the other one
        for _ in range(3):
            assert client.get(url + "/v1/models").text == idle.name
        streaming.release.set()
        assert next(line for line in lines if line) == f"data: {streaming.name} 2"
