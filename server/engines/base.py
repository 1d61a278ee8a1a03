"""The one interface every LLM engine offers the gateway, the failures it reports, and the
metrics an engine records (as interfaces: the gateway's prometheus Metrics is one)."""

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol

import torch


@dataclass(frozen=True)
class Sampling:
    max_tokens: int = 256
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ("###",)
    seed: int | None = None
    ignore_eos: bool = False  # parity checks decode a fixed number of tokens


@dataclass
class Usage:
    """Filled in by the engine while it streams, read by the caller after the stream ends."""

    completion_tokens: int = 0
    finish_reason: str | None = None  # "stop" (EOS or a stop string) or "length"
    token_ids: list[int] = field(default_factory=list)


class EngineUnavailable(Exception):
    """The LLM engine cannot take requests right now (down, unreachable, overloaded)."""


class PromptRejected(Exception):
    """The engine refuses this prompt and would refuse it on any replica (longer than the
    context window, invalid): the request's fault, so it is neither retried nor held against
    the backend. Its fields are an OpenAI error's, as the gateway passes them on to the client."""

    status = 400

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param  # the request field to change
        self.code = code


class Counter(Protocol):
    def inc(self, amount: float = 1) -> None: ...


class Gauge(Counter, Protocol):
    def dec(self, amount: float = 1) -> None: ...

    def set(self, value: float) -> None: ...


class CountersByBackend(Protocol):
    def labels(self, backend: str) -> Counter: ...


class GaugesByBackend(Protocol):
    def labels(self, backend: str) -> Gauge: ...


class GaugesByBackendMeasure(Protocol):
    def labels(self, backend: str, measure: str) -> Gauge: ...


class BackendMetrics(Protocol):
    """What an engine over several backends records, by backend URL."""

    backend_requests: CountersByBackend  # sent, retries included
    backend_failures: CountersByBackend
    backend_in_flight: GaugesByBackend
    backend_healthy: GaugesByBackend  # 1 while it takes requests
    backend_reported_load: GaugesByBackendMeasure  # what it says of itself: waiting, running, kv_cache_usage
    backend_load_scrape_failures: CountersByBackend
    vllm_retries: Counter  # requests sent again to another backend


class Engine(Protocol):
    name: str

    def stream(self, embeddings: torch.Tensor, sampling: Sampling, usage: Usage | None = None,
               affinity: str | None = None, cache_salt: str | None = None) -> AsyncIterator[str]:
        """Text deltas for `embeddings` [L, D]; stop strings are never yielded. `affinity` is the
        same for every turn of one chat, so that an engine of several replicas can keep a chat
        where its KV blocks are cached; an engine of one ignores it. Prompt rows an engine keeps
        cached from one request serve another only if both have the same `cache_salt`."""
        ...

    async def start(self) -> None:
        """Starts what the engine does in the background (probes), on the loop that serves."""
        ...

    async def ready(self) -> bool:
        """True when a request sent now would be served."""
        ...

    async def close(self) -> None: ...
