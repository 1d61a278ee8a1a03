"""The clients tier: ONE real `onellm serve` (local engine, `onellm make-tiny`'s model) per pytest
session on a loopback port, which the Python client, the CLI and the web page talk to over HTTP."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from client_helpers import REPO, clean_env, free_port, write_media

START_TIMEOUT = 240  # importing torch + transformers takes half a minute on a busy 2-core machine
STOP_TIMEOUT = 30


@pytest.fixture(scope="session")
def gateway(tiny_model: Path, tmp_path_factory) -> str:
    """The base URL of a running gateway."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = tmp_path_factory.mktemp("gateway") / "serve.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "server.cli", "serve", "--model", str(tiny_model), "--port", str(port),
             "--log-level", "warning"],
            cwd=REPO, env=clean_env(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_ready(process, url, log_path)
        yield url
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_ready(process: subprocess.Popen, url: str, log_path: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"onellm serve exited with {process.returncode}:\n{log_path.read_text(errors='replace')}")
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    pytest.fail(f"onellm serve was not ready after {START_TIMEOUT} s:\n{log_path.read_text(errors='replace')}")


@pytest.fixture(scope="session")
def media(tmp_path_factory) -> dict[str, Path]:
    """One real file per upload field: image, video, audio, point, depth, normal, fmri, imu."""
    return write_media(tmp_path_factory.mktemp("media"))
