"""The one interface every LLM engine offers the gateway."""

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


class Engine(Protocol):
    name: str

    def stream(self, embeddings: torch.Tensor, sampling: Sampling, usage: Usage | None = None,
               affinity: str | None = None) -> AsyncIterator[str]:
        """Text deltas for `embeddings` [L, D]; stop strings are never yielded. `affinity` is the
        same for every turn of one chat, so that an engine of several replicas can keep a chat
        where its KV blocks are cached; an engine of one ignores it."""
        ...

    async def ready(self) -> bool:
        """True when a request sent now would be served."""
        ...

    async def close(self) -> None: ...
