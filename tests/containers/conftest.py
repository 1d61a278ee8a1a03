"""The container tier: the images built (docker/cpu/build.sh, on a local Debian base) and the
compose stacks brought up for real, on a Docker engine of the tier's own: its own data root
and socket, started and stopped here, never the host's.

The data root outlives the run (ONELLM_TEST_DOCKER_ROOT, default /var/lib/onellm-test-docker), so
a second run reuses the base and every image layer a code change did not touch. Every test
collected under tests/containers/ is marked `containers`; without root, dockerd or debootstrap
the tier is skipped, or fails when CI is set.
"""

import os
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from docker_stack import REPO, DockerEngine, Stack, wait_ready
from gateway_process import free_port
from missing import unavailable

HERE = Path(__file__).resolve().parent
DATA_ROOT = Path(os.environ.get("ONELLM_TEST_DOCKER_ROOT", "/var/lib/onellm-test-docker"))
RUN_DIR = Path(os.environ.get("ONELLM_TEST_DOCKER_RUN", "/run/onellm-test-docker"))
BUILD_TIMEOUT = 1800  # from nothing: debootstrap, torch's CUDA wheels, vLLM's CPU build


def pytest_collection_modifyitems(items):
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(pytest.mark.containers)


@pytest.fixture(scope="session")
def docker_engine(tmp_path_factory) -> DockerEngine:
    if os.geteuid() != 0:
        unavailable("the container tier runs a Docker engine of its own, which needs root")
    for command in ("dockerd", "docker", "debootstrap"):
        if shutil.which(command) is None:
            unavailable(f"{command} not found: `make system-packages` installs docker.io and debootstrap")
    engine = DockerEngine(DATA_ROOT, RUN_DIR, tmp_path_factory.mktemp("dockerd") / "dockerd.log")
    engine.start()
    yield engine
    engine.stop()


@pytest.fixture(scope="session")
def images(docker_engine) -> dict:
    """The CPU layout's images, built by `make images-cpu`'s script; how long it took."""
    started = time.monotonic()
    result = subprocess.run([str(REPO / "docker" / "cpu" / "build.sh")], capture_output=True, text=True,
                            env=docker_engine.env, timeout=BUILD_TIMEOUT, cwd=REPO)
    if result.returncode != 0:
        pytest.fail(f"docker/cpu/build.sh failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    # the images a rebuild replaced: the data root is kept between runs, and each is gigabytes
    docker_engine.docker("image", "prune", "--force", timeout=300)
    return {"build_seconds": time.monotonic() - started, "log": result.stdout}


def fresh_model_folder(name: str) -> dict[str, str]:
    """A model folder of the stack's own, made afresh by its make-tiny service: two stacks
    coming up together must not write one folder."""
    shutil.rmtree(REPO / "model_repo" / name, ignore_errors=True)
    return {"ONELLM_MODEL_NAME": name, "ONELLM_UID": str(os.getuid())}


def cpu_layout(engine: DockerEngine) -> Stack:
    """docker-compose.yml with the CPU override, on a free port."""
    return Stack(engine, "onellm-cpu-test", ["docker-compose.yml", "docker/compose.cpu.yml"],
                 fresh_model_folder("tiny-compose") | {"ONELLM_PUBLISH_PORT": str(free_port())})


def multi_layout(engine: DockerEngine) -> Stack:
    """The multi-GPU layout on the CPU: two vLLMs, two gateways, the Redis stores, HAProxy."""
    files = ["docker-compose.yml", "docker/compose.multi-gpu.yml", "docker/compose.cpu.yml",
             "docker/compose.multi-gpu.cpu.yml"]
    return Stack(engine, "onellm-multi-test", files, fresh_model_folder("tiny-compose-multi") | {
        "ONELLM_PUBLISH_PORT": str(free_port()), "HAPROXY_STATS_PORT": str(free_port()), "GATEWAY_REPLICAS": "2"})


LAYOUTS = {"cpu_stack": cpu_layout, "multi_stack": multi_layout}
running: list[Stack] = []


def bring_up(stack: Stack) -> None:
    running.append(stack)
    stack.down()
    stack.up()


def take_down() -> None:
    while running:
        running.pop().down()


@pytest.fixture(scope="session")
def compose_stacks(request, docker_engine, images) -> dict[str, Stack]:
    """The stacks the collected tests use, brought up at once: each start is mostly its vLLMs
    loading, which the two stacks do side by side instead of one after the other."""
    wanted = {name for item in request.session.items for name in item.fixturenames if name in LAYOUTS}
    stacks = {name: LAYOUTS[name](docker_engine) for name in sorted(wanted)}
    with ThreadPoolExecutor(max_workers=len(stacks)) as pool:
        for started in [pool.submit(bring_up, stack) for stack in stacks.values()]:
            started.result()
    yield stacks
    take_down()


def pytest_runtest_teardown(item, nextitem):
    """Down as soon as the tier's last test ends: the stacks hold three vLLMs, which the tiers
    after this one would otherwise share the machine with until the session ends."""
    if nextitem is None or HERE not in nextitem.path.parents:
        take_down()


@pytest.fixture
def cpu_stack(compose_stacks) -> Stack:
    return compose_stacks["cpu_stack"]


@pytest.fixture
def multi_stack(compose_stacks) -> Stack:
    stack = compose_stacks["multi_stack"]
    # `up --wait` waits on the gateways' own health checks; HAProxy has none, and takes a gateway
    # in only after two of its own checks pass (deploy/haproxy/haproxy.cfg)
    wait_ready(f"http://127.0.0.1:{stack.variables['ONELLM_PUBLISH_PORT']}", timeout=60)
    return stack
