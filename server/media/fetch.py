"""What a chat request's parts point at outside the request, read before its parts are: remote
attachment URLs (only from allowed hosts and ports) and stored files (only the caller's own).

Nothing is fetched before the request's attachments are counted, and every byte fetched counts
against the memory budget (max_buffered_bytes) before it is kept, until the request ends."""

import asyncio

import httpx
from fastapi import Request

from server.entrypoints.files.router import read_stored
from server.traffic.intake import Charge, charge_of
from server.traffic.limits import _mib, check_attachment_count
from server.entrypoints.protocol import ChatCompletionRequest
from server.core.chat import Fetched, attachment_count, file_ids, media_fields, remote_urls
from server.errors import InputError

DEFAULT_PORTS = {"http": 80, "https": 443}


async def fetch_all(request: Request, body: ChatCompletionRequest, earlier_attachments: int = 0) -> Fetched:
    """`earlier_attachments`: those of the stored conversation the request continues."""
    settings = request.app.state.settings
    check_attachment_count(earlier_attachments + attachment_count(media_fields(body)), settings.max_attachments)
    charge = charge_of(request)
    urls = {url: await fetch_remote(url, param, settings, charge) for url, param in remote_urls(body).items()} \
        if settings.allowed_url_hosts else {}
    files = {file_id: await read_stored(request, file_id, param) for file_id, param in file_ids(body).items()}
    return Fetched(urls, files)


def _host_port(url: httpx.URL) -> tuple[str, int | None]:
    host = f"[{url.host}]" if ":" in url.host else url.host  # an IPv6 address is written in brackets
    return host, url.port or DEFAULT_PORTS.get(url.scheme)


def is_allowed(url: httpx.URL, allowed_hosts: tuple[str, ...]) -> bool:
    """An entry `host` allows that host on its scheme's default port, `host:port` on that port."""
    allowed = {entry.lower() for entry in allowed_hosts}
    host, port = _host_port(url)
    return (port == DEFAULT_PORTS.get(url.scheme) and host in allowed) or f"{host}:{port}" in allowed


async def fetch_remote(url: str, param: str, settings, charge: Charge) -> bytes:
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
    too_large = InputError(413, f"the remote file is larger than the limit of {_mib(max_bytes)} (max_file_bytes)",
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
