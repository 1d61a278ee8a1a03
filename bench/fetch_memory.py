"""Peak memory a gateway adds for what a request makes it fetch or send (a measurement, not a test).

    uv run onellm serve --port 8190 &
    uv run python bench/fetch_memory.py --url http://127.0.0.1:8190

Two rows of the hardening table, on the gateway listening at --url (found by its port in /proc):
one file of --file-mb uploaded --ids times (stored once), then one chat naming every id; and
--downloads downloads of a --download-mb stored file whose readers take a few kB, then nothing,
until the gateway drops them or --wait-s passes. Each prints the answers and the gateway's peak
RSS added (VmHWM, reset before each row: tests/peak_memory.py).
"""

import argparse
import os
import random
import socket
import sys
import time
from collections import Counter
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from gateway_process import tcp_sockets  # noqa: E402
from peak_memory import peak_growth  # noqa: E402

MiB = 1 << 20


def listening_pid(port: int) -> int:
    """The process whose socket listens on `port` (the gateway), from /proc."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for row in Path(table).read_text().splitlines()[1:]:
            fields = row.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":
                inodes.add(f"socket:[{fields[9]}]")
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if any(os.readlink(fd) in inodes for fd in Path(f"/proc/{pid}/fd").iterdir()):
                return int(pid)
        except OSError:
            continue
    raise SystemExit(f"no process of this user listens on port {port}")


def store(client: httpx.Client, data: bytes) -> str:
    response = client.post("/v1/files", files={"file": ("blob.bin", data)}, data={"purpose": "user_data"})
    response.raise_for_status()
    return response.json()["id"]


def many_ids(client: httpx.Client, pid: int, file_mb: float, ids: int) -> None:
    data = random.Random(1).randbytes(int(file_mb * MiB))
    named = [store(client, data) for _ in range(ids)]
    parts = [{"type": "image_url", "image_url": {"file_id": file_id}} for file_id in named]
    with peak_growth(pid) as growth:
        response = client.post("/v1/chat/completions", json={"max_tokens": 1, "messages": [
            {"role": "user", "content": parts}]})
    print(f"| one {file_mb:g} MB file as {ids} ids, one chat naming them | {growth.added / MiB:+.0f} MiB | "
          f"{response.status_code} {response.json().get('error', {}).get('message', '')[:60]} |")
    for file_id in named:
        client.delete(f"/v1/files/{file_id}")


def stalled(port: int, file_id: str) -> tuple[socket.socket, str]:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(30)
    sock.connect(("127.0.0.1", port))
    sock.sendall(f"GET /v1/files/{file_id}/content HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    return sock, sock.recv(1024).split(b"\r\n", 1)[0].decode()


def peers_of(pid: int) -> set[int]:
    """The remote ports of the process's open TCP connections: a reader's port is there until the
    gateway closes its end (read from /proc, so that nothing here reads the stalled sockets)."""
    sockets = tcp_sockets(pid)
    links = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            links.append(os.readlink(fd))
        except FileNotFoundError:
            pass
    return {int(sockets[link].split("->:")[1].split()[0]) for link in links if link in sockets}


def stalled_downloads(client: httpx.Client, pid: int, port: int, download_mb: float, downloads: int,
                      wait_s: float) -> None:
    file_id = store(client, random.Random(2).randbytes(int(download_mb * MiB)))
    with peak_growth(pid) as growth:
        readers = [stalled(port, file_id) for _ in range(downloads)]
        ports = {sock.getsockname()[1] for sock, _ in readers}
        deadline = time.monotonic() + wait_s
        while ports & peers_of(pid) and time.monotonic() < deadline:
            time.sleep(0.5)
    left = len(ports & peers_of(pid))
    statuses = Counter(status.split(" ")[1] for _, status in readers if status)
    for sock, _ in readers:
        sock.close()
    print(f"| {downloads} downloads of a {download_mb:g} MB file that stall | {growth.added / MiB:+.0f} MiB | "
          f"{dict(statuses)}; {left} still open after {wait_s:g} s |")
    client.delete(f"/v1/files/{file_id}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8190")
    parser.add_argument("--file-mb", type=float, default=8)
    parser.add_argument("--ids", type=int, default=60)
    parser.add_argument("--download-mb", type=float, default=24)
    parser.add_argument("--downloads", type=int, default=40)
    parser.add_argument("--wait-s", type=float, default=60)
    args = parser.parse_args()
    port = httpx.URL(args.url).port
    pid = listening_pid(port)
    print("| what was sent | peak RSS added | answer |\n|---|---:|---|")
    with httpx.Client(base_url=args.url, timeout=120) as client:
        many_ids(client, pid, args.file_mb, args.ids)
        stalled_downloads(client, pid, port, args.download_mb, args.downloads, args.wait_s)


if __name__ == "__main__":
    main()
