"""The multi-GPU layout on the CPU, up for real: two vLLM stand-ins, two gateways sharing the
cache Redis and the files store, HAProxy in front; one vLLM killed and restarted under the
clients' feet, the files store re-created under the files."""

import hashlib

import httpx
from prometheus_client.parser import text_string_to_metric_families

from docker_stack import Stack
from media import image

BACKENDS = ("http://vllm:8000", "http://vllm-1:8000")


def api(stack: Stack) -> str:
    return f"http://127.0.0.1:{stack.variables['ONELLM_PUBLISH_PORT']}"


def chat(stack: Stack, seed: int) -> httpx.Response:
    """A new chat (its own image, so its own affinity) through HAProxy."""
    return httpx.post(f"{api(stack)}/v1/chat", timeout=120,
                      data={"prompt": f"Chat {seed}: what is in it?", "max_tokens": "4", "stream": "false"},
                      files={"image": ("photo.png", image("png", seed=seed), "image/png")})


def gateway_metrics(stack: Stack, replica: int) -> dict[tuple[str, tuple], float]:
    text = stack.compose("exec", "-T", "--index", str(replica), "gateway",
                         "curl", "-fsS", "http://127.0.0.1:8080/metrics").stdout
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def backend_requests(stack: Stack) -> dict[str, float]:
    """Requests each vLLM got, over both gateways."""
    counts = dict.fromkeys(BACKENDS, 0.0)
    for replica in (1, 2):
        for (name, labels), value in gateway_metrics(stack, replica).items():
            if name == "onellm_vllm_backend_requests_total":
                counts[dict(labels)["backend"]] += value
    return counts


def served_chats(stack: Stack, replica: int) -> float:
    return sum(v for (name, labels), v in gateway_metrics(stack, replica).items()
               if name == "onellm_requests_total" and dict(labels).get("status") == "200")


def test_the_load_balancer_spreads_chats_over_both_gateways_and_both_vllms(multi_stack):
    for seed in range(12):
        response = chat(multi_stack, seed)
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["message"]["content"]
    assert served_chats(multi_stack, 1) > 0 and served_chats(multi_stack, 2) > 0
    counts = backend_requests(multi_stack)
    assert all(counts[backend] > 0 for backend in BACKENDS), counts


def test_a_killed_vllm_costs_no_request_and_takes_traffic_again_once_restarted(multi_stack):
    multi_stack.compose("kill", "vllm-1")
    for seed in range(100, 108):
        response = chat(multi_stack, seed)
        assert response.status_code == 200, response.text
    before = backend_requests(multi_stack)["http://vllm-1:8000"]
    multi_stack.compose("restart", "vllm-1", timeout=600)
    multi_stack.wait_health("vllm-1", "healthy", timeout=600)
    # the gateways' probes bring it back within seconds; new chats then reach it again
    for seed in range(200, 216):
        assert chat(multi_stack, seed).status_code == 200
    assert backend_requests(multi_stack)["http://vllm-1:8000"] > before


def test_both_gateways_reach_the_cache_redis(multi_stack):
    """A gateway that cannot reach it serves from its own cache and fails no request: only its
    metric tells (a Redis in protected mode, Debian's default, refuses every client but loopback)."""
    for replica in (1, 2):
        assert gateway_metrics(multi_stack, replica)[("onellm_shared_cache_up", ())] == 1.0, replica


def stored_digest(stack: Stack, replica: int, file_id: str) -> str:
    """sha256 of a stored file's bytes, read through one gateway replica."""
    read = f"curl -fsS http://127.0.0.1:8080/v1/files/{file_id}/content | sha256sum"
    return stack.compose("exec", "-T", "--index", str(replica), "gateway", "sh", "-c", read).stdout.split()[0]


def test_a_file_uploaded_through_one_gateway_is_read_through_both_and_outlives_the_files_store(multi_stack):
    """Uploaded through HAProxy to whichever gateway, read through each; then the files store is
    re-created (a new container, its process restarted): its append-only file on the named
    volume brings the file back."""
    data = image("png", seed=300)
    upload = httpx.post(f"{api(multi_stack)}/v1/files", timeout=60, data={"purpose": "user_data"},
                        files={"file": ("photo.png", data, "image/png")})
    assert upload.status_code == 200, upload.text
    file_id, digest = upload.json()["id"], hashlib.sha256(data).hexdigest()
    assert [stored_digest(multi_stack, replica, file_id) for replica in (1, 2)] == [digest, digest]
    before = multi_stack.container("files-store")
    multi_stack.compose("up", "-d", "--no-deps", "--force-recreate", "--wait", "--wait-timeout", "120", "files-store",
                        timeout=180)
    assert multi_stack.container("files-store") != before
    assert [stored_digest(multi_stack, replica, file_id) for replica in (1, 2)] == [digest, digest]
