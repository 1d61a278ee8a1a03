"""The scale-out tier: on loopback, two vLLM CPU servers, Redis, two gateways decoding on both
vLLMs and sharing through Redis their prefixes, media references, stored responses (--cache-url)
and uploaded files (--files-url), and HAProxy in front of the gateways, with the shared
deploy/haproxy/haproxy.cfg and a servers file of this tier's own. All started once, for the module
that uses them (test_cluster.py), and stopped after it, so that the rest of a session does not share
the CPU with them. test_cluster_quotas.py starts its own two gateways (tiny model, no vLLM), Redis
and HAProxy.

Every test collected under tests/scale/ is marked `scale` (`pytest -m "not scale"` skips the
tier). Without .venv-vllm, redis-server or haproxy the tier is skipped, or fails when CI is set.
"""

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway_process import GatewayProcess
from haproxy_process import HAProxy, require_haproxy
from redis_server import RedisServer, require_redis_server
from vllm_server import VLLMServer

VLLM_MAX_SEQS = 4

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items):
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(pytest.mark.scale)


@dataclass
class Cluster:
    vllms: list[VLLMServer]
    redis: RedisServer
    gateways: list[GatewayProcess]
    balancer: HAProxy

    @property
    def backends(self) -> list[str]:
        return [v.url for v in self.vllms]


@pytest.fixture(scope="module")
def cluster(vllm_installed, vllm_model_dir, tmp_path_factory) -> Cluster:
    require_redis_server()
    require_haproxy()
    redis = RedisServer(tmp_path_factory.mktemp("scale-redis")).start()
    # a few sequences at once, so that a test can make one queue (test_cluster.py's routing on load)
    vllms = [VLLMServer(vllm_model_dir, tmp_path_factory.mktemp("scale-vllm") / "vllm.log",
                        args=("--max-num-seqs", str(VLLM_MAX_SEQS))) for _ in range(2)]
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

