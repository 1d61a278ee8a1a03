"""Idle connections on `crowded` (at most 300 open): opened by the thousand, they cannot keep
the service from answering, and nothing of them is left once they are gone."""

import resource
import socket
import time

import httpx

from gateways import CROWDED, KEYS

IDLE_CONNECTIONS = 2000


def socket_fds(server) -> int:
    return sum(link.startswith("socket:") for link in server.open_fds())


def state_of(sock: socket.socket) -> str:
    """'open', 'closed' (the server's FIN) or 'reset', without waiting."""
    sock.setblocking(False)
    try:
        data = sock.recv(65536)
    except BlockingIOError:
        return "open"
    except ConnectionResetError:
        return "reset"
    return "closed" if not data else "answered"


def test_thousands_of_idle_connections_leave_room_for_requests_and_no_descriptors(crowded):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < IDLE_CONNECTIONS + 200:  # the client side needs its descriptors too
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, IDLE_CONNECTIONS + 1000), hard))
    cap = CROWDED["max_connections"]
    before = socket_fds(crowded)
    socks = []
    try:
        for _ in range(IDLE_CONNECTIONS):
            socks.append(socket.create_connection(("127.0.0.1", crowded.port), timeout=10))
        deadline = time.monotonic() + 20  # the server accepts them at its own pace
        while socket_fds(crowded) > before + cap and time.monotonic() < deadline:
            time.sleep(0.1)
        assert socket_fds(crowded) <= before + cap
        with httpx.Client(base_url=crowded.url, timeout=30, headers={"Authorization": f"Bearer {KEYS['bob']}"}) as c:
            assert c.get("/health").status_code == 200
            chat = c.post("/v1/chat", data={"prompt": "Still there?", "max_tokens": "4", "stream": "false"})
            assert chat.status_code == 200, chat.text
        states = [state_of(sock) for sock in socks]
    finally:
        for sock in socks:
            sock.close()
    # the oldest idle ones made room for the newer: closed with a FIN, never reset, never answered
    assert states.count("reset") == 0 and states.count("answered") == 0, {s: states.count(s) for s in set(states)}
    assert states.count("open") <= cap and states.count("closed") >= IDLE_CONNECTIONS - cap
    deadline = time.monotonic() + 15
    while socket_fds(crowded) > before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert socket_fds(crowded) <= before
    print(f"\n{IDLE_CONNECTIONS} idle connections: {states.count('open')} still open, "
          f"{states.count('closed')} closed by the server; socket descriptors {before} before and after")


def test_x_forwarded_for_names_the_client_only_from_a_trusted_proxy(crowded):
    def get_from(source: str, request_id: str) -> None:
        with httpx.Client(transport=httpx.HTTPTransport(local_address=source), timeout=30) as c:
            response = c.get(f"{crowded.url}/health", headers={"X-Forwarded-For": "203.0.113.7, 198.51.100.9",
                                                               "X-Request-ID": request_id})
            assert response.status_code == 200

    get_from(CROWDED["trusted_proxies"], "via-trusted-proxy")
    get_from("127.0.0.3", "via-anyone")
    lines = crowded.log().splitlines()
    # the right-most hop that is not a trusted proxy is the client
    assert any("[via-trusted-proxy]" in line and " 198.51.100.9:" in line for line in lines)
    assert any("[via-anyone]" in line and " 127.0.0.3:" in line for line in lines)
    assert not any("203.0.113.7" in line or "[via-anyone]" in line and "198.51.100.9" in line for line in lines)
