"""Per-key quotas counted across two gateways (the tiny model, the local engine) sharing one real
redis-server, with HAProxy in front, over real HTTP. A request is held open by sending its
headers and the first byte of its body: the quota counts it from its headers to its answer's end,
and the gateway answers a refusal before it reads the body. In file order: the minute's window,
the requests at once, Redis stopped (and started again), and last a gateway killed."""

import hashlib
import json
import socket
from dataclasses import dataclass

import httpx
import pytest

from gateway_process import GatewayProcess, start_all
from haproxy_process import HAProxy, require_haproxy
from redis_server import RedisServer, require_redis_server
from scraped_metrics import total as scraped
from waiting import until

HELD_KEY, MINUTE_KEY = "sk-held-4-at-once", "sk-ten-a-minute"
KEYS_FILE = f"{HELD_KEY} name=held max_concurrent=4\n{MINUTE_KEY} name=minute per_minute=10\n"
LEASE_TTL_S = 4
CHAT = json.dumps({"messages": [{"role": "user", "content": "hello"}], "max_tokens": 2, "stream": False}).encode()
TIMEOUT = httpx.Timeout(120, connect=10)


@dataclass
class QuotaCluster:
    redis: RedisServer
    gateways: list[GatewayProcess]
    balancer: HAProxy


@pytest.fixture(scope="module")
def quotas(tiny_model, tmp_path_factory) -> QuotaCluster:
    require_redis_server()
    require_haproxy()
    keys = tmp_path_factory.mktemp("quota-keys") / "keys"
    keys.write_text(KEYS_FILE)
    redis = RedisServer(tmp_path_factory.mktemp("quota-redis")).start()
    # held requests send no more of their body for as long as a test needs
    args = ["--cache-url", redis.url, "--api-keys-file", str(keys), "--quota-lease-ttl-s", str(LEASE_TTL_S),
            "--body-idle-timeout-s", "300", "--min-upload-bytes-per-s", "0", "--log-level", "info"]
    gateways = [GatewayProcess(tiny_model, tmp_path_factory.mktemp("quota-gateway"), args,
                               {"ONELLM_PREPROCESS_WORKERS": "1"}) for _ in range(2)]
    balancer = None
    try:
        start_all(gateways)
        balancer = HAProxy(tmp_path_factory.mktemp("quota-haproxy"), gateways).start()
        yield QuotaCluster(redis, gateways, balancer)
    finally:
        if balancer is not None:
            balancer.stop()
        for gateway in gateways:
            gateway.stop()
        redis.stop()
    for gateway in gateways:
        assert "Traceback" not in gateway.log(), gateway.log()[-6000:]


class HeldChat:
    """A chat whose headers and first body byte are sent, the rest held back until `finish`."""

    def __init__(self, url: str, key: str):
        self.sock = socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=10)
        head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: onellm\r\nAuthorization: Bearer {key}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(CHAT)}\r\nConnection: close\r\n\r\n")
        self.sock.sendall(head.encode() + CHAT[:1])

    def answered(self) -> bool:
        """Whether any of an answer has come, without waiting for one."""
        self.sock.setblocking(False)
        try:
            return self.sock.recv(1, socket.MSG_PEEK) != b""
        except BlockingIOError:
            return False
        finally:
            self.sock.setblocking(True)

    def status(self) -> int:
        """The answer's status, once its head and body have come (a refusal's connection stays
        open behind HAProxy while the body it did not read is left unsent)."""
        self.sock.settimeout(120)
        answer = b""
        while b"\r\n\r\n" not in answer:
            answer += self._more()
        head, _, body = answer.partition(b"\r\n\r\n")
        length = next(int(line.split(b":", 1)[1]) for line in head.lower().split(b"\r\n")
                      if line.startswith(b"content-length:"))
        while len(body) < length:
            body += self._more()
        self.sock.close()
        return int(head.split(b" ", 2)[1])

    def _more(self) -> bytes:
        chunk = self.sock.recv(65536)
        assert chunk, "the connection closed before the whole answer came"
        return chunk

    def finish(self) -> int:
        self.sock.sendall(CHAT[1:])
        return self.status()

    def drop(self) -> None:
        self.sock.close()


def chat(url: str, key: str) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", content=CHAT, timeout=TIMEOUT,
                      headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})


def total(url: str, name: str, **labels) -> float:
    return scraped(url, name, headers={"Authorization": f"Bearer {MINUTE_KEY}"}, **labels)


def leases(quotas: QuotaCluster) -> int:
    with quotas.redis.client() as client:
        return client.zcard(f"onellm:quota:leases:{hashlib.sha256(HELD_KEY.encode()).hexdigest()}")


def refusals(url: str, limit: str) -> float:
    return total(url, "onellm_refusals_total", limit=limit)


def test_the_eleventh_request_in_the_minute_is_refused_whichever_gateway_it_reaches(quotas):
    a, b = quotas.gateways
    for n in range(10):
        response = chat((a, b)[n % 2].url, MINUTE_KEY)
        assert response.status_code == 200, response.text
    for url in (a.url, b.url, quotas.balancer.url):
        refused = chat(url, MINUTE_KEY)
        assert refused.status_code == 429, refused.text
        assert "key_requests_per_minute" in refused.json()["error"]["message"]
        assert 1 <= int(refused.headers["Retry-After"]) <= 60


def test_twelve_requests_at_once_through_the_balancer_four_are_admitted_the_rest_refused(quotas):
    refused_before = sum(refusals(g.url, "key_max_concurrent") for g in quotas.gateways)
    held = [HeldChat(quotas.balancer.url, HELD_KEY) for _ in range(12)]
    until(lambda: sum(refusals(g.url, "key_max_concurrent") for g in quotas.gateways) - refused_before >= 8,
          60, "8 refusals")
    until(lambda: sum(h.answered() for h in held) >= 8, 30, "the refusals to arrive")
    refused = [h for h in held if h.answered()]
    admitted = [h for h in held if not h.answered()]
    assert len(refused) == 8 and len(admitted) == 4
    assert [h.status() for h in refused] == [429] * 8
    assert leases(quotas) == 4
    # both gateways had some of the twelve: the four at once were counted across them
    assert all(refusals(g.url, "key_max_concurrent") for g in quotas.gateways)
    assert [h.finish() for h in admitted] == [200] * 4
    until(lambda: leases(quotas) == 0, 10, "the leases to be released")


def test_while_redis_is_down_each_gateway_counts_its_own_and_the_cluster_count_returns_with_redis(quotas):
    a, b = quotas.gateways
    quotas.redis.stop()
    try:
        held = {g.url: [HeldChat(g.url, HELD_KEY) for _ in range(4)] for g in (a, b)}
        until(lambda: all(total(g.url, "onellm_uploads_in_progress") == 4 for g in (a, b)), 30,
              "the four held requests past the quotas on each gateway")
        # neither refusing everyone nor admitting everyone: 4 a gateway, the 5th refused on each
        assert [chat(g.url, HELD_KEY).status_code for g in (a, b)] == [429, 429]
        assert not any(h.answered() for hs in held.values() for h in hs)
        for g in (a, b):
            assert total(g.url, "onellm_shared_quotas_up") == 0
            assert total(g.url, "onellm_shared_quota_fallbacks_total") >= 5
            assert g.log().count("each gateway counts only its own requests") == 1
    finally:
        quotas.redis.start()
    until(lambda: all(total(g.url, "onellm_shared_quotas_up") == 1 for g in (a, b)), 30, "Redis to be used again")
    # the 8 requests still running were written back: the key is over its 4 across the gateways
    until(lambda: leases(quotas) == 8, 10, "the held requests' leases to be written back")
    assert [chat(g.url, HELD_KEY).status_code for g in (a, b)] == [429, 429]
    assert [h.finish() for hs in held.values() for h in hs] == [200] * 8
    until(lambda: leases(quotas) == 0, 10, "the leases to be released")
    assert chat(b.url, HELD_KEY).status_code == 200


def test_a_killed_gateways_places_come_back_after_the_lease_ttl(quotas):
    a, b = quotas.gateways
    on_a = [HeldChat(a.url, HELD_KEY) for _ in range(4)]
    until(lambda: leases(quotas) == 4, 30, "a's four leases")
    a.process.kill()  # kill -9: a releases nothing
    a.process.wait()
    assert chat(b.url, HELD_KEY).status_code == 429  # a's leases outlive it, until their ttl
    # well before the default ttl (30 s): the setting is what counts
    until(lambda: chat(b.url, HELD_KEY).status_code == 200, 4 * LEASE_TTL_S, "a's places to come back")
    on_b = [HeldChat(b.url, HELD_KEY) for _ in range(4)]
    until(lambda: leases(quotas) == 4, 30, "b's four leases")
    assert chat(b.url, HELD_KEY).status_code == 429
    assert [h.finish() for h in on_b] == [200] * 4
    for h in on_a:
        h.drop()
