"""The chat logic behind every endpoint: prepare (attachments -> prefixes -> prompt embeddings of
what fits the context), then generate (the engine's stream of the answer)."""

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import aclosing, nullcontext
from dataclasses import dataclass, field

import torch
from opentelemetry.trace import Span

from server.cache.shared_prefixes import SharedPrefixCache
from server.config import MiB, Settings
from server.core.chat import Chat
from server.core.context import ContextWindow
from server.core.prefixes import Prefixes
from server.core.workers import Workers
from server import tracing
from server.engines.base import Engine, EngineUnavailable, PromptRejected, Sampling, Usage
from server.engines.priority import BATCH, LiveTraffic, request_priority, standing_still_while_online
from server.errors import InputError
from server.metrics import Metrics
from server.model.onellm import OneLLM
from server.storage.records import MediaReferences


@dataclass
class Prepared:
    """A chat made ready for the engine: what was kept of the history, as embeddings."""

    embeddings: torch.Tensor  # [L, D]
    max_tokens: int
    modalities: list[str]
    affinity: str  # the same for every turn of the chat: see ChatService.affinity
    cache_salt: str | None = None  # the engine's cached prompt rows are shared only within it: see Prefixes.cache_salt
    media: list[str] = field(default_factory=list)  # the uuid of each attachment in the prompt, in order
    first_turn: int = 0  # the chat's turns before it did not fit the context
    messages_param: str = "messages"  # the chat's Chat.messages_param

    @property
    def prompt_tokens(self) -> int:
        return self.embeddings.shape[0]


@dataclass
class Generation:
    prepared: Prepared
    usage: Usage = field(default_factory=Usage)
    started: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    request_span: Span = field(default_factory=tracing.current_span)  # where its usage is told


class ChatService:
    """Chats -> answers, over the threads that work off the loop (`workers`), what makes each
    attachment's prefix (`prefixes`), the model's context window and the engine, which is treated
    as down once it sends nothing for `stall_timeout_s` (for a batch line, not counting the time
    online requests are served, `live`: the engine may hold its steps for them)."""

    def __init__(self, model: OneLLM, engine: Engine, metrics: Metrics, workers: Workers, prefixes: Prefixes,
                 context: ContextWindow, stall_timeout_s: float | None = None, live: LiveTraffic | None = None):
        self.model = model
        self.engine = engine
        self.metrics = metrics
        self.workers = workers
        self.prefixes = prefixes
        self.context = context
        self.stall_timeout_s = stall_timeout_s
        self.live = live
        self.decoder_limits = prefixes.decoder_limits  # uploads to the Files API are checked with them too

    async def off_loop(self, fn, *args):
        """`fn(*args)` in the decoding pool: the one bounded pool for all work on upload bytes."""
        return await self.workers.off_loop(fn, *args)

    def close(self) -> None:
        self.workers.close()

    async def prepare(self, chat: Chat, max_tokens: int | None, tenant: str = "-") -> Prepared:
        """`tenant`: whose media references the chat may use and make (its API key's tenant)."""
        start, ids, max_tokens = self.context.fit(chat, max_tokens)
        attachments = [a for t in chat.turns[start:] for a in t.attachments]
        keys = await all_or_none([self.prefixes.key(a, tenant) for a in attachments])
        prefixes = await all_or_none([self.prefixes.prefix(a, key) for a, key in zip(attachments, keys)])
        await self.prefixes.remember(tenant, attachments, keys)
        request_span = tracing.current_span()
        with tracing.span("prompt_assembly", {"onellm.attachments": len(attachments)}):
            # in a thread: on a GPU, assembly waits for the device (see OneLLM.embeddings)
            embeddings = await asyncio.to_thread(self._assemble, ids, [(a.modality, p) for a, p in
                                                                       zip(attachments, prefixes)], request_span)
        return Prepared(embeddings, max_tokens, [a.modality for a in attachments],
                        await self.affinity(chat, dict(zip(map(id, attachments), keys)), tenant),
                        self.prefixes.cache_salt(tenant), list(keys), start, chat.messages_param)

    def _assemble(self, ids: list[int], parts: list, request_span: Span) -> torch.Tensor:
        embeddings = self.model.embeddings(ids, parts)  # [rows, dim]
        # read here, not on the loop: even a tensor's shape is a torch call there
        request_span.set_attribute("gen_ai.usage.input_tokens", embeddings.shape[0])
        return embeddings

    async def affinity(self, chat: Chat, known_keys: dict[int, str], tenant: str) -> str:
        """What every turn of a chat shares, whichever gateway serves it: its first user message,
        text and first attachment (by prefix key; `known_keys` are those already computed, by
        id). The engine routes on it, so that a chat's follow-ups reach the vLLM replica whose
        prefix cache holds the start of their prompt."""
        first = next(t for t in chat.turns if t.role == "user")  # check_turns makes sure of one
        key = ""
        if first.attachments:
            attachment = first.attachments[0]
            # the first message may have been dropped to fit the context
            key = known_keys.get(id(attachment))
            if key is None:
                try:
                    key = await self.prefixes.key(attachment, tenant)
                except InputError:  # a reference gone with its turn still routes its chat the same way
                    key = attachment.reference or ""
        return hashlib.sha256(f"{key}\0{first.text}".encode()).hexdigest()

    async def generate(self, generation: Generation, sampling: Sampling) -> AsyncIterator[str]:
        """Text deltas of one answer; fills `generation.usage` and the metrics as it goes. A hung
        stream would hold its client and its admission slot for good: stall_timeout_s ends it."""
        prepared = generation.prepared
        deltas = self.engine.stream(prepared.embeddings, sampling, generation.usage, prepared.affinity,
                                    prepared.cache_salt)
        # current only while the engine runs (within each anext), never across a yield to the caller
        engine_span = tracing.detached_span("engine", {"onellm.engine": self.engine.name})
        batch_line = request_priority.get() == BATCH and self.live is not None
        try:
            async with aclosing(deltas):
                while True:
                    try:
                        async with asyncio.timeout(self.stall_timeout_s) as stall:
                            with (standing_still_while_online(stall, self.live) if batch_line else nullcontext(),
                                  tracing.current(engine_span)):
                                delta = await anext(deltas)
                    except StopAsyncIteration:
                        break
                    except TimeoutError:
                        raise EngineUnavailable(f"the {self.engine.name} engine sent nothing for "
                                                f"{self.stall_timeout_s:g} s (stall_timeout_s)") from None
                    except PromptRejected as e:  # the engine's refusal, told to the client as its mistake
                        param = prepared.messages_param if e.param == "messages" else e.param
                        raise InputError(e.status, e.message, param, code=e.code) from None
                    if generation.first_token_at is None:
                        generation.first_token_at = time.monotonic()
                        self.metrics.ttft.observe(generation.first_token_at - generation.started)
                    yield delta
        except Exception as e:
            tracing.failed(engine_span, e)
            raise
        finally:
            engine_span.end()
            tracing.told_usage(generation.request_span, generation.usage.completion_tokens,
                               generation.usage.finish_reason)
        self.metrics.tokens_out.inc(generation.usage.completion_tokens)


async def all_or_none(coroutines: list[Awaitable]) -> list:
    """The results of `coroutines`, run at once. The first to fail cancels the others, and its
    error is raised once they have stopped: an attachment refused leaves no other decoding or
    encoding for a request that has already been answered."""
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(c) for c in coroutines]
    except BaseExceptionGroup as failed:
        raise failed.exceptions[0] from None
    return [task.result() for task in tasks]


def chat_service_for(settings: Settings, model: OneLLM, engine: Engine, metrics: Metrics,
                     shared_prefixes: SharedPrefixCache | None = None,
                     references: MediaReferences | None = None, live: LiveTraffic | None = None) -> ChatService:
    """The service as `settings` configure it; `shared_prefixes` and `references`: see Prefixes; `live`:
    the online requests being served, which batch lines' decoding and encoding wait for."""
    workers = Workers(model, metrics, settings.preprocess_workers, settings.encoder_max_batch,
                      settings.encoder_max_wait_ms, live)
    prefixes = Prefixes(model, metrics, workers, int(settings.prefix_cache_mb * MiB), settings.decoder_limits(),
                        shared_prefixes, references, settings.cache_scope)
    return ChatService(model, engine, metrics, workers, prefixes, ContextWindow(model, settings.default_max_tokens),
                       settings.stall_timeout_s, live)
