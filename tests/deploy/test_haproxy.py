"""deploy/haproxy: the shared balancing config with each deployment's servers file, parsed by
the real HAProxy, and what it promises checked on its text."""

import re
import subprocess

import pytest

from deploy_tools import DEPLOY, tool

HAPROXY_DIR = DEPLOY / "haproxy"
SHARED = HAPROXY_DIR / "haproxy.cfg"
SERVER_FILES = sorted(HAPROXY_DIR.glob("*-servers.cfg"))


def haproxy_check(*files, **environment) -> subprocess.CompletedProcess:
    command = [tool("haproxy", "make system-packages installs it"), "-c"]
    for path in files:
        command += ["-f", str(path)]
    return subprocess.run(command, capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/sbin:/usr/bin:/bin", **environment})


def directives(path, section_start: str) -> list[str]:
    """The lines of one section (from its header to the next unindented line), comments out."""
    lines, inside = [], False
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].rstrip()
        if not line:
            continue
        if not raw[0].isspace():
            inside = line.startswith(section_start)
            continue
        if inside:
            lines.append(line.strip())
    return lines


def test_there_is_a_servers_file_for_compose():
    assert HAPROXY_DIR / "compose-servers.cfg" in SERVER_FILES


@pytest.mark.parametrize("servers", SERVER_FILES, ids=lambda p: p.name)
def test_haproxy_accepts_the_config_with_each_servers_file(servers):
    result = haproxy_check(SHARED, servers)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[WARNING]" not in result.stdout + result.stderr
    assert "[ALERT]" not in result.stdout + result.stderr


def test_the_shared_file_needs_a_servers_file():
    """Alone it names a backend it does not define: the server lines are the deployment's."""
    result = haproxy_check(SHARED)
    assert result.returncode != 0
    assert "gateways" in result.stdout + result.stderr


def test_the_bind_address_comes_from_the_environment(tmp_path):
    servers = tmp_path / "servers.cfg"
    servers.write_text("backend gateways\n    server one 127.0.0.1:1\n")
    assert haproxy_check(SHARED, servers, ONELLM_LB_BIND="127.0.0.1:18080").returncode == 0
    # an address HAProxy cannot parse is refused, so the variable is what `bind` reads
    result = haproxy_check(SHARED, servers, ONELLM_LB_BIND="not an address")
    assert result.returncode != 0


def test_the_shared_file_has_no_server_lines():
    text = SHARED.read_text()
    assert not re.search(r"^\s*(server|server-template|backend)\s", text, re.M)


def test_gateways_are_balanced_by_least_connections_and_checked_on_ready():
    defaults = directives(SHARED, "defaults gateway-http")
    assert "mode http" in defaults
    assert "balance leastconn" in defaults
    assert "option httpchk GET /ready" in defaults
    assert "http-check expect status 200" in defaults
    assert "option forwardfor" in defaults
    [default_server] = [d for d in defaults if d.startswith("default-server")]
    words = default_server.split()
    assert "check" in words
    for interval in ("inter", "fall", "rise"):
        assert interval in words, interval


def seconds(value: str) -> float:
    number, unit = re.fullmatch(r"(\d+)(ms|s|m|h)?", value).groups()
    return int(number) * {"ms": 0.001, "s": 1, None: 0.001, "m": 60, "h": 3600}[unit]


def test_streams_are_neither_buffered_nor_cut_before_the_gateway_ends_them():
    """SSE frames pass as they come (no compression, the request not buffered), and HAProxy's
    timeouts are longer than the gateway's own request timeout."""
    from server.config import Settings
    text = SHARED.read_text()
    code = "\n".join(line.split("#", 1)[0] for line in text.splitlines())
    assert not re.search(r"^\s*(compression|filter compression|option http-buffer-request)", code, re.M)
    defaults = directives(SHARED, "defaults gateway-http")
    timeouts = {d.split()[1]: seconds(d.split()[2]) for d in defaults if d.startswith("timeout ")}
    for name in ("server", "client", "tunnel"):
        assert timeouts[name] > Settings.request_timeout_s, name
    # one of the two modes that keep HTTP/1.1 framing, never `option httpclose` on streams
    assert {"option http-server-close", "option http-keep-alive"} & set(defaults)


def test_compose_servers_follow_the_gateway_replicas_through_docker_dns():
    servers = HAPROXY_DIR / "compose-servers.cfg"
    resolvers = directives(servers, "resolvers docker")
    assert "nameserver docker-dns 127.0.0.11:53" in resolvers
    [template] = [d for d in directives(servers, "backend gateways") if d.startswith("server-template")]
    words = template.split()
    assert words[3] == "gateway:8080"
    assert words[words.index("resolvers") + 1] == "docker"
    assert "init-addr" in words
