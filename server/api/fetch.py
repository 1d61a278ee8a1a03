"""What a chat request's parts point at outside the request, read before its parts are: remote
attachment URLs (only from allowed hosts) and stored files (only the caller's own)."""

import httpx
from fastapi import Request

from server.api.file_routes import read_stored
from server.api.schemas import ChatCompletionRequest
from server.api.uploads import Fetched, file_ids, remote_urls
from server.errors import InputError


async def fetch_all(request: Request, body: ChatCompletionRequest) -> Fetched:
    settings = request.app.state.settings
    urls = {url: await fetch_remote(url, param, settings) for url, param in remote_urls(body).items()} \
        if settings.allowed_url_hosts else {}
    files = {file_id: await read_stored(request, file_id, param) for file_id, param in file_ids(body).items()}
    return Fetched(urls, files)


async def fetch_remote(url: str, param: str, settings) -> bytes:
    host = httpx.URL(url).host
    if host not in settings.allowed_url_hosts:
        raise InputError(400, f"remote URLs from '{host}' are not allowed; send the file as a data: URL", param)
    try:
        async with httpx.AsyncClient(timeout=10, follow_redirects=False) as client:
            async with client.stream("GET", url) as response:
                if response.status_code != 200:
                    raise InputError(422, f"fetching the URL gave HTTP {response.status_code}", param)
                data = bytearray()
                async for chunk in response.aiter_bytes():
                    data += chunk
                    if len(data) > settings.max_file_bytes:  # counted as it arrives, like uploads
                        raise InputError(413, "the remote file is larger than the limit of "
                                              f"{settings.max_file_bytes} bytes (max_file_bytes)", param)
                return bytes(data)
    except httpx.HTTPError as e:
        raise InputError(422, f"could not fetch the URL: {type(e).__name__}", param) from None
