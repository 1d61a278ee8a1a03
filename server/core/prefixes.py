"""An attachment -> its prefix, the rows the encoder makes of it for the prompt.

Made once: a prefix comes from the local cache when the same bytes came before, from the run
already making it when they are arriving at the same time, from the shared cache when another
gateway made it, and only else from decoding and the encoder. Each tenant has prefixes of its own
unless the cache scope is `all`: the key of the same bytes differs between tenants. A media
reference (a uuid sent instead of the bytes) stands for the prefix key of the bytes that came with it."""

import asyncio
import hashlib
import threading

import torch

from server import tracing
from server.cache.prefix_cache import PrefixCache, SharedRuns, prefix_key
from server.cache.shared_prefixes import SharedPrefixCache
from server.core.chat import Attachment
from server.core.workers import Workers
from server.engines.priority import request_priority
from server.config import DecoderLimits
from server.errors import Cancelled, InputError
from server.media.modalities import MODALITIES, preprocess
from server.media.modalities.base import Decoding
from server.metrics import Metrics
from server.model.onellm import OneLLM
from server.storage.records import MediaReferences, gone


class Prefixes:
    """`cache_bytes` of prefixes held locally; `shared`: other gateways' prefixes, behind the local
    cache; `references`: what media uuids stand for (None: references are refused); `scope`:
    whose requests share prefixes, each tenant's own (`tenant`) or everyone's (`all`)."""

    def __init__(self, model: OneLLM, metrics: Metrics, workers: Workers, cache_bytes: int, decoder_limits: DecoderLimits,
                 shared: SharedPrefixCache | None = None, references: MediaReferences | None = None,
                 scope: str = "tenant"):
        self.model = model
        self.metrics = metrics
        self.workers = workers
        self.decoder_limits = decoder_limits  # passed to every modality's preprocess
        self.cache = PrefixCache(cache_bytes)
        self.runs = SharedRuns()
        self.shared = shared
        self.references = references
        self.scope = scope

    def cache_salt(self, tenant: str) -> str | None:
        """What sets `tenant`'s cached prefixes and prompt rows apart from other tenants' (None:
        shared by all): a hash, so that an engine is never told the tenant id itself."""
        if self.scope == "all":
            return None
        return hashlib.sha256(f"onellm-cache\0{tenant}".encode()).hexdigest()

    async def key(self, attachment: Attachment, tenant: str) -> str:
        """The prefix key of an attachment: its bytes' hash, or what its reference stands for (which
        also settles its modality). `tenant`: whose references it may use."""
        if attachment.reference is None:
            # hashing a 64 MiB upload takes ~30 ms that every stream would wait out on the event loop
            return await self.workers.off_loop(prefix_key, self.model.name, attachment.modality, attachment.files,
                                               attachment.options, self.cache_salt(tenant))
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
        """One attachment -> its prefix [30, D] (`key`: its prefix key)."""
        with tracing.span("attachment", {"onellm.modality": attachment.modality}):
            return await self._prefix(attachment, key)

    async def _prefix(self, attachment: Attachment, key: str) -> torch.Tensor:
        m = attachment.modality
        if m not in self.model.encoder.modalities:
            part = next(iter(attachment.files), None) or attachment.params.get(MODALITIES[m].fields[0], m)
            raise InputError(400, f"model '{self.model.name}' does not accept '{m}' inputs", part)
        with tracing.span("prefix_cache.local", {"onellm.modality": m}) as lookup:
            cached = self.cache.get(key)
            lookup.set_attribute("onellm.cache.hit", cached is not None)
        if cached is not None:
            self.metrics.prefix_cache_hits.labels(m).inc()
            return cached
        # a run is shared by requests of one priority: a batch line's run waits for the online
        # requests being served, so one of them waiting for it would wait for itself
        run = (key, request_priority.get())
        if self.runs.running(run):
            self.metrics.prefix_shared_runs.labels(m).inc()
        try:
            return await self.runs.result(run, lambda: self._new_prefix(key, attachment))
        except InputError as e:  # a copy per request: each names the content part its own bytes came in
            raise InputError(e.status, e.message, attachment.params.get(e.param, e.param), e.headers, e.code) from None

    async def _new_prefix(self, key: str, attachment: Attachment) -> torch.Tensor:
        """Looked up in the shared cache within the run, so requests bringing the same new file at
        once ask Redis once."""
        m = attachment.modality
        if self.shared:
            with tracing.span("prefix_cache.redis", {"onellm.modality": m}) as lookup:
                shared = await self.shared.get(key, m)
                lookup.set_attribute("onellm.cache.hit", shared is not None)
            if shared is not None:
                self.cache.put(key, shared)
                return shared
        if attachment.reference is not None:  # evicted since: only the bytes can make it again
            self.metrics.media_references.labels("not_found").inc()
            field_name = MODALITIES[m].fields[0]
            raise gone(attachment.reference, attachment.params.get(field_name, field_name))
        # asyncio cannot stop a decode that a pool thread has begun: the decoder checks `cancel`
        cancel = threading.Event()
        try:
            with tracing.span("decode", {"onellm.modality": m}):
                inputs = await self.workers.off_loop(_preprocess, attachment, self.decoder_limits, cancel,
                                                     self.metrics)
        except asyncio.CancelledError:
            cancel.set()
            raise
        prefix = await self.workers.encode(m, inputs)
        self.metrics.encoder_runs.labels(m).inc()
        self.cache.put(key, prefix)
        if self.shared:
            await self.shared.put(key, prefix)
        return prefix

    async def remember(self, tenant: str, attachments: list[Attachment], keys: list[str]) -> None:
        """After a chat's attachments were served: each of their uuids (the gateway's, the client's,
        the reference it came by) stands for its prefix key for another TTL."""
        self.metrics.media_references.labels("served").inc(sum(a.reference is not None for a in attachments))
        if self.references is None:
            return
        for a, key in zip(attachments, keys):
            for uuid in {key, a.uuid or key, a.reference or key}:
                await self.references.remember(tenant, uuid, a.modality, key)


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
