"""The hardening tier (issue 6): real `onellm serve` processes (tests/gateway_process.py) on
loopback ports, each with the limits, keys and admission settings its tests need, its own
TMPDIR and its own log file.

The session's gateways that the collected tests use are started at once, when the first is
needed (`hardening_gateways`). `hardened` is the main one: small limits (so that tests send
kilobytes, not the default megabytes), API keys from both the environment and a file, one CORS
origin. The
overload tests start gateways of their own; one of them they shut down with SIGTERM.
`slow_gateway` has the way-in timeouts scaled down to seconds; `crowded` has keys with quotas
of their own, two slots and a low connection cap. `projects` has keys that share a name or a
project, and two decoding workers. `bounded` keeps and receives little: a few records' worth of
memory for stored responses, uuids and prefixes, few files per key, two uploads at once.
"""

import httpx
import pytest

from gateway_process import GatewayProcess, flags, start_all, stop_cleanly
from gateways import (BOUNDS, CROWDED, ENV_KEYS, FILE_KEY, KEYS, KEYS_FILE, LIMITS, ORIGIN, PROJECT_KEYS,
                      PROJECT_KEYS_FILE, PROJECTS_ENV, SLOW_CLIENTS)


def with_keys_file(workdir, text: str) -> str:
    keys_file = workdir / "keys.txt"
    keys_file.write_text(text)
    return str(keys_file)


def hardened_gateway(model, workdir) -> GatewayProcess:
    keys_file = with_keys_file(workdir, f"# gateway keys\n\n{FILE_KEY}\n")
    return GatewayProcess(model, workdir, [*flags(LIMITS), "--api-keys-file", keys_file, "--cors-origins", ORIGIN],
                          env={"ONELLM_API_KEYS": ",".join(ENV_KEYS)},
                          ready_headers={"Authorization": f"Bearer {ENV_KEYS[0]}"})


def crowded_gateway(model, workdir) -> GatewayProcess:
    return GatewayProcess(model, workdir, [*flags(CROWDED), "--api-keys-file", with_keys_file(workdir, KEYS_FILE)],
                          ready_headers={"Authorization": f"Bearer {KEYS['bob']}"})


def projects_gateway(model, workdir) -> GatewayProcess:
    return GatewayProcess(model, workdir, ["--api-keys-file", with_keys_file(workdir, PROJECT_KEYS_FILE)],
                          env=PROJECTS_ENV, ready_headers={"Authorization": f"Bearer {PROJECT_KEYS['old']}"})


# fixture name -> its gateway, given the model and a folder of its own
GATEWAYS = {
    "hardened": hardened_gateway,
    "slow_gateway": lambda model, workdir: GatewayProcess(model, workdir, flags(SLOW_CLIENTS)),
    "crowded": crowded_gateway,
    "projects": projects_gateway,
    "bounded": lambda model, workdir: GatewayProcess(model, workdir, flags(BOUNDS)),
}


@pytest.fixture(scope="session")
def hardening_gateways(request, tiny_model, tmp_path_factory) -> dict[str, GatewayProcess]:
    """Those of GATEWAYS that the collected tests use, started at once: each start is mostly the
    wait for its model to load, which they can do side by side."""
    wanted = [name for name in GATEWAYS if any(name in item.fixturenames for item in request.session.items)]
    servers = {name: GATEWAYS[name](tiny_model, tmp_path_factory.mktemp(name)) for name in wanted}
    start_all(list(servers.values()))
    yield servers
    for server in servers.values():
        server.stop()
    for server in servers.values():
        stop_cleanly(server)


@pytest.fixture(scope="session")
def hardened(hardening_gateways):
    return hardening_gateways["hardened"]


@pytest.fixture(scope="session")
def client(hardened):
    with httpx.Client(base_url=hardened.url, timeout=120,
                      headers={"Authorization": f"Bearer {ENV_KEYS[0]}"}) as c:
        yield c


@pytest.fixture(scope="session")
def slow_gateway(hardening_gateways):
    return hardening_gateways["slow_gateway"]


@pytest.fixture(scope="session")
def crowded(hardening_gateways):
    return hardening_gateways["crowded"]


@pytest.fixture(scope="session")
def projects(hardening_gateways):
    return hardening_gateways["projects"]


@pytest.fixture(scope="session")
def bounded(hardening_gateways):
    return hardening_gateways["bounded"]
