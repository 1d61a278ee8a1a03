"""Who may call and which request a log line belongs to: API keys, request ids, draining.

ASGI middlewares, so that they answer before any route runs and cover every route alike.
"""

import hashlib
import hmac
import json
import logging
import re
import uuid
from collections.abc import Callable
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.core.request_id import REQUEST_ID
from server.errors import InputError, InternalError, RequestError, Unavailable

# a client's own id is kept when it is a plain token; anything else could forge log lines
_SANE_ID = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")
# probes carry no credentials (kubelet, load balancers: liveness /health, readiness /ready); the
# page holds no data and asks for a key
OPEN_PATHS = {"/health", "/ready", "/"}
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"
log = logging.getLogger("onellm.access")


async def send_error(send: Send, error: RequestError, close: bool = False) -> None:
    """The JSON error body, sent by a middleware (outside the app's exception handlers)."""
    body = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in error.headers.items()]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        return True


def logging_config(level: str) -> dict:
    """uvicorn's `log_config`: every logger (the access log too) through one handler that
    stamps each line with the id of the request it was written for."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"request_id": {"()": RequestIdFilter}},
        "formatters": {"plain": {"format": LOG_FORMAT}},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "stream": "ext://sys.stderr",
                                "formatter": "plain", "filters": ["request_id"]}},
        "root": {"handlers": ["stderr"], "level": level.upper()},
        # uvicorn's own loggers keep no handlers of their own, so their lines come here too
        "loggers": {name: {"handlers": [], "propagate": True}
                    for name in ("uvicorn", "uvicorn.error", "uvicorn.access")},
    }


class RequestIds:
    """Gives every request an id (the client's X-Request-ID when sane, else a new one), puts it
    in the response's X-Request-ID and, through REQUEST_ID, in every log line of the request."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = given if _SANE_ID.fullmatch(given) else uuid.uuid4().hex
        # each request runs in a task of its own, so the value stays with this request
        REQUEST_ID.set(request_id)
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message = {**message, "headers": [*message.get("headers", []),
                                                  (b"x-request-id", request_id.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            # the app's last-resort handler answers further out, where this header is not added
            if not started:
                await send_error(send_with_id, InternalError("internal server error"))
            raise


@dataclass(frozen=True)
class ApiKey:
    """A key, the id that stands for it in metrics and logs (a display name), the tenant whose
    files, media uuids and stored responses it sees, and its own limits (None: the defaults)."""

    secret: str = field(repr=False)
    id: str
    max_concurrent: int | None = None
    per_minute: int | None = None
    project: str | None = None  # keys of one project share a tenant; None: the key is a tenant alone

    @property
    def fingerprint(self) -> str:
        """The whole hash of the key: unlike its display id, never the same for two keys."""
        return hashlib.sha256(self.secret.encode()).hexdigest()

    @property
    def tenant(self) -> str:
        # prefixed, so that a project cannot be named like a key's tenant
        if self.project is not None:
            return "project:" + self.project
        return "key:" + self.fingerprint


_KEY_OPTIONS = {"name": str, "project": str, "max_concurrent": int, "per_minute": int}


def key_id(secret: str) -> str:
    # a hash of a random key is no hint to it, and stays the same across restarts and gateways
    return "key-" + hashlib.sha256(secret.encode()).hexdigest()[:8]


def parse_key_line(line: str, where: str) -> ApiKey:
    """`KEY` alone, or `KEY name=ID project=P max_concurrent=N per_minute=N` (any of the options, in
    any order): bearer tokens hold no spaces, so what follows the first space are options."""
    secret, *options = line.split()
    values = {}
    for option in options:
        name, _, value = option.partition("=")
        if name not in _KEY_OPTIONS or not value:
            raise ValueError(f"{where}: '{option}' is not one of {', '.join(o + '=' for o in _KEY_OPTIONS)}")
        try:
            values[name] = _KEY_OPTIONS[name](value)
        except ValueError:
            raise ValueError(f"{where}: {name} takes a whole number, not '{value}'") from None
    return ApiKey(secret, values.pop("name", None) or key_id(secret), **values)


def load_api_keys(keys: tuple[str, ...], keys_file: str | None) -> tuple[ApiKey, ...]:
    """The keys from the environment and those of the file (one a line, # comments)."""
    found = [ApiKey(k, key_id(k)) for k in keys if k]
    if keys_file:
        lines = [line.strip() for line in Path(keys_file).read_text().splitlines()]
        in_file = [parse_key_line(line, f"{keys_file} line {n}") for n, line in enumerate(lines, 1)
                   if line and not line.startswith("#")]
        if not in_file:  # a key file meant to lock the server must not leave it open
            raise ValueError(f"the API keys file {keys_file} holds no key")
        found += in_file
    return tuple(found)


def log_shared_tenants(keys: tuple[ApiKey, ...]) -> None:
    """Says which keys share their data (one project), and which share only a name: sharing is
    meant for key rotation, and an operator must see it rather than find it out."""
    projects, names = defaultdict(list), defaultdict(set)
    for key in keys:
        if key.project is not None:
            projects[key.project].append(key.id)
        names[key.id].add(key.tenant)
    for project, ids in projects.items():
        if len(ids) > 1:
            log.info("API keys %s share project '%s': its files, media uuids and stored responses",
                     ", ".join(ids), project)
    for name, tenants in names.items():
        if len(tenants) > 1:
            log.warning("%d API keys are named '%s' but share no project: each sees only its own files, media "
                        "uuids and stored responses (add project=... to share them)", len(tenants), name)


def caller_of(scope: Scope) -> str:
    """Whom a request counts against in quotas and the fair queue: its API key (by fingerprint:
    keys that share a display name still have quotas of their own), else the client's address
    (which uvicorn takes from X-Forwarded-For only for a peer in `trusted_proxies`)."""
    return scope.get("state", {}).get("fingerprint") or (scope.get("client") or ("-",))[0]


def tenant_of(request) -> str:
    """Whose files, media references and stored responses a request sees: its API key's tenant
    (its project's, or its own); "-" for all callers of a server without keys, which is open to
    everyone alike."""
    return request.scope.get("state", {}).get("tenant") or "-"


def is_batch_line(scope: Scope) -> bool:
    """A line of a batch, sent by the batch runner inside the process: its key was checked when the
    batch was created, and its caller and tenant come with it. Only the process can set scope state."""
    return bool(scope.get("state", {}).get("batch_line"))


def metric_key(scope: Scope) -> str:
    """The `key` label of a refusal: the key's id; "" for a caller known by its address, since
    a label per address would grow without bound."""
    return scope.get("state", {}).get("caller") or ""


class Gate:
    """With API keys configured, every path but /health and the page needs `Authorization: Bearer <key>`;
    while the server drains for shutdown, new requests get 503."""

    def __init__(self, app: ASGIApp, keys: tuple[ApiKey, ...], draining: Callable[[], bool]):
        self.app = app
        self.keys = keys
        self.draining = draining
        log_shared_tenants(keys)  # once, as the app starts: logging is set up by then

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        batch_line = is_batch_line(scope)
        key = self._key(dict(scope["headers"]).get(b"authorization", b"")) if self.keys and not batch_line else None
        if self.keys and key is None and not batch_line:
            # one message whatever was wrong: no hint whether a key was sent, malformed or unknown
            return await send_error(send, InputError(401, "a valid API key is required (Authorization: Bearer <key>)",
                                                     headers={"WWW-Authenticate": "Bearer"}))
        if self.draining():
            return await send_error(send, Unavailable("the server is shutting down; retry on another instance",
                                                      headers={"Retry-After": "1"}), close=True)
        if key is not None:
            state = scope.setdefault("state", {})
            state["caller"], state["fingerprint"], state["tenant"] = key.id, key.fingerprint, key.tenant
        await self.app(scope, receive, send)

    def _key(self, header: bytes) -> ApiKey | None:
        scheme, _, token = header.partition(b" ")
        token = token.strip() if scheme.lower() == b"bearer" else b""
        # compare with every key, without stopping at a match: the time taken tells nothing
        matched = None
        for key in self.keys:
            if hmac.compare_digest(token, key.secret.encode()):
                matched = key
        return matched
