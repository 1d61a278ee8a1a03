"""The hardening tier (issue 6): real `onellm serve` processes (tests/gateway_process.py) on
loopback ports, each with the limits, keys and admission settings its tests need, its own
TMPDIR and its own log file.

`hardened` is the session's main gateway: small limits (so that tests send kilobytes, not the
default megabytes), API keys from both the environment and a file, one CORS origin. The
overload tests start gateways of their own; one of them they shut down with SIGTERM.
"""

import httpx
import pytest

from gateway_process import GatewayProcess, flags
from gateways import ENV_KEYS, FILE_KEY, LIMITS, ORIGIN


@pytest.fixture(scope="session")
def hardened(tiny_model, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("hardened")
    keys_file = workdir / "keys.txt"
    keys_file.write_text(f"# gateway keys\n\n{FILE_KEY}\n")
    server = GatewayProcess(tiny_model, workdir,
                            [*flags(LIMITS), "--api-keys-file", str(keys_file), "--cors-origins", ORIGIN],
                            env={"ONELLM_API_KEYS": ",".join(ENV_KEYS)})
    server.start({"Authorization": f"Bearer {ENV_KEYS[0]}"})
    yield server
    assert server.stop() == 0, server.log()[-3000:]
    assert "Traceback" not in server.log(), server.log()[-5000:]


@pytest.fixture(scope="session")
def client(hardened):
    with httpx.Client(base_url=hardened.url, timeout=120,
                      headers={"Authorization": f"Bearer {ENV_KEYS[0]}"}) as c:
        yield c
