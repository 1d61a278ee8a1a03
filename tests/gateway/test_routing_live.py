"""`onellm serve --routing round-robin|least-loaded` over two stand-in vLLMs on loopback
(tests/vllm_standin.py): which backend each request reaches, read from what each stand-in was
sent. Every request is the same chat, so that the default (affinity) routing would send them
all to one backend: an alternation or a spread can only come from the policy asked for.
"""

import httpx
import pytest

from gateway_process import GatewayProcess, start_all
from vllm_standin import ANSWER, HOLD, RECORDED_DELTAS, StandInVLLM

CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
POLICIES = ("round-robin", "least-loaded")


@pytest.fixture(scope="module")
def routed(model_dir, standins, tmp_path_factory) -> dict[str, GatewayProcess]:
    """One gateway per policy, both over the two stand-ins, started together."""
    urls = ",".join(s.url for s in standins)
    gateways = start_all([GatewayProcess(model_dir, tmp_path_factory.mktemp(f"routing-{policy}"),
                                         ["--vllm-url", urls, "--routing", policy]) for policy in POLICIES])
    yield dict(zip(POLICIES, gateways))
    for gateway in gateways:
        assert gateway.stop() == 0
        assert "Traceback" not in gateway.log(), gateway.log()[-5000:]


@pytest.fixture
def backends(standins):
    for standin in standins:
        standin.completions = ANSWER
        standin.release.clear()
    yield standins
    for standin in standins:
        standin.release.set()


def reached(backends: list[StandInVLLM], url: str) -> int:
    """The index of the backend that one chat sent to `url` reached."""
    before = [len(b.posted) for b in backends]
    response = httpx.post(f"{url}/v1/chat/completions", json=CHAT, timeout=60)
    assert response.status_code == 200, response.text
    grown = [i for i, b in enumerate(backends) if len(b.posted) > before[i]]
    assert len(grown) == 1, f"one request reached backends {grown}"
    return grown[0]


def test_round_robin_alternates_between_the_backends(routed, backends):
    order = [reached(backends, routed["round-robin"].url) for _ in range(6)]
    assert order == [order[0], 1 - order[0]] * 3, order


def test_least_loaded_sends_past_a_backend_that_is_busy(routed, backends):
    url = routed["least-loaded"].url
    before = [len(b.posted) for b in backends]
    for backend in backends:
        backend.completions = HOLD  # the first text, then nothing until released
    with httpx.Client(timeout=60) as client, client.stream("POST", f"{url}/v1/chat/completions",
                                                          json={**CHAT, "stream": True}) as held:
        assert held.status_code == 200
        chunks = held.iter_text()  # kept: a dropped iterator would close the response
        for text in chunks:
            if RECORDED_DELTAS[0] in text:
                break  # streaming from one backend, which holds the rest
        busy = next(i for i, b in enumerate(backends) if len(b.posted) > before[i])
        for backend in backends:
            backend.completions = ANSWER
        order = [reached(backends, url) for _ in range(6)]
        backends[busy].release.set()
    assert order == [1 - busy] * 6, f"busy backend {busy}, then {order}"
