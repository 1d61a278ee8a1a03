"""A Docker engine of the container tier's own, and compose projects on it."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKERD_START_TIMEOUT = 60
UP_TIMEOUT = 600  # `up --wait`: vLLM's CPU build starts in 1-3 minutes here


class DockerEngine:
    """dockerd with the tier's data root and socket, without the default bridge and iptables
    (as this machine allows): builds run on the host's network, and compose's own networks
    still connect a stack's containers and publish its ports."""

    def __init__(self, data_root: Path, run_dir: Path, log_path: Path):
        self.data_root = data_root
        self.run_dir = run_dir
        self.log_path = log_path
        self.host = f"unix://{run_dir / 'docker.sock'}"
        self.process: subprocess.Popen | None = None

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "DOCKER_HOST": self.host}

    def docker(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run(["docker", *args], capture_output=True, text=True, env=self.env, timeout=timeout)
        if check and result.returncode != 0:
            pytest.fail(f"docker {' '.join(args)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
        return result

    def answers(self) -> bool:
        return self.docker("info", timeout=10, check=False).returncode == 0

    def start(self) -> None:
        self.data_root.mkdir(parents=True, exist_ok=True)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                ["dockerd", "--data-root", str(self.data_root), "--exec-root", str(self.run_dir / "exec"),
                 "--pidfile", str(self.run_dir / "dockerd.pid"), "--host", self.host,
                 "--bridge=none", "--iptables=false", "--ip6tables=false", "--storage-driver", "overlay2"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + DOCKERD_START_TIMEOUT
        while not self.answers():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"dockerd did not start; the end of {self.log_path}:\n{self.log_path.read_text()[-3000:]}")
            time.sleep(0.5)

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None


def docker_compose() -> str:
    found = shutil.which("docker-compose", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    if found is None:
        pytest.fail("docker-compose not found: it comes with the dev dependencies (uv sync)")
    return found


@dataclass
class Stack:
    """One compose project of the repository's files on the tier's engine."""

    engine: DockerEngine
    project: str
    files: list[str]
    variables: dict[str, str] = field(default_factory=dict)
    up_seconds: float = 0.0

    def compose(self, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
        command = [docker_compose(), "-p", self.project]
        for name in self.files:
            command += ["-f", name]
        env = {k: v for k, v in self.engine.env.items() if not k.startswith(("ONELLM_", "VLLM_"))} | self.variables
        result = subprocess.run([*command, *args], capture_output=True, text=True, env=env, cwd=REPO, timeout=timeout)
        if check and result.returncode != 0:
            pytest.fail(f"docker compose {' '.join(args)} failed ({result.returncode}):\n"
                        f"{result.stdout[-2000:]}\n{result.stderr[-3000:]}\n{self.logs()}")
        return result

    def logs(self) -> str:
        result = self.compose("logs", "--no-color", "--tail", "40", check=False, timeout=60)
        return result.stdout[-6000:]

    def container(self, service: str) -> str:
        return self.compose("ps", "-q", "--all", service).stdout.split()[0]

    def inspect(self, service: str) -> dict:
        return json.loads(self.engine.docker("inspect", self.container(service)).stdout)[0]

    def health(self, service: str) -> str:
        return self.inspect(service)["State"]["Health"]["Status"]

    def wait_health(self, service: str, status: str, timeout: float) -> float:
        """Seconds until `service`'s health check reports `status`."""
        started = time.monotonic()
        while (now := self.health(service)) != status:
            if time.monotonic() - started > timeout:
                pytest.fail(f"{service} stayed {now!r}, not {status!r}, for {timeout} s\n{self.logs()}")
            time.sleep(1)
        return time.monotonic() - started

    def up(self) -> None:
        started = time.monotonic()
        self.compose("up", "-d", "--wait", "--wait-timeout", str(UP_TIMEOUT), timeout=UP_TIMEOUT + 60)
        self.up_seconds = time.monotonic() - started

    def down(self) -> None:
        # the named volumes too: each run starts on fresh ones, as a first `up` does
        self.compose("down", "--volumes", "--timeout", "30", check=False, timeout=180)


def wait_ready(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/ready", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    pytest.fail(f"{url}/ready did not answer 200 within {timeout} s")
