"""`onellm serve`: run the gateway with uvicorn. Each option also reads `ONELLM_<OPTION>` from the environment."""

import argparse
import resource
import signal
from dataclasses import fields

import uvicorn

from server.traffic.access import logging_config
from server.traffic.connections import connection_class
from server.config import SECTIONS, Settings
from server.engines.routing import POLICIES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """A flag for each setting that has a help text, in a group per section of the settings."""
    groups = {section: parser.add_argument_group(title) for section, title in SECTIONS.items()}
    for f in fields(Settings):
        if f.metadata["help"] is None:  # set by its ONELLM_* variable only
            continue
        default = "" if f.default is None else f"; default {'none' if f.default == () else f.default}"
        choices = POLICIES if f.name == "routing" else f.metadata["choices"] or None
        groups[f.metadata["section"]].add_argument(
            f"--{f.name.replace('_', '-')}", type=f.metadata["parse"], choices=choices,
            help=f"{f.metadata['help']} (env ONELLM_{f.name.upper()}{default})")


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
    try:
        settings = Settings.from_env(**vars(args))
    except ValueError as error:  # a setting from the environment that cannot be one
        raise SystemExit(f"onellm serve: {error}") from None
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
