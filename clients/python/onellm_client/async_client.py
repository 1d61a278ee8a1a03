"""The asyncio client and its multi-turn session: the synchronous ones with `await`."""

from collections.abc import Sequence

import httpx

from onellm_client._wire import ChatResult, FileInput, build_request, result_from_completion
from onellm_client.client import DEFAULT_TIMEOUT, Conversation, client_settings
from onellm_client.errors import MediaNotFoundError, error_from_response, transport_errors
from onellm_client.streams import AsyncChatStream


class AsyncClient:
    """`stream = await client.chat("Describe it", image="cat.jpg")`; `async for delta in stream: ...`"""

    def __init__(self, base_url: str | None = None, api_key: str | None = None,
                 timeout: float | httpx.Timeout = DEFAULT_TIMEOUT):
        self.base_url, headers = client_settings(base_url, api_key)
        self._http = httpx.AsyncClient(base_url=self.base_url, headers=headers, timeout=timeout)

    async def chat(self, prompt: str, *, image: FileInput | None = None, video: FileInput | None = None,
                   audio: FileInput | None = None, point: FileInput | None = None,
                   depth: FileInput | None = None, normal: FileInput | None = None,
                   fmri: FileInput | None = None, imu: FileInput | None = None,
                   imu_sample_rate: float | None = None, history: Sequence[dict] | None = None,
                   max_tokens: int | None = None, temperature: float | None = None, top_p: float | None = None,
                   stop: str | Sequence[str] | None = None, seed: int | None = None, model: str | None = None,
                   stream: bool = True) -> AsyncChatStream | ChatResult:
        """As `Client.chat`; a stream is an AsyncChatStream."""
        uploads = {"image": image, "video": video, "audio": audio, "point": point, "depth": depth,
                   "normal": normal, "fmri": fmri, "imu": imu}
        request = build_request(prompt, history, uploads, stream, imu_sample_rate, max_tokens, temperature,
                                top_p, stop, seed, model)
        response = await self._send("POST", "/v1/chat", stream, data=request.data, files=request.files)
        if stream:
            return AsyncChatStream(response)
        return result_from_completion(response.json(), response.headers)

    def session(self, system: str | None = None) -> "AsyncSession":
        return AsyncSession(self, system)

    async def models(self) -> list[dict]:
        return (await self._send("GET", "/v1/models")).json()["data"]

    async def health(self) -> bool:
        return await self._probe("/health")

    async def ready(self) -> bool:
        return await self._probe("/ready")

    async def _probe(self, path: str) -> bool:
        try:
            return (await self._http.get(path)).status_code == 200
        except httpx.HTTPError:
            return False

    async def _send(self, method: str, path: str, stream: bool = False, **kwargs) -> httpx.Response:
        with transport_errors(self.base_url):
            response = await self._http.send(self._http.build_request(method, path, **kwargs), stream=stream)
            if response.status_code >= 400:
                await response.aread()
                await response.aclose()
                raise error_from_response(response)
        return response

    async def close(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


class AsyncSession(Conversation):
    """As `Session`, for the AsyncClient."""

    async def chat(self, prompt: str, *, stream: bool = True, **options) -> AsyncChatStream | ChatResult:
        files = self._read_uploads(options)
        try:
            answer = await self.client.chat(prompt, history=self._messages(), stream=stream, **options)
        except MediaNotFoundError:
            if not self._forget_media():
                raise
            answer = await self.client.chat(prompt, history=self._messages(), stream=stream, **options)
        return self._track(prompt, answer, files)
