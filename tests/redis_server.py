"""A real `redis-server` (Debian's package) on a loopback port, without persistence, that a test
may stop and start again on the same port."""

import shutil
import subprocess
import time
from pathlib import Path

import pytest
import redis

from gateway_process import free_port
from missing import unavailable

START_TIMEOUT = 30


class RedisServer:
    def __init__(self, workdir: Path):
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.workdir = workdir
        self.process: subprocess.Popen | None = None

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)

    def start(self) -> "RedisServer":
        log = open(self.workdir / "redis.log", "ab")
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir)], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                with self.client() as client:
                    client.ping()
                return self
            except redis.ConnectionError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    pytest.fail(f"redis-server did not start:\n{(self.workdir / 'redis.log').read_text()[-2000:]}")
                time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()  # nothing to save: it runs without persistence
            self.process.wait()
        self.process = None


def require_redis_server() -> None:
    """Missing redis-server is a failure in CI, a skip elsewhere."""
    if shutil.which("redis-server") is None:
        unavailable("redis-server not found (apt-get install -y redis-server, or `make system-packages`)")
