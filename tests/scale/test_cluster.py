"""Two gateways over two vLLMs, sharing Redis, behind HAProxy (tests/scale/conftest.py), driven
over HTTP. In file order: first what leaves every server running (among it, what one gateway
keeps being used through the other: media uuids, uploaded files, stored responses), then Redis
stopped (and started again), a vLLM killed (and started again), and last a gateway killed."""

import base64
import contextlib
import hashlib
import os
import signal
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx

import media
from scraped_metrics import total
from waiting import until

TIMEOUT = httpx.Timeout(120, connect=10)  # every wait of this tier is bounded
FOLLOW_UPS = ["And what colour is the sky in it, and is there any text?",
              "Thanks. Now describe it again in one short sentence for a child."]
QUESTION = ("Look at this picture carefully and describe what you see in it, from the left edge to the "
            "right edge, naming every colour, shape and object, and say what it might be a photograph of.")


def gateways_total(cluster, name: str, **labels) -> float:
    return sum(total(g.url, name, **labels) for g in cluster.gateways)


def backend_requests(cluster) -> dict[str, float]:
    """Requests each vLLM was sent, counted by both gateways."""
    return {b: gateways_total(cluster, "onellm_vllm_backend_requests_total", backend=b) for b in cluster.backends}


def data_url(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def picture(seed: int) -> dict:
    return {"type": "image_url", "image_url": {"url": data_url(media.image("png", seed=seed), "image/png")}}


def clip(data: bytes | None = None, uuid: str | None = None) -> dict:
    """A video part: its bytes, the uuid it is known by, or both."""
    part = {"type": "video_url"} | ({"uuid": uuid} if uuid else {})
    return part | ({"video_url": {"url": data_url(data, "video/mp4")}} if data is not None else {})


def turn(text: str, *parts: dict) -> dict:
    return {"role": "user", "content": [*parts, {"type": "text", "text": text}]}


def body(messages: list[dict], max_tokens: int = 8, stream: bool = False) -> dict:
    return {"messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": stream}


def answer(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def post_chat(base_url: str, messages: list[dict], max_tokens: int = 8) -> httpx.Response:
    return httpx.post(f"{base_url}/v1/chat/completions", json=body(messages, max_tokens), timeout=TIMEOUT)


def complete(base_url: str, messages: list[dict], max_tokens: int = 8) -> str:
    return answer(post_chat(base_url, messages, max_tokens))


def text_chat(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


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


class Busy:
    """Long generations sent straight to one vLLM, more of them than it runs at once, each
    started again when it ends, until stop() closes them all (vLLM aborts a closed stream)."""

    def __init__(self, backend: str, streams: int):
        model = httpx.get(f"{backend}/v1/models", timeout=TIMEOUT).json()["data"][0]["id"]
        self.request = {"model": model, "prompt": "Write a very long story about a cat.", "max_tokens": 1900,
                        "ignore_eos": True, "stream": True}
        self.backend = backend
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self._generate) for _ in range(streams)]
        for thread in self.threads:
            thread.start()

    def _generate(self) -> None:
        while not self.stopping.is_set():
            with httpx.stream("POST", f"{self.backend}/v1/completions", json=self.request, timeout=TIMEOUT) as response:
                for _ in response.iter_lines():
                    if self.stopping.is_set():
                        break

    def stop(self) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(60)


def reported_load(gateway, backend: str, measure: str) -> float:
    return total(gateway.url, "onellm_vllm_backend_reported_load", backend=backend, measure=measure)


def served_by(gateway, backends: list[str], text: str) -> str:
    """Which of `backends` a one-turn chat sent to `gateway` reached."""
    before = {b: total(gateway.url, "onellm_vllm_backend_requests_total", backend=b) for b in backends}
    complete(gateway.url, text_chat(text))
    (backend,) = [b for b in before if total(gateway.url, "onellm_vllm_backend_requests_total", backend=b) > before[b]]
    return backend


def test_chats_leave_a_queueing_vllm_and_come_back_when_its_queue_is_gone(cluster):
    backends = cluster.backends
    busy, other = backends
    vllm = cluster.vllms[0]
    max_seqs = int(vllm.args[vllm.args.index("--max-num-seqs") + 1])
    # two chats whose affinity is the backend to be made busy, found while both are idle
    chats = []
    for text in (f"Chat {i} about the weather, in one word." for i in range(40)):
        if len(chats) < 2 and served_by(cluster.gateways[0], backends, text) == busy:
            chats.append(text)
    assert len(chats) == 2, "no two of 40 chats had their affinity on one backend"

    def homes() -> set[str]:
        return {served_by(gateway, backends, text) for gateway in cluster.gateways for text in chats}

    load = Busy(busy, streams=2 * max_seqs)  # as many waiting as running
    try:
        for gateway in cluster.gateways:  # each has read the queue off the backend's /metrics
            until(lambda: reported_load(gateway, busy, "waiting") > 0, 60, "the queue was not seen")
        assert homes() == {other}
    finally:
        load.stop()
    for gateway in cluster.gateways:
        until(lambda: reported_load(gateway, busy, "waiting") + reported_load(gateway, busy, "running") == 0, 60,
              "the busy backend's load did not fall")
    assert homes() == {busy}


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


@contextlib.contextmanager
def served_by_reference(gateway, modality: str):
    """Asserts that what runs in the block sent `gateway` one attachment by uuid, and that its
    prefix came from Redis: no `modality` encoder run there."""
    served = total(gateway.url, "onellm_media_references_total", outcome="served")
    runs = total(gateway.url, "onellm_encoder_runs_total", modality=modality)
    yield
    assert total(gateway.url, "onellm_media_references_total", outcome="served") == served + 1
    assert total(gateway.url, "onellm_encoder_runs_total", modality=modality) == runs


def test_a_media_uuid_made_by_one_gateway_is_served_by_the_other(cluster):
    a, b = cluster.gateways
    video = media.video("mp4", seed=1720)
    sent = post_chat(a.url, [turn("What happens?", clip(video))])

    def follow_up(part: dict) -> list[dict]:
        return [turn("What happens?", part), {"role": "assistant", "content": answer(sent)},
                {"role": "user", "content": "And then?"}]

    with served_by_reference(b, "video"):
        by_uuid = complete(b.url, follow_up(clip(uuid=sent.headers["X-Media-UUIDs"])))
    assert by_uuid == complete(b.url, follow_up(clip(video)))


def test_a_uuid_a_client_gave_its_bytes_on_one_gateway_is_served_by_the_other(cluster):
    a, b = cluster.gateways
    first = complete(a.url, [turn("What happens?", clip(media.video("mp4", seed=1721), uuid="my-clip"))])
    with served_by_reference(b, "video"):
        assert complete(b.url, [turn("What happens?", clip(uuid="my-clip"))]) == first


def test_the_form_endpoint_takes_a_uuid_made_by_the_other_gateway(cluster):
    a, b = cluster.gateways
    form = {"prompt": "What happens?", "stream": "false", "max_tokens": "8", "temperature": "0"}
    sent = httpx.post(f"{a.url}/v1/chat", data=form, files={"video": ("clip.mp4", media.video("mp4", seed=1722))},
                      timeout=TIMEOUT)
    with served_by_reference(b, "video"):
        by_uuid = httpx.post(f"{b.url}/v1/chat", data={**form, "video_ref": sent.headers["X-Media-UUIDs"]},
                             timeout=TIMEOUT)
    assert answer(by_uuid) == answer(sent)


def upload(gateway, data: bytes) -> dict:
    response = httpx.post(f"{gateway.url}/v1/files", files={"file": ("upload.bin", data)},
                          data={"purpose": "user_data"}, timeout=TIMEOUT)
    assert response.status_code == 200, response.text
    return response.json()


def test_a_file_uploaded_through_one_gateway_is_listed_used_and_deleted_through_the_other(cluster):
    a, b = cluster.gateways
    data = media.image("png", seed=1723)
    created = upload(a, data)
    url = f"/v1/files/{created['id']}"
    assert httpx.get(b.url + url, timeout=TIMEOUT).json() == created
    assert created in httpx.get(f"{b.url}/v1/files", timeout=TIMEOUT).json()["data"]
    assert httpx.get(f"{b.url}{url}/content", timeout=TIMEOUT).content == data
    by_file = [turn("What is it?", {"type": "file", "file": {"file_id": created["id"]}})]
    complete(b.url, by_file)
    assert httpx.delete(b.url + url, timeout=TIMEOUT).json() == {"id": created["id"], "object": "file", "deleted": True}
    gone = httpx.get(a.url + url, timeout=TIMEOUT)
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "file_not_found"
    refused = post_chat(a.url, by_file)
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "file_not_found"


def test_the_same_bytes_uploaded_through_both_gateways_are_stored_once(cluster):
    a, b = cluster.gateways
    data = media.video("mp4", seed=1724)
    sha = hashlib.sha256(data).hexdigest()
    with cluster.redis.client() as redis:
        blobs = len(list(redis.scan_iter("onellm:files:blob:*")))
        first, second = upload(a, data), upload(b, data)
        assert first["id"] != second["id"]
        assert len(list(redis.scan_iter("onellm:files:blob:*"))) == blobs + 1
        assert redis.get(f"onellm:files:blob:{sha}") == data
        assert redis.smembers(f"onellm:files:refs:{sha}") == {first["id"].encode(), second["id"].encode()}
        httpx.delete(f"{b.url}/v1/files/{first['id']}", timeout=TIMEOUT).raise_for_status()
        # still held for the other upload
        assert httpx.get(f"{a.url}/v1/files/{second['id']}/content", timeout=TIMEOUT).content == data
        httpx.delete(f"{a.url}/v1/files/{second['id']}", timeout=TIMEOUT).raise_for_status()
        assert not redis.exists(f"onellm:files:blob:{sha}", f"onellm:files:refs:{sha}")


def respond(base_url: str, **fields) -> dict:
    response = httpx.post(f"{base_url}/v1/responses", json={"max_output_tokens": 4, "temperature": 0, **fields},
                          timeout=TIMEOUT)
    assert response.status_code == 200, response.text
    return response.json()


def test_a_response_stored_by_one_gateway_is_continued_and_read_through_the_other(cluster):
    a, b = cluster.gateways
    image = {"type": "input_image", "image_url": picture(1725)["image_url"]["url"]}
    first = respond(a.url, input=[{"role": "user", "content": [image, {"type": "input_text", "text": "What is it?"}]}])
    with served_by_reference(b, "image"):  # the stored conversation names its picture by uuid, never by bytes
        second = respond(b.url, input="And its colours?", previous_response_id=first["id"])
    assert second["previous_response_id"] == first["id"]
    assert second["usage"]["input_tokens"] > first["usage"]["total_tokens"]  # the first turn is in its prompt
    assert httpx.get(f"{b.url}/v1/responses/{first['id']}", timeout=TIMEOUT).json() == first


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
    chat = text_chat("Write a very long story about a cat.")
    # the chat's backend, found first: the reference model ends this answer by itself after ~190
    # tokens, a few seconds here, so nothing may stand between the streams' first text and the freeze
    before = backend_requests(cluster)
    complete(cluster.balancer.url, chat)
    (victim_url,) = [b for b, count in backend_requests(cluster).items() if count > before[b]]
    victim = next(v for v in cluster.vllms if v.url == victim_url)
    survivor_url = next(b for b in cluster.backends if b != victim_url)
    retries = gateways_total(cluster, "onellm_vllm_retries_total")
    survivor_before = total(survivor_url, "vllm:request_success_total")

    streams = [Stream(cluster.balancer.url, chat, 1500) for _ in range(2)]  # one chat: one backend
    try:
        for stream in streams:
            assert stream.first_text.wait(120), stream.lines
        os.killpg(victim.process.pid, signal.SIGSTOP)  # frozen mid-answer: the streams cannot finish first
        assert not any(stream.finished for stream in streams), [stream.lines[-2:] for stream in streams]
        assert gateways_total(cluster, "onellm_vllm_backend_in_flight", backend=victim_url) == 2
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
