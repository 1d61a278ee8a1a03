"""`onellm serve`: run the gateway with uvicorn. Each option also reads `ONELLM_<OPTION>` from the environment."""

import argparse
import resource
import signal
from dataclasses import fields

import uvicorn

from server.traffic.access import logging_config
from server.traffic.connections import connection_class
from server.config import Settings
from server.engines.routing import POLICIES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="model folder (env ONELLM_MODEL; default model_repo/tiny)")
    parser.add_argument("--vllm-url", help="vLLM OpenAI server(s) to decode on, comma-separated "
                        "(env ONELLM_VLLM_URL); without it the embedded in-process engine serves")
    parser.add_argument("--routing", choices=POLICIES, help="how each request picks one of several vLLM "
                        "servers (env ONELLM_ROUTING; default affinity: a chat's turns stay on one server "
                        "unless it is much busier than the others)")
    parser.add_argument("--cache-url", help="Redis (redis://host:port/db) where gateways share attachment "
                        "prefixes (env ONELLM_CACHE_URL); without it each gateway caches only its own")
    parser.add_argument("--cache-timeout-ms", type=float, help="connect and reply timeout of that Redis; slower "
                        "is treated as down (env ONELLM_CACHE_TIMEOUT_MS; default 100)")
    parser.add_argument("--cache-ttl-s", type=int, help="lifetime of a prefix in that Redis "
                        "(env ONELLM_CACHE_TTL_S; default 86400)")
    parser.add_argument("--files-dir", help="directory of the files uploaded with POST /v1/files (env "
                        "ONELLM_FILES_DIR; default ~/.local/share/onellm-serve/files)")
    parser.add_argument("--files-url", help="Redis (redis://host:port/db) to keep uploaded files in instead, "
                        "shared by every gateway (env ONELLM_FILES_URL)")
    parser.add_argument("--host", help="address to listen on (env ONELLM_HOST; default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (env ONELLM_PORT; default 8080)")
    parser.add_argument("--device", help="torch device of the encoder and local engine (env ONELLM_DEVICE; default cpu)")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                        help="encoder dtype (env ONELLM_DTYPE; default: as stored)")
    parser.add_argument("--allowed-url-hosts", type=_list,
                        help="comma-separated hosts whose http(s) attachment URLs may be fetched: "
                        "'host' on its scheme's default port (80, 443) only, 'host:port' on that port "
                        "(env ONELLM_ALLOWED_URL_HOSTS; default none)")
    parser.add_argument("--encoder-max-batch", type=int, help="requests of one modality encoded as one batch "
                        "(env ONELLM_ENCODER_MAX_BATCH; default 8)")
    parser.add_argument("--encoder-max-wait-ms", type=float, help="longest wait for a batch to fill "
                        "(env ONELLM_ENCODER_MAX_WAIT_MS; default 1)")
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"],
                        help="env ONELLM_LOG_LEVEL; only debug logs prompts and upload sizes")
    parser.add_argument("--api-keys-file", help="file of API keys, one a line; with it or env ONELLM_API_KEYS "
                        "(comma-separated) every path but /health needs 'Authorization: Bearer <key>'")
    parser.add_argument("--cors-origins", type=_list, help="comma-separated origins browsers may call from "
                        "(env ONELLM_CORS_ORIGINS; default none)")
    parser.add_argument("--trusted-proxies", type=_list, help="comma-separated addresses or CIDRs of proxies "
                        "whose X-Forwarded-For names the client, for the per-address limits and the logs "
                        "(env ONELLM_TRUSTED_PROXIES; default none: the peer's address counts)")
    limits = parser.add_argument_group("limits and overload")
    for f in fields(Settings):
        if "help" in f.metadata:
            env = f"ONELLM_{f.name.upper()}"
            default = "" if f.default is None else f"; default {f.default}"
            limits.add_argument(f"--{f.name.replace('_', '-')}", type=f.metadata["type"],
                                help=f"{f.metadata['help']} (env {env}{default})")


def _list(value: str) -> tuple[str, ...]:
    return tuple(v for v in value.split(",") if v)


class _Server(uvicorn.Server):
    """On SIGTERM (or Ctrl-C) uvicorn stops listening and waits up to `drain_timeout_s` for
    in-flight requests; the app is told too, so that any new request reaching it gets 503."""

    def __init__(self, config: uvicorn.Config, app):
        super().__init__(config)
        self.app = app

    def handle_exit(self, sig, frame) -> None:
        self.app.state.draining = True
        super().handle_exit(sig, frame)


def _allow_descriptors(connections: int) -> None:
    """Raises the soft limit on open files (often 1024) so that `connections` sockets, the
    model's files and the uploads' temp files fit; the hard limit is as far as it goes."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = connections + 256
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted if hard == resource.RLIM_INFINITY else min(wanted, hard), hard))


def _drained(signum, frame) -> None:
    raise SystemExit(0)


def run(args: argparse.Namespace) -> int:
    settings = Settings.from_env(**vars(args))
    from server.entrypoints.app import create_app
    app = create_app(settings)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            log_config=logging_config(settings.log_level),
                            timeout_graceful_shutdown=settings.drain_timeout_s,
                            http=connection_class(settings.header_timeout_s, settings.max_connections,
                                                  app.state.metrics, settings.body_idle_timeout_s),
                            timeout_keep_alive=settings.keep_alive_timeout_s,
                            # uvicorn believes X-Forwarded-For from 127.0.0.1 unless told otherwise
                            proxy_headers=bool(settings.trusted_proxies),
                            forwarded_allow_ips=list(settings.trusted_proxies))
    _allow_descriptors(settings.max_connections)
    # uvicorn re-raises the signal it stopped on once it has drained; by then stopping was
    # asked for and done, which is a clean exit, not death by a signal
    signal.signal(signal.SIGTERM, _drained)
    signal.signal(signal.SIGINT, _drained)
    _Server(config, app).run()
    return 0
