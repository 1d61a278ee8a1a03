"""The live-vLLM tier: a real vLLM OpenAI server (the CPU build in .venv-vllm) serving the
LLM converted from the reference fixture, started ONCE per pytest session; and a second one, also
started once, that the fault tests stop, freeze, kill and start again (`throwaway_vllm`).

Every test collected under tests/vllm/ is marked `vllm`, so `pytest -m "not vllm"` skips
the tier. Without .venv-vllm (`make vllm-env`) the tier is skipped, or fails when CI is set.
"""

from pathlib import Path

import pytest

from otlp_receiver import OtlpReceiver
from vllm_server import VLLMServer

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items):
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(pytest.mark.vllm)


@pytest.fixture(scope="session")
def start_vllm(vllm_installed, vllm_model_dir: Path, tmp_path_factory):
    """Starts vLLM servers on the converted fixture (`start_vllm()` -> a ready VLLMServer);
    every one still running is stopped when the session ends."""
    servers: list[VLLMServer] = []

    def start(port: int | None = None, args: tuple[str, ...] = (), env: dict | None = None) -> VLLMServer:
        log_path = tmp_path_factory.mktemp("vllm-log") / "vllm.log"
        server = VLLMServer(vllm_model_dir, log_path, port, args, env)
        servers.append(server)
        server.start()
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def trace_receiver():
    """Where the shared vLLM sends its traces (test_traces_live.py); it outlives that vLLM."""
    with OtlpReceiver() as receiver:
        yield receiver


@pytest.fixture(scope="session")
def vllm_server(start_vllm, trace_receiver) -> str:
    """The base URL of the session's shared vLLM server, which exports its traces to `trace_receiver`
    (its one span per request, which costs the other tests nothing they measure)."""
    return start_vllm(args=("--otlp-traces-endpoint", f"{trace_receiver.url}/v1/traces"),
                      env={"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf",
                           "OTEL_SERVICE_NAME": "vllm-under-test", "OTEL_BSP_SCHEDULE_DELAY": "50"}).url


@pytest.fixture(scope="session")
def _throwaway(start_vllm) -> VLLMServer:
    return start_vllm()


@pytest.fixture
def throwaway_vllm(_throwaway: VLLMServer) -> VLLMServer:
    """The vLLM a fault test may stop, freeze or kill (the shared one is never touched), running:
    started again here if a test before this one failed before it started it again itself."""
    if not _throwaway.healthy():
        _throwaway.stop()
        _throwaway.start()
    return _throwaway
