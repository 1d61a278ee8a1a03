"""Slow clients on `slow_gateway` (gateways.SLOW_CLIENTS: headers within 2 s, body gaps under
2 s, at least 1000 bytes/s give or take 4 s), over raw sockets: a trickle of bytes is what these
clients send, and what the server sends back (or whether it closes) is what is checked.

Each trickling client connects from an address of its own in 127.0.0.0/8 (Linux routes all of
it to loopback), as 60 phones would: it is the admission after the upload, not the per-address
upload limit, that has to keep the service up.
"""

import socket
import threading
import time
from pathlib import Path

import httpx

from gateways import SLOW_CLIENTS
from media import image
from test_overload import metric

TRICKLE_CLIENTS = 60
TRICKLE_BYTES, TRICKLE_EVERY_S = 10, 0.5
BOUNDARY = "trickle0b0undary"
IMAGE = image("png", seed=3, width=32, height=24)
GRACE_S = SLOW_CLIENTS["upload_grace_s"]
MIN_RATE = SLOW_CLIENTS["min_upload_bytes_per_s"]


def multipart_head(port: int, length: int, extra: str = "") -> bytes:
    return (f"POST /v1/chat HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\nContent-Length: {length}\r\n"
            f"{extra}Connection: close\r\n\r\n").encode()


def multipart_body(prompt: str, image_bytes: bytes) -> bytes:
    return (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\n{prompt}\r\n"
            f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"stream\"\r\n\r\nfalse\r\n"
            f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"max_tokens\"\r\n\r\n8\r\n"
            f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n"
            "Content-Type: image/png\r\n\r\n").encode() + image_bytes + f"\r\n--{BOUNDARY}--\r\n".encode()


def connect(port: int, source: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket()
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    return sock


def answer_and_close(sock: socket.socket, timeout: float) -> tuple[bytes, bool]:
    """What the server sends within `timeout`, and whether it then closed the connection."""
    sock.settimeout(timeout)
    got = b""
    try:
        while data := sock.recv(65536):
            got += data
    except TimeoutError:
        return got, False
    except ConnectionResetError:  # closed with bytes of ours unread: still closed, and what came is kept
        pass
    return got, True


def status_of(answer: bytes) -> int | None:
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else None


def normal_request(url: str) -> float:
    """A small image chat answered whole; how long it took."""
    started = time.monotonic()
    response = httpx.post(f"{url}/v1/chat", timeout=60, files={"image": ("a.png", IMAGE)},
                          data={"prompt": "What is in the picture?", "max_tokens": "8", "stream": "false"})
    assert response.status_code == 200, response.text
    return time.monotonic() - started


class Tricklers:
    """Clients that each send a multipart upload `TRICKLE_BYTES` every `TRICKLE_EVERY_S`, from a
    thread of their own; what each got back, when, and whether its connection closed."""

    def __init__(self, port: int, sources: list[str], declared: int | None = None):
        self.socks = [connect(port, source) for source in sources]
        self.body = multipart_body("What is in the picture?", b"\0" * 100_000)  # never sent whole
        head = multipart_head(port, declared or len(self.body))
        for sock in self.socks:
            sock.sendall(head)
            sock.setblocking(False)
        self.sent = [0] * len(self.socks)
        self.started = time.monotonic()
        self.answers = [b""] * len(self.socks)
        self.closed_at: list[float | None] = [None] * len(self.socks)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set() and not all(self.closed_at):
            for i, sock in enumerate(self.socks):
                if self.closed_at[i] is not None:
                    continue
                try:
                    while data := sock.recv(65536):
                        self.answers[i] += data
                    self.closed_at[i] = time.monotonic()  # b"": the server closed it
                    continue
                except BlockingIOError:
                    pass
                except ConnectionResetError:
                    self.closed_at[i] = time.monotonic()
                    continue
                try:
                    self.sent[i] += sock.send(self.body[self.sent[i]:self.sent[i] + TRICKLE_BYTES])
                except (BlockingIOError, BrokenPipeError, ConnectionResetError):
                    pass  # closing: the next round reads what was sent back
            self._stop.wait(TRICKLE_EVERY_S)

    def wait(self, timeout: float) -> None:
        self._thread.join(timeout)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for sock in self.socks:
            sock.close()


def until(condition, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.1)


def test_trickling_uploads_hold_no_slot_and_end_in_408(slow_gateway):
    """Normal requests are answered while 60 uploads trickle in (each within normal_request's
    generous deadline; how much slower they are: bench/timings.py trickle)."""
    url = slow_gateway.url
    until(lambda: metric(url, "onellm_uploads_in_progress") == 0, 10)  # earlier tests' uploads are gone
    timeouts_before = metric(url, "onellm_request_timeouts_total", cause="body_rate")
    tricklers = Tricklers(slow_gateway.port, [f"127.0.0.{10 + i}" for i in range(TRICKLE_CLIENTS)])
    try:
        until(lambda: metric(url, "onellm_uploads_in_progress") >= TRICKLE_CLIENTS, 10)
        assert metric(url, "onellm_uploads_in_progress") == TRICKLE_CLIENTS
        for _ in range(3):
            normal_request(url)
        held = sum(closed is None for closed in tricklers.closed_at)
        assert held == TRICKLE_CLIENTS, "the trickling uploads were ended before the normal requests were answered"
        tricklers.wait(GRACE_S + 15)
    finally:
        tricklers.close()
    for answer, closed in zip(tricklers.answers, tricklers.closed_at):
        assert status_of(answer) == 408 and b"min_upload_bytes_per_s" in answer, answer[:300]
        assert b"connection: close" in answer.lower()
        # 20 bytes/s on a 1000 bytes/s minimum: out once the 4 s of grace are spent, not before
        assert closed is not None and GRACE_S - 0.5 <= closed - tricklers.started <= GRACE_S + 10
    assert metric(url, "onellm_request_timeouts_total", cause="body_rate") - timeouts_before == TRICKLE_CLIENTS
    assert metric(url, "onellm_uploads_in_progress") == 0


def test_headers_a_byte_a_second_are_cut_off_with_408(slow_gateway):
    limit = SLOW_CLIENTS["header_timeout_s"]
    before = metric(slow_gateway.url, "onellm_request_timeouts_total", cause="headers")
    sock = connect(slow_gateway.port)
    started = time.monotonic()
    sock.settimeout(1)  # each wait for an answer is also the second between two bytes
    answer, closed = b"", False
    for byte in b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Padding: " + b"p" * 60:
        try:
            sock.send(bytes([byte]))
            answer = sock.recv(65536)
        except TimeoutError:
            continue
        except (BrokenPipeError, ConnectionResetError):
            closed = True
            break
        rest, closed = answer_and_close(sock, 5)
        answer += rest
        break
    elapsed = time.monotonic() - started
    sock.close()
    assert status_of(answer) == 408 and b"header_timeout_s" in answer, answer
    assert closed and limit - 0.5 <= elapsed <= limit + 3, elapsed
    assert metric(slow_gateway.url, "onellm_request_timeouts_total", cause="headers") == before + 1
    print(f"\nheaders a byte a second: 408 after {elapsed:.2f} s")


def test_a_connection_that_sends_nothing_is_closed_after_the_header_timeout(slow_gateway):
    with connect(slow_gateway.port) as sock:
        started = time.monotonic()
        answer, closed = answer_and_close(sock, 15)
    assert answer == b"" and closed  # nothing was asked: nothing is answered
    assert time.monotonic() - started <= SLOW_CLIENTS["header_timeout_s"] + 3


def test_an_upload_that_stops_mid_body_gets_408_after_the_idle_timeout(slow_gateway):
    idle = SLOW_CLIENTS["body_idle_timeout_s"]
    body = multipart_body("What is in the picture?", IMAGE)
    with connect(slow_gateway.port) as sock:
        sock.sendall(multipart_head(slow_gateway.port, len(body)) + body[:len(body) // 2])
        started = time.monotonic()
        answer, closed = answer_and_close(sock, 20)
        elapsed = time.monotonic() - started
    assert status_of(answer) == 408 and b"body_idle_timeout_s" in answer, answer
    assert closed and idle - 0.3 <= elapsed <= idle + 4, elapsed
    print(f"\na body stopped half way: 408 after {elapsed:.2f} s")


def test_an_upload_at_the_minimum_rate_completes(slow_gateway):
    body = multipart_body("What is in the picture?", image("png", seed=4, width=48, height=40))
    seconds = len(body) / MIN_RATE
    assert seconds > GRACE_S + 1  # long enough that the rate, not the grace, is what lets it through
    step = MIN_RATE // 4  # a quarter of a second's worth at a time, on a fixed schedule
    with connect(slow_gateway.port) as sock:
        sock.sendall(multipart_head(slow_gateway.port, len(body)))
        started = time.monotonic()
        for n, offset in enumerate(range(0, len(body), step)):
            time.sleep(max(0.0, started + n * 0.25 - time.monotonic()))
            sock.sendall(body[offset:offset + step])
        answer, closed = answer_and_close(sock, 60)
        elapsed = time.monotonic() - started
    assert status_of(answer) == 200, answer[:500]
    assert b'"finish_reason"' in answer and elapsed >= seconds - 0.3
    print(f"\n{len(body)} bytes at {MIN_RATE} bytes/s: answered after {elapsed:.2f} s")


def test_one_address_gets_so_many_uploads_at_once(slow_gateway):
    limit = SLOW_CLIENTS["max_uploads_per_client"]
    url = slow_gateway.url
    before = metric(url, "onellm_refusals_total", limit="max_uploads_per_client", key="")
    held = Tricklers(slow_gateway.port, ["127.0.0.99"] * limit)
    try:
        until(lambda: metric(url, "onellm_uploads_in_progress") >= limit, 10)
        body = multipart_body("hi", IMAGE)
        # X-Forwarded-For is not believed: this gateway trusts no proxy
        with connect(slow_gateway.port, "127.0.0.99") as sock:
            sock.sendall(multipart_head(slow_gateway.port, len(body), "X-Forwarded-For: 10.9.8.7\r\n"))
            answer, closed = answer_and_close(sock, 5)
        assert status_of(answer) == 429 and b"max_uploads_per_client" in answer, answer
        assert b"retry-after: 1" in answer.lower() and closed
        normal_request(url)  # another address is served meanwhile
    finally:
        held.close()
    assert metric(url, "onellm_refusals_total", limit="max_uploads_per_client", key="") == before + 1


def gateway_ends(port: int, source_prefix: str) -> list[tuple[str, int, int]]:
    """The gateway's ends of the connections to `port` from addresses starting with `source_prefix`,
    from the kernel's table (/proc/net/tcp): (state, bytes not yet read by the gateway, inode, 0
    while the connection waits in the listen backlog to be accepted)."""
    ends = []
    for row in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, remote, state, queues = row.split()[1:5]
        address = ".".join(str(b) for b in reversed(bytes.fromhex(remote.split(":")[0])))
        if int(local.split(":")[1], 16) == port and address.startswith(source_prefix):
            ends.append((state, int(queues.split(":")[1], 16), int(row.split()[9])))
    return ends


def headers_read(port: int, source_prefix: str) -> int:
    """How many of those connections the gateway has accepted and read all that came on (their
    headers come first, at once, and the trickles take a moment to come)."""
    return sum(inode != 0 and unread == 0 for _, unread, inode in gateway_ends(port, source_prefix))


def open_ends(port: int, source_prefix: str) -> int:
    """How many of those connections the gateway has not yet closed (ESTABLISHED, or CLOSE_WAIT: the
    client hung up and the gateway has not read it)."""
    return sum(state in ("01", "08") for state, _, _ in gateway_ends(port, source_prefix))


def test_past_max_connections_with_none_idle_a_new_one_gets_503(slow_gateway):
    cap = SLOW_CLIENTS["max_connections"]
    per_address = SLOW_CLIENTS["max_uploads_per_client"]
    # every connection busy with an upload (8 from each of 15 addresses): none can make room
    busy = Tricklers(slow_gateway.port, [f"127.0.1.{i // per_address}" for i in range(cap)])
    try:
        # nothing else may connect meanwhile, so the gateway's side is watched in the kernel's table
        until(lambda: headers_read(slow_gateway.port, "127.0.1.") == cap, 60)
        with connect(slow_gateway.port) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            answer, closed = answer_and_close(sock, 5)
        assert status_of(answer) == 503 and b"max_connections" in answer and closed, answer
        assert b"retry-after: 1" in answer.lower()
        assert not any(busy.closed_at)  # the busy ones were left alone
    finally:
        busy.close()
    until(lambda: not open_ends(slow_gateway.port, "127.0.1."), 60)  # the server has read their hang-ups
    assert httpx.get(f"{slow_gateway.url}/health", timeout=10).status_code == 200


def test_bodies_past_the_memory_budget_get_503_before_they_are_read(slow_gateway):
    declared = 95 << 20  # under max_request_bytes (96 MiB); ten of them fit in the 1 GiB budget
    url = slow_gateway.url
    until(lambda: metric(url, "onellm_uploads_in_progress") == 0, 10)
    held = Tricklers(slow_gateway.port, [f"127.0.2.{i}" for i in range(10)], declared)
    try:
        until(lambda: metric(url, "onellm_uploads_in_progress") >= 10, 10)
        with connect(slow_gateway.port, "127.0.2.10") as sock:
            sock.sendall(multipart_head(slow_gateway.port, declared))
            answer, closed = answer_and_close(sock, 5)
        assert status_of(answer) == 503 and b"max_buffered_bytes" in answer and closed, answer
        assert b"retry-after: 1" in answer.lower()
        assert not any(held.closed_at)
    finally:
        held.close()
    assert metric(url, "onellm_refusals_total", limit="max_buffered_bytes", key="") == 1
