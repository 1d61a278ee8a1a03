"""What a request makes the gateway fetch, and what a download holds, on a gateway of its own
with a small memory budget (12 MiB), short send and fetch timeouts, 4 requests at once per
caller, and remote URLs allowed from one loopback HTTP server (`Remote`, a thread here) on its
port only. Memory is the gateway process's own peak RSS around each request (peak_memory.py).
"""

import hashlib
import http.server
import random
import socket
import threading
import time

import httpx
import pytest

import media
from gateway_process import GatewayProcess, flags
from peak_memory import peak_growth

MiB = 1 << 20
SETTINGS = {"max_buffered_bytes": 12 * MiB, "max_file_bytes": 9 * MiB, "max_attachments": 8,
            "key_max_concurrent": 4, "body_idle_timeout_s": 3, "url_fetch_timeout_s": 1}
STORED_BYTES = 2 * MiB  # one stored file, named by many ids
DOWNLOAD_BYTES = 8 * MiB  # more than loopback's socket buffers hold, so a reader that stops stalls the sender
DEADLINE_S = 60  # generous: the machine is shared


def random_bytes(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


class Remote:
    """A loopback HTTP server: /file/<name> serves `files`, /redirect answers 302 to a file,
    /unsized sends 10 MiB with no Content-Length, /oversized declares 10 MiB and sends nothing,
    /stall sends headers and waits until released."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.requested: list[str] = []
        self.release = threading.Event()
        remote = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                remote.requested.append(self.path)
                if self.path.startswith("/file/") and self.path in remote.files:
                    self._answer(200, {"Content-Length": str(len(remote.files[self.path]))}, remote.files[self.path])
                elif self.path == "/redirect":
                    self._answer(302, {"Location": "/file/cat.png", "Content-Length": "0"})
                elif self.path == "/unsized":
                    self._answer(200, {}, b"\0" * (10 * MiB))
                elif self.path == "/oversized":
                    self._answer(200, {"Content-Length": str(10 * MiB)})
                elif self.path == "/stall":
                    self._answer(200, {"Content-Length": "1000"}, b"x")
                    remote.release.wait(DEADLINE_S)
                else:
                    self._answer(404, {"Content-Length": "0"})

            def _answer(self, status: int, headers: dict, body: bytes = b""):
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
                try:
                    self.wfile.write(body)
                    self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):  # the gateway stopped reading: as it should
                    pass

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def remote():
    server = Remote()
    yield server
    server.close()


@pytest.fixture(scope="module")
def gateway(tiny_model, tmp_path_factory, remote):
    server = GatewayProcess(tiny_model, tmp_path_factory.mktemp("fetching"),
                            [*flags(SETTINGS), "--allowed-url-hosts", f"127.0.0.1:{remote.port}"])
    server.start()
    yield server
    assert server.stop() == 0, server.log()[-3000:]
    assert "Traceback" not in server.log(), server.log()[-5000:]


@pytest.fixture(scope="module")
def client(gateway):
    with httpx.Client(base_url=gateway.url, timeout=DEADLINE_S) as c:
        yield c


def store(client, data: bytes) -> str:
    response = client.post("/v1/files", files={"file": ("blob.bin", data)}, data={"purpose": "user_data"})
    assert response.status_code == 200, response.text
    return response.json()["id"]


@pytest.fixture(scope="module")
def sixty_ids(client) -> list[str]:
    """One file uploaded 60 times: stored once, named by 60 ids."""
    data = random_bytes(STORED_BYTES, seed=60)
    return [store(client, data) for _ in range(60)]


def image_parts(ids: list[str]) -> list[dict]:
    return [{"type": "image_url", "image_url": {"file_id": file_id}} for file_id in ids]


def chat_naming(client, endpoint: str, ids: list[str]) -> httpx.Response:
    """A chat whose one message names each stored file as an image, on each endpoint's terms."""
    if endpoint == "/v1/chat":
        return client.post(endpoint, data={"prompt": "what?", "max_tokens": "1", "stream": "false", "image_file_id": ids})
    if endpoint == "/v1/responses":
        parts = [{"type": "input_image", "file_id": file_id} for file_id in ids]
        return client.post(endpoint, json={"max_output_tokens": 1, "input": [{"role": "user", "content": parts}]})
    return client.post(endpoint, json={"max_tokens": 1, "messages": [{"role": "user", "content": image_parts(ids)}]})


def assert_error(response: httpx.Response, status: int, *words: str) -> dict:
    assert response.status_code == status, response.text[:1000]
    error = response.json()["error"]
    for word in words:
        assert word in error["message"], error
    return error


# --- attachments are counted before anything is fetched --------------------------------------

@pytest.mark.parametrize("endpoint", ["/v1/chat/completions", "/v1/chat", "/v1/responses"])
def test_sixty_stored_ids_are_refused_before_one_is_read(gateway, client, sixty_ids, endpoint):
    with peak_growth(gateway.pid) as growth:
        response = chat_naming(client, endpoint, sixty_ids)
    error = assert_error(response, 400, "60 attachments", "(max_attachments)")
    assert error["param"] in ("messages", "input"), error
    assert growth.added <= 2 * STORED_BYTES, f"{growth.added / MiB:.1f} MiB for a refused request"


# --- fetched bytes count against the memory budget --------------------------------------------

def test_stored_files_past_the_memory_budget_are_refused_with_503(client):
    ids = [store(client, random_bytes(STORED_BYTES, seed=seed)) for seed in range(7)]  # 14 MiB > 12 MiB
    error = assert_error(chat_naming(client, "/v1/chat/completions", ids), 503, "(max_buffered_bytes)")
    assert error["param"].startswith("messages[0].content[") and error["param"].endswith(".image_url.file_id")
    # what the refused request had reserved is free again: five files fit, and go on to be decoded
    fitting = chat_naming(client, "/v1/chat/completions", ids[:5])
    assert 400 <= fitting.status_code < 500 and fitting.status_code != 503, fitting.text


def test_remote_bytes_past_the_memory_budget_are_refused_with_503(client, remote):
    for name in ("a", "b"):  # 7 MiB each: under max_file_bytes, 14 MiB together
        remote.files[f"/file/{name}.bin"] = random_bytes(7 * MiB, seed=ord(name))
    parts = [{"type": "image_url", "image_url": {"url": remote.url(f"/file/{name}.bin")}} for name in ("a", "b")]
    response = client.post("/v1/chat/completions", json={"max_tokens": 1, "messages": [{"role": "user", "content": parts}]})
    error = assert_error(response, 503, "(max_buffered_bytes)")
    assert error["param"] == "messages[0].content[1].image_url.url", error


# --- downloads stream, under the caller's quota -------------------------------------------------

@pytest.fixture(scope="module")
def download(client) -> tuple[str, bytes]:
    data = random_bytes(DOWNLOAD_BYTES, seed=8)
    return store(client, data), data


def stalled_download(port: int, file_id: str) -> socket.socket:
    """A download whose reader takes its first bytes, then none: a receive buffer of a few kB,
    so the gateway's sends stop once it and the gateway's socket buffer are full."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(DEADLINE_S)
    sock.connect(("127.0.0.1", port))
    sock.sendall(f"GET /v1/files/{file_id}/content HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert sock.recv(1024).startswith(b"HTTP/1.1 200 "), "the download did not start"
    return sock


def gateway_ends_of(gateway: GatewayProcess, sockets: list[socket.socket]) -> list[str]:
    ports = {f"->:{sock.getsockname()[1]} " for sock in sockets}
    return [fd for fd in gateway.open_fds() if any(port in fd for port in ports)]


def test_stalled_downloads_hold_a_piece_each_and_are_dropped(gateway, client, download):
    file_id, _ = download
    quota = SETTINGS["key_max_concurrent"]
    with peak_growth(gateway.pid) as growth:
        readers = [stalled_download(gateway.port, file_id) for _ in range(quota)]
        try:
            over = client.get(f"/v1/files/{file_id}/content")
            assert_error(over, 429, "(key_max_concurrent)")
            deadline = time.monotonic() + DEADLINE_S
            while gateway_ends_of(gateway, readers):  # dropped after body_idle_timeout_s without a read
                assert time.monotonic() < deadline, gateway_ends_of(gateway, readers)
                time.sleep(0.2)
        finally:
            for reader in readers:
                reader.close()
    assert growth.added <= quota * 2 * MiB, f"{growth.added / MiB:.1f} MiB for {quota} stalled downloads"


def test_a_download_is_the_stored_bytes(client, download):
    file_id, data = download
    with client.stream("GET", f"/v1/files/{file_id}/content") as response:
        assert response.status_code == 200
        assert response.headers["content-length"] == str(len(data))
        body = response.read()
    assert hashlib.sha256(body).digest() == hashlib.sha256(data).digest()


# --- remote URLs ----------------------------------------------------------------------------

def url_chat(client, url: str) -> httpx.Response:
    return client.post("/v1/chat/completions", json={"max_tokens": 1, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "what?"}, {"type": "image_url", "image_url": {"url": url}}]}]})


PARAM = "messages[0].content[1].image_url.url"


def test_a_remote_url_on_the_allowed_host_and_port_is_fetched(client, remote):
    remote.files["/file/cat.png"] = media.image("png", seed=3)
    assert url_chat(client, remote.url("/file/cat.png")).status_code == 200
    assert "/file/cat.png" in remote.requested


@pytest.mark.parametrize("url", ["http://127.0.0.1/file/cat.png", "http://127.0.0.1:{gateway}/file/cat.png"])
def test_the_allowed_host_on_another_port_is_refused(client, gateway, remote, url):
    remote.requested.clear()
    error = assert_error(url_chat(client, url.format(gateway=gateway.port)), 400, "not allowed")
    assert error["param"] == PARAM
    assert not remote.requested


def test_a_redirect_is_not_followed(client, remote):
    remote.requested.clear()
    error = assert_error(url_chat(client, remote.url("/redirect")), 422, "HTTP 302", "not followed")
    assert error["param"] == PARAM
    assert remote.requested == ["/redirect"]


@pytest.mark.parametrize("path", ["/unsized", "/oversized"])
def test_a_remote_file_over_the_file_limit_is_cut_off(gateway, client, remote, path):
    with peak_growth(gateway.pid) as growth:
        error = assert_error(url_chat(client, remote.url(path)), 413, "(max_file_bytes)")
    assert error["param"] == PARAM
    assert growth.added <= 2 * SETTINGS["max_file_bytes"]


def test_a_remote_url_that_stalls_is_given_up(client, remote):
    try:
        error = assert_error(url_chat(client, remote.url("/stall")), 422, "(url_fetch_timeout_s)")
    finally:
        remote.release.set()
    assert error["param"] == PARAM


def test_an_invalid_url_is_a_400_naming_the_part(client, remote):
    error = assert_error(url_chat(client, remote.url("/file/a\0b")), 400, "not valid")
    assert error["param"] == PARAM
