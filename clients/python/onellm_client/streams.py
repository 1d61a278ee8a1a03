"""A streamed answer: iterate it for text deltas; afterwards it holds the whole answer."""

from collections.abc import AsyncIterator, Callable, Iterator

import httpx

from onellm_client._wire import ChatResult, StreamState, media_uuids
from onellm_client.errors import APIConnectionError, transport_errors

OnDone = Callable[[ChatResult], None]


class _StreamBase:
    def __init__(self, response: httpx.Response):
        self.response = response
        self._state = StreamState()
        self._state.media = media_uuids(response.headers)
        self.on_done: OnDone | None = None  # called with the whole answer once the server said [DONE]
        self._deltas = self._read()

    @property
    def text(self) -> str:
        """The answer so far."""
        return self._state.text

    @property
    def finish_reason(self) -> str | None:
        return self._state.finish_reason

    @property
    def media(self) -> list[str]:
        """The uuids of the prompt's attachments, known from the response's headers on."""
        return self._state.media

    @property
    def done(self) -> bool:
        return self._state.done

    def _finish(self) -> None:
        if not self._state.done:
            raise APIConnectionError("the stream ended before the server said [DONE]")
        if self.on_done is not None:
            self.on_done(self._state.result())


class ChatStream(_StreamBase):
    """`for delta in stream: ...`, then `stream.result()`. Use it in a `with` block, or read it to
    the end, so the connection is released; closing early tells the server to stop generating."""

    def __iter__(self) -> Iterator[str]:
        return self._deltas

    def _read(self) -> Iterator[str]:
        try:
            with transport_errors(self.response.url):
                for line in self.response.iter_lines():
                    yield from self._state.feed(line)
                    if self._state.done:
                        break
        finally:
            self.response.close()
        self._finish()

    def result(self) -> ChatResult:
        """Reads what is left of the stream and returns the whole answer."""
        for _ in self._deltas:
            pass
        return self._state.result()

    def close(self) -> None:
        self._deltas.close()
        self.response.close()

    def __enter__(self) -> "ChatStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncChatStream(_StreamBase):
    """`async for delta in stream: ...`, then `await stream.result()`; `async with` closes it."""

    def __aiter__(self) -> AsyncIterator[str]:
        return self._deltas

    async def _read(self) -> AsyncIterator[str]:
        try:
            with transport_errors(self.response.url):
                async for line in self.response.aiter_lines():
                    for delta in self._state.feed(line):
                        yield delta
                    if self._state.done:
                        break
        finally:
            await self.response.aclose()
        self._finish()

    async def result(self) -> ChatResult:
        async for _ in self._deltas:
            pass
        return self._state.result()

    async def close(self) -> None:
        await self._deltas.aclose()
        await self.response.aclose()

    async def __aenter__(self) -> "AsyncChatStream":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
