"""docker-compose.yml with docker/compose.cpu.yml, up for real: the gateway image and the vLLM
stand-in serving the tiny model, and what containers get wrong in production."""

import json
import threading
import time

import httpx
import openai

from docker_stack import Stack, wait_ready
from media import image


def gateway_url(stack: Stack) -> str:
    return f"http://127.0.0.1:{stack.variables['ONELLM_PUBLISH_PORT']}"


def sse_events(lines) -> list[str]:
    return [line[6:] for line in lines if line.startswith("data: ")]


def test_the_images_were_built(docker_engine, images):
    for name in ("onellm-serve-gateway:0.1.0", "onellm-vllm-cpu:0.32.0", "onellm-cpu-base:bookworm"):
        docker_engine.docker("image", "inspect", name)


def test_both_services_turn_healthy_and_the_gateway_serves_a_streamed_image_chat(cpu_stack):
    assert cpu_stack.health("vllm") == "healthy"
    assert cpu_stack.health("gateway") == "healthy"
    with httpx.stream("POST", f"{gateway_url(cpu_stack)}/v1/chat", timeout=120,
                      data={"prompt": "What is in the picture?", "max_tokens": "16"},
                      files={"image": ("photo.png", image("png"), "image/png")}) as response:
        assert response.status_code == 200, response.read()
        events = sse_events(response.iter_lines())
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_an_openai_sdk_request_through_the_published_port(cpu_stack):
    client = openai.OpenAI(base_url=f"{gateway_url(cpu_stack)}/v1", api_key="unused", timeout=120)
    answer = client.chat.completions.create(model="tiny-compose", max_tokens=8,
                                            messages=[{"role": "user", "content": "Say something."}])
    assert answer.choices[0].message.content
    assert answer.usage.completion_tokens >= 1


def test_the_gateway_runs_as_a_non_root_user_reading_a_model_repo_it_does_not_own(cpu_stack):
    user = cpu_stack.compose("exec", "-T", "gateway", "id", "-u").stdout.strip()
    assert user not in ("", "0")
    owner = cpu_stack.compose("exec", "-T", "gateway", "stat", "-c", "%u", "/models/tiny-compose/model.json")
    assert owner.stdout.strip() != user  # and yet the model loaded: the chats above were answered


def test_logs_go_to_stdout(cpu_stack):
    logs = cpu_stack.compose("logs", "--no-color", "gateway").stdout
    assert "serving model 'tiny-compose' in float32 on the vllm engine" in logs  # compose.cpu.yml's dtype


def test_the_gateway_turns_unhealthy_while_vllm_is_stopped_and_healthy_again_after(cpu_stack):
    url = gateway_url(cpu_stack)
    cpu_stack.compose("stop", "vllm")
    try:
        # the gateway learns of it from its next probe of vLLM's /health (every 2 s)
        deadline = time.monotonic() + 30
        while httpx.get(f"{url}/ready", timeout=10).status_code != 503:
            assert time.monotonic() < deadline, "/ready still 200 30 s after vLLM stopped"
            time.sleep(0.5)
        assert httpx.get(f"{url}/health", timeout=10).status_code == 200
        cpu_stack.wait_health("gateway", "unhealthy", timeout=120)
    finally:
        cpu_stack.compose("start", "vllm")
    cpu_stack.wait_health("vllm", "healthy", timeout=600)
    cpu_stack.wait_health("gateway", "healthy", timeout=120)


def test_docker_stop_drains_the_stream_in_flight_and_the_server_exits_0(cpu_stack):
    """SIGTERM must reach `onellm serve` (not a shell that swallows it), which finishes the
    answer it is streaming before it exits, within the stop timeout."""
    url = gateway_url(cpu_stack)
    stopped: list[float] = []

    def stop_gateway():
        started = time.monotonic()
        cpu_stack.compose("stop", "--timeout", "60", "gateway", timeout=120)
        stopped.append(time.monotonic() - started)

    stopper = threading.Thread(target=stop_gateway)
    with httpx.stream("POST", f"{url}/v1/chat", timeout=120,
                      data={"prompt": "A story, please.", "max_tokens": "500"}) as response:
        lines = response.iter_lines()
        for line in lines:
            if line.startswith("data: {"):
                break  # the stream has started
        stopper.start()
        events = sse_events(lines)
    stopper.join(150)
    try:
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["choices"][0]["finish_reason"] == "length"
        state = cpu_stack.inspect("gateway")["State"]
        assert state["ExitCode"] == 0, state
        assert stopped and stopped[0] < 60  # drained, not killed at the timeout
        assert "Shutting down" in cpu_stack.compose("logs", "--no-color", "gateway").stdout
    finally:
        cpu_stack.compose("start", "gateway")
        wait_ready(url, timeout=300)


def test_an_uploaded_file_outlives_the_gateway_container(cpu_stack):
    """The files directory is a named volume that the non-root user writes: a file uploaded
    before `up --force-recreate` (what a new image or a changed setting does) is there after,
    in a new container."""
    url = gateway_url(cpu_stack)
    data = image("png", seed=7)
    upload = httpx.post(f"{url}/v1/files", timeout=60, data={"purpose": "user_data"},
                        files={"file": ("photo.png", data, "image/png")})
    assert upload.status_code == 200, upload.text
    before = cpu_stack.container("gateway")
    cpu_stack.compose("up", "-d", "--no-deps", "--force-recreate", "--wait", "--wait-timeout", "300", "gateway",
                      timeout=360)
    assert cpu_stack.container("gateway") != before
    content = httpx.get(f"{url}/v1/files/{upload.json()['id']}/content", timeout=60)
    assert content.status_code == 200, content.text
    assert content.content == data
