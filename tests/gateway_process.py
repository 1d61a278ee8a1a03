"""`onellm serve` as a subprocess on a loopback port, with its own flags, environment, TMPDIR and
log file (the hardening and live-vLLM fault tests), and what tests read from /proc about it."""

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[1]
START_TIMEOUT = 240  # importing torch + transformers takes half a minute on a busy 2-core machine
STOP_TIMEOUT = 60


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def flags(settings: dict) -> list[str]:
    return [arg for name, value in settings.items() for arg in (f"--{name.replace('_', '-')}", str(value))]


def until_ready(process: subprocess.Popen, url: str, name: str, log: Callable[[], str], stop: Callable[[], object],
                timeout: float, headers: dict[str, str] | None = None) -> None:
    """Until `url`/ready answers 200. A process that exits first fails the test, and so does one
    not ready within `timeout` (after `stop()`), each with the end of its `log()`."""
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            pytest.fail(f"{name} exited with {process.returncode}:\n{log()[-3000:]}")
        try:
            if httpx.get(f"{url}/ready", headers=headers, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            stop()
            pytest.fail(f"{name} was not ready after {timeout} s:\n{log()[-3000:]}")
        time.sleep(0.3)


class GatewayProcess:
    """`onellm serve` in a subprocess; stderr and stdout go to `log_path`, temp files to `tmpdir`."""

    def __init__(self, model_dir: Path, workdir: Path, args: list[str], env: dict[str, str] | None = None,
                 ready_headers: dict[str, str] | None = None):
        """`ready_headers`: what its /ready needs (an API key, where keys are configured)."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / "serve.log"
        self.tmpdir = workdir / "tmp"
        self.tmpdir.mkdir()
        self.args = ["--model", str(model_dir), "--host", "127.0.0.1", "--port", str(self.port), *args]
        # uploaded files stay in the test's folder, and a restart with the same workdir finds them
        self.files_dir = workdir / "files"
        self.env = {"ONELLM_FILES_DIR": str(self.files_dir), **(env or {})}
        self.ready_headers = ready_headers
        self.process: subprocess.Popen | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self) -> "GatewayProcess":
        env = {k: v for k, v in os.environ.items() if not k.startswith("ONELLM_")}
        env.update(PYTHONUNBUFFERED="1", TMPDIR=str(self.tmpdir), **self.env)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", *self.args], cwd=REPO,
                                            env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        until_ready(self.process, self.url, "onellm serve", self.log, self.stop, START_TIMEOUT, self.ready_headers)
        return self

    def stop(self) -> int | None:
        """SIGTERM, as a process manager stops it; the exit status."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def open_fds(self) -> list[str]:
        """What each open descriptor is; a TCP socket also says its ports and state, so that a
        leak names the connection it is."""
        fd_dir = Path(f"/proc/{self.pid}/fd")
        links = []
        for fd in fd_dir.iterdir():
            try:
                links.append(os.readlink(fd))
            except FileNotFoundError:  # closed while we looked
                pass
        tcp = tcp_sockets(self.pid)
        return sorted(f"{link} {tcp[link]}" if link in tcp else link for link in links)

    def threads(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/task"))


def stop_cleanly(server: GatewayProcess) -> None:
    """Stops a fixture's gateway: it must exit 0 on SIGTERM without a traceback in its log (one
    would mean some request hit a path nobody handled)."""
    assert server.stop() == 0, server.log()[-3000:]
    assert "Traceback" not in server.log(), server.log()[-5000:]


def serving(server: GatewayProcess):
    """A fixture's gateway: started, handed out, then stopped cleanly."""
    server.start()
    yield server
    stop_cleanly(server)


def start_all(servers: list["GatewayProcess"]) -> list["GatewayProcess"]:
    """Starts the gateways at once (each start is mostly the wait for its model to load); if one
    fails to start, the others are stopped before the failure is raised."""
    with ThreadPoolExecutor(len(servers)) as pool:
        starts = [pool.submit(server.start) for server in servers]
    try:
        for start in starts:
            start.result()
    except BaseException:
        for server in servers:
            server.stop()
        raise
    return servers


# the states of /proc/net/tcp's `st` column, by their hex code
TCP_STATES = {"01": "ESTABLISHED", "06": "TIME_WAIT", "08": "CLOSE_WAIT", "0A": "LISTEN"}


def tcp_sockets(pid: int) -> dict[str, str]:
    """`socket:[inode]` -> "tcp :local_port->:remote_port STATE" for the process's network namespace."""
    found = {}
    for table in ("tcp", "tcp6"):
        path = Path(f"/proc/{pid}/net/{table}")
        if not path.exists():
            continue
        for row in path.read_text().splitlines()[1:]:
            fields = row.split()
            local, remote, state, inode = fields[1], fields[2], fields[3], fields[9]
            found[f"socket:[{inode}]"] = (f"tcp :{int(local.split(':')[1], 16)}->:{int(remote.split(':')[1], 16)} "
                                          f"{TCP_STATES.get(state, state)}")
    return found
