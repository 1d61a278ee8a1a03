"""The clients tier: ONE real `onellm serve` (local engine, `onellm make-tiny`'s model) per pytest
session on a loopback port, which the Python client, the CLI and the web page talk to over HTTP."""

from pathlib import Path

import pytest

from client_helpers import write_media
from gateway_process import GatewayProcess


@pytest.fixture(scope="session")
def gateway(tiny_model: Path, tmp_path_factory) -> str:
    """The base URL of a running gateway."""
    server = GatewayProcess(tiny_model, tmp_path_factory.mktemp("gateway"), ["--log-level", "warning"])
    server.start()
    yield server.url
    server.stop()


@pytest.fixture(scope="session")
def media(tmp_path_factory) -> dict[str, Path]:
    """One real file per upload field: image, video, audio, point, depth, normal, fmri, imu."""
    return write_media(tmp_path_factory.mktemp("media"))
