"""The gateway tier: ONE real `onellm serve` (uvicorn, local engine) per pytest session, on a loopback
port, talked to over HTTP; plus a second plain HTTP server on loopback that hosts files for the
remote-URL tests.

The gateway is started with `--allowed-url-hosts 127.0.0.1`: URLs on 127.0.0.1 may be fetched,
URLs on any other host (`localhost` included, although it is the same machine) are refused.
"""

import http.server
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from gateway_helpers import ALLOWED_HOST

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT = 240  # importing torch + transformers takes half a minute on a busy 2-core machine
STOP_TIMEOUT = 30


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def model_dir(request) -> Path:
    """`onellm make-tiny`'s model (the shared `tiny_model` fixture)."""
    return request.getfixturevalue("tiny_model")


class Gateway:
    def __init__(self, model_dir: Path, log_path: Path):
        self.model_dir = model_dir
        self.log_path = log_path
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def log_tail(self, lines: int = 40) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("ONELLM_")}
        env["PYTHONUNBUFFERED"] = "1"
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "server.cli", "serve", "--model", str(self.model_dir), "--host", "127.0.0.1",
                 "--port", str(self.port), "--allowed-url-hosts", ALLOWED_HOST, "--log-level", "info"],
                cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.process.poll() is not None:
                pytest.fail(f"onellm serve exited with {self.process.returncode} before it was ready:\n"
                            f"{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"onellm serve was not ready after {START_TIMEOUT} s:\n{self.log_tail()}")
            time.sleep(0.3)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture(scope="session")
def gateway(model_dir, tmp_path_factory):
    server = Gateway(model_dir, tmp_path_factory.mktemp("gateway") / "serve.log")
    server.start()
    yield server
    server.stop()
    # a traceback in the server log means some request hit a path nobody handled
    assert "Traceback" not in server.log_path.read_text(errors="replace"), server.log_tail(80)


@pytest.fixture(scope="session")
def base_url(gateway) -> str:
    return gateway.url


@pytest.fixture(scope="session")
def client(base_url):
    with httpx.Client(base_url=base_url, timeout=120) as c:
        yield c


@pytest.fixture(scope="session")
def served_model(client) -> str:
    return client.get("/v1/models").json()["data"][0]["id"]


class FileServer:
    """A plain `http.server` on loopback serving `files` (path -> bytes), in a thread."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.requested: list[str] = []  # paths asked for, in order
        files, requested = self.files, self.requested

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                requested.append(self.path)
                data = files.get(self.path)
                if data is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str, host: str = ALLOWED_HOST) -> str:
        return f"http://{host}:{self.port}{path}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="session")
def file_server():
    server = FileServer()
    yield server
    server.close()
