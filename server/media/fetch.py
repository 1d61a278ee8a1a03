"""What a chat request's parts point at outside the request, read before its parts are: remote
attachment URLs (only from allowed hosts and ports) and stored files (only the caller's own).

Nothing is fetched before the request's attachments are counted (the endpoints count them first),
and every byte fetched counts against the memory budget (max_buffered_bytes) before it is kept,
until the request ends."""

import asyncio
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx

from server.budget import format_bytes
from server.config import Settings
from server.errors import InputError

DEFAULT_PORTS = {"http": 80, "https": 443}


class Charge(Protocol):
    """The bytes one request holds against max_buffered_bytes (the traffic layer's Charge)."""

    def reserve(self, nbytes: int, param: str) -> None:
        """Counts `nbytes` more before they are kept; past the budget, an error naming `param`."""


class StoredFiles(Protocol):
    """The file store, as far as reading a file a chat names goes: a record has `bytes` and `kind`."""

    async def get(self, tenant: str, file_id: str) -> Any | None: ...

    async def content(self, tenant: str, file_id: str) -> tuple[Any, bytes] | None: ...


@dataclass(frozen=True)
class Fetched:
    """What a request's parts point at, read before its parts are: remote URLs' bytes, and the
    stored files' (kind, bytes) by id."""

    urls: dict[str, bytes] = field(default_factory=dict)
    files: dict[str, tuple[str, bytes]] = field(default_factory=dict)


class Fetcher:
    """Reads what one request's parts point at: `tenant`'s own stored files, and remote URLs where
    `settings` allow them; each byte is charged to the request (`charge`) before it is kept."""

    def __init__(self, settings: Settings, files: StoredFiles, tenant: str, charge: Charge):
        self.settings = settings
        self.files = files
        self.tenant = tenant
        self.charge = charge

    async def all(self, urls: list[tuple[str, str]], file_ids: list[tuple[str, str]]) -> Fetched:
        """`urls`, `file_ids`: (param, url) and (param, file id) of the parts, in request order;
        each URL and file is read once, charged under the first param that names it."""
        remote: dict[str, bytes] = {}
        for param, url in urls:  # none fetched when no host is allowed: the parts refuse them later
            if self.settings.allowed_url_hosts and url not in remote:
                remote[url] = await fetch_remote(url, param, self.settings, self.charge)
        stored: dict[str, tuple[str, bytes]] = {}
        for param, file_id in file_ids:
            if file_id not in stored:
                stored[file_id] = await self.stored(file_id, param)
        return Fetched(remote, stored)

    async def stored(self, file_id: object, param: str) -> tuple[str, bytes]:
        """(kind, bytes) of a stored file a chat names; one the caller cannot see is a 400 naming the
        part. Its size, from its record, counts against the memory budget before it is read."""
        record = await self.files.get(self.tenant, file_id) if isinstance(file_id, str) else None
        if record is not None:
            self.charge.reserve(record.bytes, param)
        found = await self.files.content(self.tenant, file_id) if record is not None else None
        if found is None:
            raise InputError(400, f"no file '{file_id}' is stored for this API key (it may have expired or been "
                                  "deleted); upload it again with POST /v1/files", param, code="file_not_found")
        record, data = found
        return record.kind, data


def _host_port(url: httpx.URL) -> tuple[str, int | None]:
    host = f"[{url.host}]" if ":" in url.host else url.host  # an IPv6 address is written in brackets
    return host, url.port or DEFAULT_PORTS.get(url.scheme)


def is_allowed(url: httpx.URL, allowed_hosts: tuple[str, ...]) -> bool:
    """An entry `host` allows that host on its scheme's default port, `host:port` on that port."""
    allowed = {entry.lower() for entry in allowed_hosts}
    host, port = _host_port(url)
    return (port == DEFAULT_PORTS.get(url.scheme) and host in allowed) or f"{host}:{port}" in allowed


async def fetch_remote(url: str, param: str, settings: Settings, charge: Charge) -> bytes:
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as e:
        raise InputError(400, f"the URL is not valid ({e})", param) from None
    if not is_allowed(parsed, settings.allowed_url_hosts):
        host, port = _host_port(parsed)
        raise InputError(400, f"remote URLs from '{host}:{port}' are not allowed; send the file as a data: URL",
                         param)
    timeout_s = settings.url_fetch_timeout_s
    try:
        async with asyncio.timeout(timeout_s):  # the whole download: httpx's timeouts are per read
            return await _download(parsed, param, settings.max_file_bytes, charge, timeout_s)
    except TimeoutError:
        raise InputError(422, f"fetching the URL took longer than {timeout_s:g} s (url_fetch_timeout_s)",
                         param) from None
    except httpx.InvalidURL as e:
        raise InputError(400, f"the URL is not valid ({e})", param) from None
    except httpx.HTTPError as e:
        raise InputError(422, f"could not fetch the URL: {type(e).__name__}", param) from None


async def _download(url: httpx.URL, param: str, max_bytes: int, charge: Charge, timeout_s: float) -> bytes:
    """The body as it was sent: compressed bodies are not asked for, nor inflated (a few kB of
    gzip can inflate to gigabytes), so they reach the decoders as what they are, and fail there."""
    too_large = InputError(413, f"the remote file is larger than the limit of {format_bytes(max_bytes)} (max_file_bytes)",
                           param)
    async with httpx.AsyncClient(timeout=timeout_s, follow_redirects=False) as client:
        async with client.stream("GET", url, headers={"Accept-Encoding": "identity"}) as response:
            if response.status_code != 200:
                redirect = " (redirects are not followed)" if response.is_redirect else ""
                raise InputError(422, f"fetching the URL gave HTTP {response.status_code}{redirect}", param)
            declared = response.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > max_bytes:
                raise too_large
            chunks, size = [], 0
            async for chunk in response.aiter_raw():  # counted as it arrives, like an upload
                size += len(chunk)
                if size > max_bytes:
                    raise too_large
                charge.reserve(len(chunk), param)
                chunks.append(chunk)
            return b"".join(chunks)
