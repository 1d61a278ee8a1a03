"""The chat logic behind both endpoints: attachments -> prefixes -> prompt embeddings -> engine stream."""

import asyncio
import hashlib
import threading
import time
from collections.abc import AsyncIterator, Awaitable
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing
from dataclasses import dataclass, field

import torch

from server.model.batcher import EncoderBatcher
from server.metrics import Metrics
from server.cache.prefix_cache import PrefixCache, SharedRuns, prefix_key
from server.storage.records import MediaReferences, gone
from server.cache.shared_prefixes import SharedPrefixCache
from server.core.chat import Attachment, Chat
from server.engines.base import Engine, EngineUnavailable, PromptRejected, Sampling, Usage
from server.errors import Cancelled, InputError
from server.model.onellm import OneLLM
from server.config import DecoderLimits, Settings
from server.media.modalities import MODALITIES, preprocess
from server.media.modalities.base import Decoding


@dataclass
class Prepared:
    """A chat made ready for the engine: what was kept of the history, as embeddings."""

    embeddings: torch.Tensor  # [L, D]
    max_tokens: int
    modalities: list[str]
    affinity: str  # the same for every turn of the chat: see ChatService.affinity
    media: list[str] = field(default_factory=list)  # the uuid of each attachment in the prompt, in order
    first_turn: int = 0  # the chat's turns before it did not fit the context

    @property
    def prompt_tokens(self) -> int:
        return self.embeddings.shape[0]


@dataclass
class Generation:
    prepared: Prepared
    usage: Usage = field(default_factory=Usage)
    started: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None


class ChatService:
    def __init__(self, model: OneLLM, engine: Engine, metrics: Metrics, preprocess_workers: int,
                 prefix_cache_bytes: int, default_max_tokens: int, max_batch: int = 8, max_wait_ms: float = 1.0,
                 decoder_limits: DecoderLimits | None = None, stall_timeout_s: float | None = None,
                 shared_cache: SharedPrefixCache | None = None, references: MediaReferences | None = None):
        self.model = model
        self.engine = engine
        self.metrics = metrics
        self.default_max_tokens = default_max_tokens
        self.decoder_limits = decoder_limits or Settings().decoder_limits()
        self.stall_timeout_s = stall_timeout_s
        self.context = model.config["llm"]["max_positions"]
        self.block_rows = model.config["encoder"]["prefix_tokens"] + 2  # start tag, prefix, end tag
        self.cache = PrefixCache(prefix_cache_bytes)
        self.runs = SharedRuns()
        self.shared_cache = shared_cache  # other gateways' prefixes, behind the local cache
        self.references = references  # what media uuids stand for; None: references are refused
        # decoding runs in a pool so a large video never stalls other users' token streams;
        # the encoder has one thread of its own: torch already uses every core for one batch
        self._preprocess = ThreadPoolExecutor(preprocess_workers, thread_name_prefix="preprocess")
        self._encoder = ThreadPoolExecutor(1, thread_name_prefix="encoder")
        self.batcher = EncoderBatcher(model, self._encoder, max_batch, max_wait_ms / 1000, metrics)

    async def off_loop(self, fn, *args):
        """`fn(*args)` in the decoding pool: the one bounded pool for all work on upload bytes."""
        return await asyncio.get_running_loop().run_in_executor(self._preprocess, fn, *args)

    def close(self) -> None:
        self._preprocess.shutdown(wait=False, cancel_futures=True)
        self._encoder.shutdown(wait=False, cancel_futures=True)

    async def prefix_key(self, attachment: Attachment) -> str:
        # hashing a 64 MiB upload takes ~30 ms that every stream would wait out on the event loop
        return await self.off_loop(prefix_key, self.model.name, attachment.modality, attachment.files,
                                   attachment.options)

    async def attachment_key(self, attachment: Attachment, tenant: str) -> str:
        """The prefix key of an attachment: its bytes' hash, or what its reference stands for (which
        also settles its modality)."""
        if attachment.reference is None:
            return await self.prefix_key(attachment)
        part_field = MODALITIES[attachment.modality].fields[0]
        param = attachment.params.get(part_field, part_field)
        try:
            if self.references is None:
                raise gone(attachment.reference, param)
            modality, key = await self.references.resolve(tenant, attachment.reference, param)
        except InputError:
            self.metrics.media_references.labels("not_found").inc()
            raise
        if MODALITIES[modality].fields[0] != part_field:
            raise InputError(400, f"uuid '{attachment.reference}' is a '{modality}' attachment, sent here as "
                                  f"'{part_field}': refer to it in the part it came in", param)
        attachment.modality = modality
        return key

    async def prefix(self, attachment: Attachment, key: str) -> torch.Tensor:
        """One attachment -> its prefix [30, D] (`key`: its prefix_key), from the cache when the same
        bytes came before, or from the run already making it when they are arriving at the same time."""
        m = attachment.modality
        if m not in self.model.encoder.modalities:
            part = next(iter(attachment.files), None) or attachment.params.get(MODALITIES[m].fields[0], m)
            raise InputError(400, f"model '{self.model.name}' does not accept '{m}' inputs", part)
        if (cached := self.cache.get(key)) is not None:
            self.metrics.prefix_cache_hits.labels(m).inc()
            return cached
        if self.runs.running(key):
            self.metrics.prefix_shared_runs.labels(m).inc()
        try:
            return await self.runs.result(key, lambda: self._new_prefix(key, attachment))
        except InputError as e:  # a copy per request: each names the content part its own bytes came in
            raise InputError(e.status, e.message, attachment.params.get(e.param, e.param), e.headers, e.code) from None

    async def _new_prefix(self, key: str, attachment: Attachment) -> torch.Tensor:
        """Looked up in the shared cache within the run, so requests bringing the same new file at
        once ask Redis once."""
        m = attachment.modality
        if self.shared_cache and (shared := await self.shared_cache.get(key, m)) is not None:
            self.cache.put(key, shared)
            return shared
        if attachment.reference is not None:  # evicted since: only the bytes can make it again
            self.metrics.media_references.labels("not_found").inc()
            field_name = MODALITIES[m].fields[0]
            raise gone(attachment.reference, attachment.params.get(field_name, field_name))
        # asyncio cannot stop a decode that a pool thread has begun: the decoder checks `cancel`
        cancel = threading.Event()
        try:
            inputs = await self.off_loop(_preprocess, attachment, self.decoder_limits, cancel, self.metrics)
        except asyncio.CancelledError:
            cancel.set()
            raise
        prefix = await self.batcher.encode(m, inputs)
        self.metrics.encoder_runs.labels(m).inc()
        self.cache.put(key, prefix)
        if self.shared_cache:
            await self.shared_cache.put(key, prefix)
        return prefix

    def fit_context(self, chat: Chat, max_tokens: int | None) -> tuple[int, list[int], int]:
        """Drop the oldest turns until prompt + answer fit the context window, as OneLLM does.

        Returns (first kept turn, prompt ids, max_tokens). The current turn is never cut: when it
        alone leaves less room than max_tokens the answer gets what room there is, and when it
        leaves none, that is the client's error.
        """
        wanted = max_tokens or self.default_max_tokens
        starts = [i for i, t in enumerate(chat.turns) if t.role == "user"]
        for start in starts:
            turns = chat.turns[start:]
            ids = self.model.prompt_ids([(t.role, t.text) for t in turns], chat.system)
            length = len(ids) + self.block_rows * sum(len(t.attachments) for t in turns)
            room = self.context - length
            if room >= wanted or (start == starts[-1] and room >= 1):
                return start, ids, min(wanted, room)
        raise InputError(400, f"the current message needs {length} prompt tokens plus max_tokens={wanted}, "
                              f"more than the context window of {self.context} tokens", "messages")

    async def prepare(self, chat: Chat, max_tokens: int | None, tenant: str = "-") -> Prepared:
        """`tenant`: whose media references the chat may use and make (its API key's tenant)."""
        start, ids, max_tokens = self.fit_context(chat, max_tokens)
        attachments = [a for t in chat.turns[start:] for a in t.attachments]
        keys = await all_or_none([self.attachment_key(a, tenant) for a in attachments])
        prefixes = await all_or_none([self.prefix(a, key) for a, key in zip(attachments, keys)])
        self.metrics.media_references.labels("served").inc(sum(a.reference is not None for a in attachments))
        if self.references is not None:  # each use keeps a reference alive for another TTL
            for a, key in zip(attachments, keys):
                for uuid in {key, a.uuid or key, a.reference or key}:
                    await self.references.remember(tenant, uuid, a.modality, key)
        embeddings = self.model.embeddings(ids, [(a.modality, p) for a, p in zip(attachments, prefixes)])
        return Prepared(embeddings, max_tokens, [a.modality for a in attachments],
                        await self.affinity(chat, dict(zip(map(id, attachments), keys)), tenant), list(keys), start)

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
                    key = await self.attachment_key(attachment, tenant)
                except InputError:  # a reference gone with its turn still routes its chat the same way
                    key = attachment.reference or ""
        return hashlib.sha256(f"{key}\0{first.text}".encode()).hexdigest()

    async def generate(self, generation: Generation, sampling: Sampling) -> AsyncIterator[str]:
        """Text deltas of one answer; fills `generation.usage` and the metrics as it goes.

        An engine that sends nothing for `stall_timeout_s` is treated as down: a hung stream
        would hold its client and its admission slot for good."""
        prepared = generation.prepared
        deltas = self.engine.stream(prepared.embeddings, sampling, generation.usage, prepared.affinity)
        async with aclosing(deltas):
            while True:
                try:
                    async with asyncio.timeout(self.stall_timeout_s):
                        delta = await anext(deltas)
                except StopAsyncIteration:
                    break
                except TimeoutError:
                    raise EngineUnavailable(f"the {self.engine.name} engine sent nothing for "
                                            f"{self.stall_timeout_s:g} s (stall_timeout_s)") from None
                except PromptRejected as e:  # the engine's refusal, told to the client as its mistake
                    raise InputError(e.status, e.message, e.param, code=e.code) from None
                if generation.first_token_at is None:
                    generation.first_token_at = time.monotonic()
                    self.metrics.ttft.observe(generation.first_token_at - generation.started)
                yield delta
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


def _preprocess(attachment: Attachment, limits: DecoderLimits, cancel: threading.Event,
                metrics: Metrics) -> torch.Tensor:
    with metrics.preprocess_seconds.labels(attachment.modality).time(), metrics.decodes_running.track_inprogress():
        try:
            return preprocess_attachment(attachment, limits, cancel)
        except Cancelled:
            metrics.decodes_cancelled.labels(attachment.modality).inc()
            raise


def preprocess_attachment(attachment: Attachment, limits: DecoderLimits,
                          cancel: threading.Event | None = None) -> torch.Tensor:
    """Decode one attachment with the gateway's decoder `limits` and its request's options."""
    return preprocess(attachment.modality, attachment.files, Decoding(limits, cancel, **attachment.options))
