"""The gateway tier: ONE real `onellm serve` (uvicorn, local engine) per pytest session, on a loopback
port, talked to over HTTP; plus a second plain HTTP server on loopback that hosts files for the
remote-URL tests.

The gateway is started with `--allowed-url-hosts 127.0.0.1:<the file server's port>`: URLs on
that host and port may be fetched, URLs on any other host (`localhost` included, although it is
the same machine) or port are refused.
"""

import http.server
import threading
from pathlib import Path

import httpx
import pytest

from gateway_helpers import ALLOWED_HOST
from gateway_process import GatewayProcess
from vllm_standin import StandInVLLM


@pytest.fixture(scope="session")
def model_dir(request) -> Path:
    """`onellm make-tiny`'s model (the shared `tiny_model` fixture)."""
    return request.getfixturevalue("tiny_model")


@pytest.fixture(scope="session")
def gateway(model_dir, file_server, tmp_path_factory):
    server = GatewayProcess(model_dir, tmp_path_factory.mktemp("gateway"),
                            ["--allowed-url-hosts", f"{ALLOWED_HOST}:{file_server.port}", "--log-level", "info"])
    server.start()
    yield server
    server.stop()
    # a traceback in the server log means some request hit a path nobody handled
    assert "Traceback" not in server.log(), server.log()[-6000:]


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


def stopped(standins: list[StandInVLLM]) -> None:
    for standin in standins:
        standin.release.set()  # an answer still held ends
        standin.stop()


@pytest.fixture(scope="module")
def standin():
    """A stand-in vLLM on loopback (tests/vllm_standin.py) for the module's own gateway."""
    server = StandInVLLM()
    yield server
    stopped([server])


@pytest.fixture(scope="module")
def standins():
    """Two stand-in vLLMs, for a module's gateway over several backends."""
    servers = [StandInVLLM(), StandInVLLM()]
    yield servers
    stopped(servers)
