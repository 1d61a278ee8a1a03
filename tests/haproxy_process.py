"""HAProxy with the shared deploy/haproxy/haproxy.cfg in front of gateway processes on loopback,
with a servers file of the test's own (the scale tier)."""

import shutil
import signal
import subprocess
from pathlib import Path

from gateway_process import REPO, GatewayProcess, free_port, until_ready
from missing import unavailable

HAPROXY_CONFIG = REPO / "deploy" / "haproxy" / "haproxy.cfg"
START_TIMEOUT = 60


def require_haproxy() -> None:
    """Missing haproxy is a failure in CI, a skip elsewhere."""
    if shutil.which("haproxy") is None:
        unavailable("haproxy not found: make system-packages installs it")


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
        # ready once it has taken in a gateway that is
        until_ready(self.process, self.url, "haproxy", self.log_path.read_text, self.stop, START_TIMEOUT)
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
