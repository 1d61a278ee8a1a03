"""Greedy callers on `crowded` (gateways.CROWDED and KEYS_FILE): 2 slots, 30 queue places; alice
may have 10 requests at once, carol 3 a minute, bob the defaults."""

import socket
import threading
import time

import httpx
import pytest

from gateways import KEYS
from server.traffic.access import ApiKey, key_id, parse_key_line
from test_overload import metric as any_metric
from test_slow_clients import until


def auth(name: str) -> dict:
    return {"Authorization": f"Bearer {KEYS[name]}"}


def metric(url: str, name: str, **labels) -> float:
    return any_metric(url, name, auth("bob"), **labels)


def test_a_busy_key_gets_429s_past_its_quota_and_cannot_push_another_behind_its_queue(crowded):
    url = crowded.url
    count = 40
    start = threading.Barrier(count)
    statuses: list[int | None] = [None] * count
    begun: list[float | None] = [None] * count  # when each answer started to come: its slot was granted

    def ask(i: int) -> None:
        with httpx.Client(base_url=url, timeout=120, headers=auth("alice")) as client:
            client.get("/v1/models")  # connected before the barrier, so all 40 arrive together
            start.wait()
            with client.stream("POST", "/v1/chat", data={"prompt": f"Tell me story {i}.", "max_tokens": "80"}) as r:
                statuses[i] = r.status_code
                begun[i] = time.monotonic()
                r.read()

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 60
    while metric(url, "onellm_admission_waiting") < 6 and time.monotonic() < deadline:
        time.sleep(0.02)
    # and the two running have begun to answer: below, an answer begun after bob asked is one that was queued
    while sum(t is not None for t in begun) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    queued = metric(url, "onellm_admission_waiting")
    assert queued >= 6, "alice's requests did not queue"
    bob_sent = time.monotonic()
    with httpx.Client(base_url=url, timeout=120, headers=auth("bob")) as client:
        with client.stream("POST", "/v1/chat", data={"prompt": "Just one.", "max_tokens": "80"}) as response:
            bob_status = response.status_code
            bob_begun = time.monotonic()
            response.read()
    for thread in threads:
        thread.join(120)

    assert bob_status == 200
    served = [i for i in range(count) if statuses[i] == 200]
    refused = [i for i in range(count) if statuses[i] == 429]
    assert len(served) + len(refused) == count, statuses
    assert len(served) >= 10 and len(refused) >= 20, statuses  # at most 10 at once: the rest are refused
    # alice's requests still waiting when bob's came: in turns, bob's is served after one of them
    # (give or take those that had their slots just before bob asked and began to answer just
    # after), first come first served it would be after all of them
    alice_queue = [begun[i] for i in served if begun[i] > bob_sent]
    ahead_of_bob = sum(t < bob_begun for t in alice_queue)
    assert len(alice_queue) >= 6 and ahead_of_bob < len(alice_queue) - ahead_of_bob, (ahead_of_bob, len(alice_queue))
    assert metric(url, "onellm_refusals_total", limit="key_max_concurrent", key="alice") == len(refused)
    assert metric(url, "onellm_refusals_total", limit="key_max_concurrent", key="bob") == 0
    assert metric(url, "onellm_admission_waiting") == 0
    print(f"\nalice: {len(served)} served, {len(refused)} refused; {queued:.0f} queued when bob asked, "
          f"{ahead_of_bob} of alice's queue started before bob, {len(alice_queue) - ahead_of_bob} after")


def test_a_key_past_its_requests_a_minute_gets_429_with_retry_after(crowded):
    with httpx.Client(base_url=crowded.url, timeout=60, headers=auth("carol")) as client:
        ask = {"prompt": "hi", "max_tokens": "1", "stream": "false"}
        assert [client.post("/v1/chat", data=ask).status_code for _ in range(3)] == [200] * 3
        refused = client.post("/v1/chat", data=ask)
    assert refused.status_code == 429
    assert "key_requests_per_minute" in refused.json()["error"]["message"]
    # 3 a minute: the next one in ~20 s, the bucket having refilled a little meanwhile
    assert 10 <= int(refused.headers["retry-after"]) <= 20
    assert metric(crowded.url, "onellm_refusals_total", limit="key_requests_per_minute", key="carol") == 1
    exposition = httpx.get(f"{crowded.url}/metrics", headers=auth("bob")).text
    assert not any(key in exposition for key in KEYS.values())  # ids in metrics, never the keys


def test_a_client_leaving_while_queued_leaves_the_queue_at_once(crowded):
    url = crowded.url
    with httpx.Client(base_url=url, timeout=60, headers=auth("bob")) as first, \
            httpx.Client(base_url=url, timeout=60, headers=auth("bob")) as second:
        # two long answers take both slots
        long = {"prompt": "A long story.", "max_tokens": "2000"}
        with first.stream("POST", "/v1/chat", data=long), second.stream("POST", "/v1/chat", data=long):
            body = b"prompt=hi&max_tokens=1&stream=false"
            with socket.create_connection(("127.0.0.1", crowded.port)) as sock:
                sock.sendall(f"POST /v1/chat HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEYS['alice']}\r\n"
                             "Content-Type: application/x-www-form-urlencoded\r\n"
                             f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
                until(lambda: metric(url, "onellm_admission_waiting") == 1, 60)
                assert metric(url, "onellm_admission_waiting") == 1
            until(lambda: metric(url, "onellm_admission_waiting") == 0, 60)
            assert metric(url, "onellm_admission_waiting") == 0
            # both long answers still hold their slots: it left the queue before its turn came
            assert metric(url, "onellm_queue_depth") == 2


def test_a_keys_file_line_is_a_key_alone_or_a_key_with_known_options():
    assert parse_key_line("sk-plain", "keys.txt line 1") == ApiKey("sk-plain", key_id("sk-plain"))
    assert parse_key_line("sk-x  per_minute=5 name=app", "keys.txt line 2") == ApiKey("sk-x", "app", None, 5)
    for line, named in [("sk-x bogus=1", "'bogus=1'"), ("sk-x per_minute=lots", "per_minute"),
                        ("sk-x name=", "'name='")]:
        with pytest.raises(ValueError, match="keys.txt line 3") as refused:
            parse_key_line(line, "keys.txt line 3")
        assert named in str(refused.value)
    assert "sk-plain" not in key_id("sk-plain")
