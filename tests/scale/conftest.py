"""The scale-out tier: on loopback, two vLLM CPU servers, Redis, two gateways decoding on both
vLLMs and sharing through Redis their prefixes, media references, stored responses (--cache-url)
and uploaded files (--files-url), and HAProxy in front of the gateways, with the shared
deploy/haproxy/haproxy.cfg and a servers file of this tier's own. All started once, for the tier's
one module, and stopped after it, so that the rest of a session does not share the CPU with them.

Every test collected under tests/scale/ is marked `scale` (`pytest -m "not scale"` skips the
tier). Without .venv-vllm, redis-server or haproxy the tier is skipped, or fails when CI is set.
"""

import shutil
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from gateway_process import GatewayProcess, free_port
from missing import unavailable
from redis_server import RedisServer
from vllm_server import VLLMServer

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
HAPROXY_CONFIG = REPO / "deploy" / "haproxy" / "haproxy.cfg"
START_TIMEOUT = 60


def pytest_collection_modifyitems(items):
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(pytest.mark.scale)


class HAProxy:
    """`haproxy -f haproxy.cfg -f servers.cfg` in the foreground, on a loopback port."""

    def __init__(self, workdir: Path, gateways: list[GatewayProcess]):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.servers = workdir / "servers.cfg"
        # the names are the gateways' ports, so a test can tell which gateway HAProxy means
        self.servers.write_text("backend gateways\n" + "".join(
            f"    server gateway-{g.port} 127.0.0.1:{g.port}\n" for g in gateways))
        self.log_path = workdir / "haproxy.log"
        self.process: subprocess.Popen | None = None

    def start(self) -> "HAProxy":
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                ["haproxy", "-db", "-f", str(HAPROXY_CONFIG), "-f", str(self.servers)],
                env={"PATH": "/usr/sbin:/usr/bin:/bin", "ONELLM_LB_BIND": f"127.0.0.1:{self.port}"},
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.process.poll() is not None:
                pytest.fail(f"haproxy exited with {self.process.returncode}:\n{self.log_path.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/ready", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"haproxy did not reach a ready gateway in {START_TIMEOUT} s")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@dataclass
class Cluster:
    vllms: list[VLLMServer]
    redis: RedisServer
    gateways: list[GatewayProcess]
    balancer: HAProxy

    @property
    def backends(self) -> list[str]:
        return [v.url for v in self.vllms]


def _require(command: str, hint: str) -> None:
    if shutil.which(command) is None:
        unavailable(f"{command} not found: {hint}")


@pytest.fixture(scope="module")
def cluster(vllm_installed, vllm_model_dir, tmp_path_factory) -> Cluster:
    _require("redis-server", "make system-packages installs it")
    _require("haproxy", "make system-packages installs it")
    redis = RedisServer(tmp_path_factory.mktemp("scale-redis")).start()
    vllms = [VLLMServer(vllm_model_dir, tmp_path_factory.mktemp("scale-vllm") / "vllm.log") for _ in range(2)]
    gateways: list[GatewayProcess] = []
    balancer = None
    try:
        with ThreadPoolExecutor(2) as pool:  # each waits on its own server's start
            list(pool.map(VLLMServer.start, vllms))
        args = ["--vllm-url", ",".join(v.url for v in vllms), "--cache-url", redis.url, "--files-url", redis.url,
                "--log-level", "info", "--request-timeout-s", "120", "--stall-timeout-s", "30"]
        gateways = [GatewayProcess(vllm_model_dir, tmp_path_factory.mktemp("scale-gateway"), args,
                                   {"ONELLM_PREPROCESS_WORKERS": "1"}) for _ in range(2)]
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(GatewayProcess.start, gateways))
        balancer = HAProxy(tmp_path_factory.mktemp("scale-haproxy"), gateways).start()
        yield Cluster(vllms, redis, gateways, balancer)
    finally:
        if balancer is not None:
            balancer.stop()
        for gateway in gateways:
            gateway.stop()
        for server in vllms:
            server.stop()
        redis.stop()
    # a traceback in a gateway's log means some failure reached a path nobody handled
    for gateway in gateways:
        assert "Traceback" not in gateway.log(), gateway.log()[-6000:]

