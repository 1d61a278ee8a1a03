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
from pathlib import Path

import pytest

from docker_stack import REPO, DockerEngine, Stack
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


@pytest.fixture(scope="module")
def cpu_stack(docker_engine, images) -> Stack:
    """docker-compose.yml with the CPU override, on free ports, the tiny model made by the
    stack's own make-tiny service into model_repo/ (a folder of its own, made afresh)."""
    model_name = "tiny-compose"
    shutil.rmtree(REPO / "model_repo" / model_name, ignore_errors=True)
    stack = Stack(docker_engine, "onellm-cpu-test", ["docker-compose.yml", "docker/compose.cpu.yml"], {
        "ONELLM_MODEL_NAME": model_name, "ONELLM_PUBLISH_PORT": str(free_port()), "ONELLM_UID": str(os.getuid())})
    stack.down()
    stack.up()
    yield stack
    stack.down()
