"""The production engine: a vLLM OpenAI server started with `--enable-prompt-embeds`.

The gateway computes the prompt embeddings [L, D] (encoder + prompt assembly) and vLLM
only runs the LLaMA decoder on them, via `POST /v1/completions` with `prompt_embeds`.
"""

import asyncio
import base64
import io
import json
import logging
from collections.abc import AsyncIterator

import httpx
import torch

from server import tracing
from server.engines.base import EngineUnavailable, PromptRejected, Sampling, Usage

log = logging.getLogger("onellm.vllm")
# OneLLM's chat template separates turns with "###"; the model must never run into the
# next turn, whatever stop strings the caller asked for.
TURN_SEPARATOR = "###"


def encode_embeddings(embeddings: torch.Tensor, dtype: torch.dtype) -> str:
    """Base64 of a `torch.save`d tensor: the only `prompt_embeds` format vLLM reads."""
    tensor = embeddings.detach().to(device="cpu", dtype=dtype)
    if tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
        # torch.save writes a view's whole storage, and prompt embeddings can be a view (rows
        # of the embedding table, a slice of a batch): copy just these rows
        tensor = tensor.clone(memory_format=torch.contiguous_format)
    buffer = io.BytesIO()
    torch.save(tensor, buffer)
    return base64.b64encode(buffer.getbuffer()).decode("ascii")


def completion_request(embeddings: torch.Tensor, sampling: Sampling, model: str,
                       dtype: torch.dtype = torch.float32, cache_salt: str | None = None) -> dict:
    """The JSON body of a streaming `/v1/completions` request for `embeddings` [L, D]; vLLM's
    prefix cache shares KV blocks only between requests of the same `cache_salt`."""
    if embeddings.dim() != 2:
        raise ValueError(f"prompt embeddings must be [L, D], got shape {tuple(embeddings.shape)}")
    stop = list(dict.fromkeys([*sampling.stop, TURN_SEPARATOR]))
    body = {
        "model": model,
        "prompt_embeds": encode_embeddings(embeddings, dtype),
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": sampling.max_tokens,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "stop": stop,
        "return_token_ids": True,
        "ignore_eos": sampling.ignore_eos,
    }
    if sampling.seed is not None:
        body["seed"] = sampling.seed
    if cache_salt is not None:
        body["cache_salt"] = cache_salt
    return body


def request_json(body: dict) -> bytes:
    """`body` as JSON bytes. The base64 embeddings (6 MB for 600 rows of OneLLM-7B) go in as
    they are: json.dumps would copy them and scan them for characters to escape, which base64
    has none of, and that took 15 of the 20 ms of a 600-row request (docs/benchmarks.md)."""
    rest = json.dumps({key: value for key, value in body.items() if key != "prompt_embeds"})
    return f'{rest[:-1]}, "prompt_embeds": "{body["prompt_embeds"]}"}}'.encode("ascii")


def request_content(embeddings: torch.Tensor, sampling: Sampling, model: str, dtype: torch.dtype,
                    cache_salt: str | None = None) -> bytes:
    """The request's bytes. Run off the event loop: moving the embeddings to the CPU waits for the
    device's queued work, and torch.save and base64 take milliseconds per hundred rows."""
    return request_json(completion_request(embeddings, sampling, model, dtype, cache_salt))


class SSEParser:
    """Incremental Server-Sent Events parser: feed raw bytes, get each event's data.

    Lines are split on bytes before decoding, so a UTF-8 character cut between two
    network chunks is reassembled before it is decoded.
    """

    def __init__(self):
        self._buffer = b""
        self._data: list[str] = []

    def feed(self, chunk: bytes) -> list[str]:
        self._buffer += chunk
        *lines, self._buffer = self._buffer.split(b"\n")
        events = []
        for raw in lines:
            line = raw.rstrip(b"\r").decode("utf-8")
            if not line:
                if self._data:
                    events.append("\n".join(self._data))
                    self._data = []
            elif line.startswith("data:"):
                value = line[5:]
                self._data.append(value[1:] if value.startswith(" ") else value)
            # comments (":...") and the event/id/retry fields carry nothing vLLM uses
        return events


def _error_fields(payload: dict | str) -> tuple[str, str | None]:
    """vLLM's error message and the parameter it blames, from either JSON shape its
    versions have used (`{"error": {...}}` or the fields at the top level)."""
    if not isinstance(payload, dict):
        return payload, None
    error = payload.get("error", payload)
    if not isinstance(error, dict):
        return str(error), None
    return str(error.get("message") or error), error.get("param")


def _raise_for_error(status: int, payload: dict | str) -> None:
    message, param = _error_fields(payload)
    # vLLM answers 400 for requests it will never serve (the prompt longer than the
    # context window, max_tokens past it): the client's mistake, not an outage. Its own text
    # changes with its versions and speaks of its internals: the client gets ours, the log vLLM's.
    if status == 400:
        log.warning("vLLM refused the request (param %r): %s", param, message)
        where = "max_tokens" if param == "max_tokens" else "messages"
        if param in ("max_tokens", "input_tokens") or "context length" in message:
            raise PromptRejected("the prompt and max_tokens do not fit the model's context window: send fewer or "
                                 "shorter messages or attachments, or a smaller max_tokens", where,
                                 code="context_length_exceeded")
        raise PromptRejected("the LLM engine refused the request as invalid", where)
    raise EngineUnavailable(f"vLLM failed the request ({status}): {message}")


class VLLMEngine:
    """Streams completions for prompt embeddings from a vLLM OpenAI-compatible server."""

    name = "vllm"

    def __init__(self, base_url: str, model: str | None = None, dtype: torch.dtype = torch.float32,
                 timeout: float = 600.0, connect_timeout: float = 5.0, health_timeout: float = 2.0,
                 transport: httpx.AsyncBaseTransport | None = None):
        """`model` defaults to the one the server lists; `dtype` is the one vLLM serves the
        LLM in (`--dtype`); `timeout` bounds the wait for each streamed chunk, which on CPU
        includes the whole prefill."""
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.dtype = dtype
        self._client = httpx.AsyncClient(
            base_url=self.base_url,
            timeout=httpx.Timeout(timeout, connect=connect_timeout),
            transport=transport,
        )
        # its own connection: a probe waiting behind requests that hold every connection of their
        # pool would time out and report a backend that is merely busy as down
        self._probe_client = httpx.AsyncClient(base_url=self.base_url, timeout=health_timeout,
                                               limits=httpx.Limits(max_connections=1), transport=transport)

    async def ready(self) -> bool:
        try:
            response = await self._probe_client.get("/health")
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    async def close(self) -> None:
        await self._client.aclose()
        await self._probe_client.aclose()

    async def _served_model(self) -> str:
        if self.model is None:
            try:
                response = await self._client.get("/v1/models")
            except httpx.HTTPError as error:
                raise self._unavailable(error) from error
            if response.status_code != 200:
                _raise_for_error(response.status_code, _json_or_text(response.text))
            models = response.json().get("data") or []
            if not models:
                raise EngineUnavailable(f"vLLM at {self.base_url} serves no model")
            self.model = models[0]["id"]
        return self.model

    async def stream(self, embeddings: torch.Tensor, sampling: Sampling, usage: Usage | None = None,
                     affinity: str | None = None, cache_salt: str | None = None) -> AsyncIterator[str]:
        usage = usage if usage is not None else Usage()
        content = await asyncio.to_thread(request_content, embeddings, sampling, await self._served_model(),
                                          self.dtype, cache_salt)
        try:
            # Leaving this block early (the caller's aclose() or a cancelled task) closes
            # the HTTP response, which is how vLLM learns to abort the request.
            async with self._client.stream("POST", "/v1/completions", content=content,
                                           headers=tracing.inject({"Content-Type": "application/json"})) as response:
                if response.status_code != 200:
                    await response.aread()
                    _raise_for_error(response.status_code, _json_or_text(response.text))
                parser = SSEParser()
                async for chunk in response.aiter_bytes():
                    for data in parser.feed(chunk):
                        if data == "[DONE]":
                            return
                        text = _apply_event(json.loads(data), usage)
                        if text:
                            yield text
        except httpx.HTTPError as error:
            raise self._unavailable(error) from error
        # vLLM always ends with [DONE]; a stream without it was cut off.
        raise EngineUnavailable(f"vLLM at {self.base_url} closed the stream before it finished")

    def _unavailable(self, error: httpx.HTTPError) -> EngineUnavailable:
        if isinstance(error, httpx.ConnectError):
            return EngineUnavailable(f"cannot connect to vLLM at {self.base_url}: {error}")
        if isinstance(error, httpx.TimeoutException):
            return EngineUnavailable(f"vLLM at {self.base_url} timed out: {type(error).__name__}")
        return EngineUnavailable(f"lost the connection to vLLM at {self.base_url}: {error!r}")


def _apply_event(event: dict, usage: Usage) -> str:
    """Record one streamed chunk in `usage`; returns its text delta."""
    if "error" in event:
        # an error after the 200 header arrives as an event in the stream
        error = event["error"]
        status = error.get("code") if isinstance(error, dict) else None
        _raise_for_error(status if isinstance(status, int) else 500, event)
    text = ""
    for choice in event.get("choices") or []:
        text += choice.get("text") or ""
        token_ids = choice.get("token_ids") or []
        usage.token_ids.extend(token_ids)
        usage.completion_tokens += len(token_ids)
        if choice.get("finish_reason"):
            usage.finish_reason = _finish_reason(choice["finish_reason"])
    # the last chunk carries vLLM's own count (include_usage); it has no choices
    if event.get("usage"):
        usage.completion_tokens = event["usage"]["completion_tokens"]
    return text


def _finish_reason(reason: str) -> str:
    """vLLM's finish reason as Usage knows it: "length", or "stop" for every normal end
    (EOS, a stop string, vLLM's repetition detection)."""
    # This client never sees its own aborts (it has closed the stream by then): an abort
    # or an error here is vLLM giving up on the request, e.g. while it shuts down.
    if reason in ("abort", "error"):
        raise EngineUnavailable(f"vLLM ended the request early (finish_reason={reason!r})")
    return "length" if reason == "length" else "stop"


def _json_or_text(text: str) -> dict | str:
    try:
        return json.loads(text)
    except ValueError:
        return text
