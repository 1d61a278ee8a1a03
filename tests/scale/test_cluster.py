"""Two gateways over two vLLMs, sharing Redis, behind HAProxy (tests/scale/conftest.py), driven
over HTTP. In file order: first what leaves every server running, then Redis stopped (and
started again), a vLLM killed (and started again), and last a gateway killed."""

import base64
import contextlib
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
from prometheus_client.parser import text_string_to_metric_families

import media

TIMEOUT = httpx.Timeout(120, connect=10)  # every wait of this tier is bounded
FOLLOW_UPS = ["And what colour is the sky in it, and is there any text?",
              "Thanks. Now describe it again in one short sentence for a child."]
QUESTION = ("Look at this picture carefully and describe what you see in it, from the left edge to the "
            "right edge, naming every colour, shape and object, and say what it might be a photograph of.")


def total(base_url: str, name: str, **labels) -> float:
    """The sum of the samples called `name` at `base_url`/metrics whose labels include `labels`."""
    text = httpx.get(f"{base_url}/metrics", timeout=10).text
    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
               if s.name == name and labels.items() <= s.labels.items())


def gateways_total(cluster, name: str, **labels) -> float:
    return sum(total(g.url, name, **labels) for g in cluster.gateways)


def backend_requests(cluster) -> dict[str, float]:
    """Requests each vLLM was sent, counted by both gateways."""
    return {b: gateways_total(cluster, "onellm_vllm_backend_requests_total", backend=b) for b in cluster.backends}


def picture(seed: int) -> dict:
    data = base64.b64encode(media.image("png", seed=seed)).decode()
    return {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}}


def body(messages: list[dict], max_tokens: int = 8, stream: bool = False) -> dict:
    return {"messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": stream}


def complete(base_url: str, messages: list[dict], max_tokens: int = 8) -> str:
    response = httpx.post(f"{base_url}/v1/chat/completions", json=body(messages, max_tokens), timeout=TIMEOUT)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def text_chat(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def until(condition, within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {within} s"
        time.sleep(0.1)


def test_chats_spread_over_both_vllm_backends(cluster):
    before = backend_requests(cluster)
    served = {b: total(b, "vllm:request_success_total") for b in cluster.backends}
    # 16 chats: all of them on one backend would be a 1-in-32,768 draw of the hash
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda i: complete(cluster.balancer.url, text_chat(f"Chat {i}: name a fruit.")), range(16)))
    after = backend_requests(cluster)
    assert sum(after.values()) - sum(before.values()) == 16
    for backend in cluster.backends:
        assert after[backend] > before[backend], (before, after)
        assert total(backend, "vllm:request_success_total") > served[backend]  # vLLM's own count agrees


def test_a_chats_turns_stay_on_one_backend_and_hit_its_prefix_cache(cluster):
    messages = [{"role": "user", "content": [picture(1701), {"type": "text", "text": QUESTION}]}]
    served, hits = [], []
    for turn in range(3):  # through HAProxy: each turn may reach either gateway
        before = backend_requests(cluster)
        hits_before = {b: total(b, "vllm:prefix_cache_hits_total") for b in cluster.backends}
        answer = complete(cluster.balancer.url, messages)
        after = backend_requests(cluster)
        (backend,) = [b for b in cluster.backends if after[b] > before[b]]
        served.append(backend)
        hits.append(total(backend, "vllm:prefix_cache_hits_total") - hits_before[backend])
        if turn < 2:
            messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": FOLLOW_UPS[turn]}]
    assert served == [served[0]] * 3
    # the picture's rows open the prompt, so its first turn can hit nothing; each follow-up
    # starts with the whole turn before it, which vLLM holds in 32-token blocks
    assert hits[0] == 0
    assert hits[1] >= 32 and hits[2] > hits[1], hits


def test_a_file_encoded_through_one_gateway_is_not_encoded_again_through_the_other(cluster):
    a, b = cluster.gateways
    messages = [{"role": "user", "content": [picture(1702), {"type": "text", "text": "What is this?"}]}]
    runs_a = total(a.url, "onellm_encoder_runs_total", modality="image")
    runs_b = total(b.url, "onellm_encoder_runs_total", modality="image")
    hits_b = total(b.url, "onellm_shared_cache_hits_total", modality="image")
    first = complete(a.url, messages)
    assert total(a.url, "onellm_encoder_runs_total", modality="image") == runs_a + 1
    second = complete(b.url, messages)
    assert total(b.url, "onellm_encoder_runs_total", modality="image") == runs_b
    assert total(b.url, "onellm_shared_cache_hits_total", modality="image") == hits_b + 1
    assert second == first  # the same prefix, bit for bit: the same greedy answer


def test_requests_keep_succeeding_when_redis_stops_mid_run(cluster):
    errors = gateways_total(cluster, "onellm_shared_cache_errors_total")

    def ask(seed: int) -> str:
        return complete(cluster.balancer.url, [{"role": "user", "content": [picture(seed), {"type": "text",
                                                                                            "text": "And this?"}]}])

    try:
        with ThreadPoolExecutor(4) as pool:
            running = [pool.submit(ask, seed) for seed in range(1710, 1714)]
            running[0].result()  # the run is under way
            cluster.redis.stop()
            later = [pool.submit(ask, seed) for seed in range(1714, 1718)]
            for future in running + later:
                future.result()  # each asserts a 200
        assert gateways_total(cluster, "onellm_shared_cache_errors_total") > errors
        assert min(total(g.url, "onellm_shared_cache_up") for g in cluster.gateways) == 0
    finally:
        cluster.redis.start()
    for gateway in cluster.gateways:  # each uses Redis again once a probe reaches it
        until(lambda: total(gateway.url, "onellm_shared_cache_up") == 1, 30, "the gateway did not use Redis again")


class Stream:
    """A streamed chat read in a thread of its own, line by line."""

    def __init__(self, base_url: str, messages: list[dict], max_tokens: int):
        self.lines: list[str] = []
        self.first_text = threading.Event()
        self.thread = threading.Thread(target=self._read, args=(base_url, body(messages, max_tokens, True)))
        self.thread.start()

    def _read(self, base_url: str, request: dict) -> None:
        with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=request, timeout=TIMEOUT) as response:
            for line in filter(None, response.iter_lines()):
                self.lines.append(line)
                if '"content":"' in line and '"content":""' not in line:
                    self.first_text.set()

    @property
    def failed(self) -> bool:
        return "event: error" in self.lines

    @property
    def finished(self) -> bool:
        return any('"finish_reason":' in line for line in self.lines)


def test_kill_9_of_one_vllm_under_load_fails_only_the_streams_it_was_running(cluster):
    # the reference model keeps going for this prompt (no early EOS), for seconds at this length
    chat = text_chat("Write a very long story about a cat.")
    streams = [Stream(cluster.balancer.url, chat, 1500) for _ in range(2)]  # one chat: one backend
    for stream in streams:
        assert stream.first_text.wait(120), stream.lines
    in_flight = {b: gateways_total(cluster, "onellm_vllm_backend_in_flight", backend=b) for b in cluster.backends}
    victim_url = max(in_flight, key=in_flight.get)
    assert in_flight[victim_url] == 2, in_flight
    victim = next(v for v in cluster.vllms if v.url == victim_url)
    survivor_url = next(b for b in cluster.backends if b != victim_url)
    retries = gateways_total(cluster, "onellm_vllm_retries_total")
    survivor_before = total(survivor_url, "vllm:request_success_total")

    os.killpg(victim.process.pid, signal.SIGSTOP)  # frozen mid-answer: the streams cannot finish first
    try:
        with ThreadPoolExecutor(6) as pool:
            # the same chat's next requests are routed to the frozen backend; other chats anywhere
            pending = [pool.submit(complete, cluster.balancer.url, chat) for _ in range(2)]
            pending += [pool.submit(complete, cluster.balancer.url, text_chat(f"Other chat {i}.")) for i in range(4)]

            def sent_to_victim() -> float:
                return gateways_total(cluster, "onellm_vllm_backend_in_flight", backend=victim_url) - 2

            # until a request is waiting on it, or its health probe took it out of rotation
            until(lambda: sent_to_victim() > 0 or gateways_total(cluster, "onellm_vllm_backend_healthy",
                                                                  backend=victim_url) < 2, 30, "nothing routed")
            waiting = sent_to_victim()
            os.killpg(victim.process.pid, signal.SIGKILL)
            answers = [future.result() for future in pending]  # each asserts a 200
    finally:
        with contextlib.suppress(ProcessLookupError):  # after a failure, no frozen server is left behind
            os.killpg(victim.process.pid, signal.SIGCONT)
    assert len(answers) == 6
    assert gateways_total(cluster, "onellm_vllm_retries_total") >= retries + waiting
    assert total(survivor_url, "vllm:request_success_total") >= survivor_before + 6
    for stream in streams:
        stream.thread.join(60)
        assert not stream.thread.is_alive(), "a stream of the killed backend never ended"
        assert stream.failed and not stream.finished, stream.lines[-4:]
        assert stream.lines[-1] == "data: [DONE]"

    victim.stop()  # reaps it
    victim.start()  # same port, no gateway restart
    for gateway in cluster.gateways:
        until(lambda: total(gateway.url, "onellm_vllm_backend_healthy", backend=victim_url) == 1, 30,
              "the restarted backend was not taken back")
    before = backend_requests(cluster)[victim_url]
    for _ in range(2):  # the chat whose affinity is the restarted backend goes back to it
        complete(cluster.balancer.url, chat)
    assert backend_requests(cluster)[victim_url] == before + 2


def test_kill_9_of_one_gateway_new_requests_are_served_by_the_other(cluster):
    killed, other = cluster.gateways
    os.kill(killed.pid, signal.SIGKILL)
    killed.process.wait()
    served = total(other.url, "onellm_requests_total", status="200")
    for i in range(6):  # HAProxy sends each again, to the other, when the dead one refuses it
        complete(cluster.balancer.url, text_chat(f"After the gateway died, question {i}."))
    assert total(other.url, "onellm_requests_total", status="200") == served + 6
