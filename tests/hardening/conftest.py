"""The hardening tier (issue 6): real `onellm serve` processes (tests/gateway_process.py) on
loopback ports, each with the limits, keys and admission settings its tests need, its own
TMPDIR and its own log file.

`hardened` is the session's main gateway: small limits (so that tests send kilobytes, not the
default megabytes), API keys from both the environment and a file, one CORS origin. The
overload tests start gateways of their own; one of them they shut down with SIGTERM.
`slow_gateway` has the way-in timeouts scaled down to seconds; `crowded` has keys with quotas
of their own, two slots and a low connection cap. `projects` has keys that share a name or a
project, and two decoding workers.
"""

import httpx
import pytest

from gateway_process import GatewayProcess, flags, serving
from gateways import (CROWDED, ENV_KEYS, FILE_KEY, KEYS, KEYS_FILE, LIMITS, ORIGIN, PROJECT_KEYS, PROJECT_KEYS_FILE,
                      PROJECTS_ENV, SLOW_CLIENTS)


@pytest.fixture(scope="session")
def hardened(tiny_model, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("hardened")
    keys_file = workdir / "keys.txt"
    keys_file.write_text(f"# gateway keys\n\n{FILE_KEY}\n")
    yield from serving(GatewayProcess(tiny_model, workdir,
                                      [*flags(LIMITS), "--api-keys-file", str(keys_file), "--cors-origins", ORIGIN],
                                      env={"ONELLM_API_KEYS": ",".join(ENV_KEYS)}),
                       {"Authorization": f"Bearer {ENV_KEYS[0]}"})


@pytest.fixture(scope="session")
def client(hardened):
    with httpx.Client(base_url=hardened.url, timeout=120,
                      headers={"Authorization": f"Bearer {ENV_KEYS[0]}"}) as c:
        yield c


@pytest.fixture(scope="session")
def slow_gateway(tiny_model, tmp_path_factory):
    yield from serving(GatewayProcess(tiny_model, tmp_path_factory.mktemp("slow"), flags(SLOW_CLIENTS)))


@pytest.fixture(scope="session")
def crowded(tiny_model, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("crowded")
    keys_file = workdir / "keys.txt"
    keys_file.write_text(KEYS_FILE)
    yield from serving(GatewayProcess(tiny_model, workdir, [*flags(CROWDED), "--api-keys-file", str(keys_file)]),
                       {"Authorization": f"Bearer {KEYS['bob']}"})


@pytest.fixture(scope="session")
def projects(tiny_model, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("projects")
    keys_file = workdir / "keys.txt"
    keys_file.write_text(PROJECT_KEYS_FILE)
    yield from serving(GatewayProcess(tiny_model, workdir, ["--api-keys-file", str(keys_file)], env=PROJECTS_ENV),
                       {"Authorization": f"Bearer {PROJECT_KEYS['old']}"})
