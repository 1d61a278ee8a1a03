"""The live-vLLM tier: a real vLLM OpenAI server (the CPU build in .venv-vllm) serving the
LLM converted from the reference fixture, started ONCE per pytest session.

Every test collected under tests/vllm/ is marked `vllm`, so `pytest -m "not vllm"` skips
the tier. Without .venv-vllm (`make vllm-env`) the tier is skipped, or fails when CI is set.
"""

from pathlib import Path

import pytest

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

    def start(port: int | None = None) -> VLLMServer:
        log_path = tmp_path_factory.mktemp("vllm-log") / "vllm.log"
        server = VLLMServer(vllm_model_dir, log_path, port)
        servers.append(server)
        server.start()
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def vllm_server(start_vllm) -> str:
    """The base URL of the session's shared vLLM server."""
    return start_vllm().url
