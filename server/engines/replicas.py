"""The engine over several vLLM servers: one VLLMEngine per URL, chosen per request by the Router.

Health comes from two sources: a background probe of every backend's `/health`, and the
failures requests run into. A backend that fails is taken out at once; the probe brings it back
once it answers again. Load comes from each backend's own /metrics, read at a short interval
(server/engines/replica_load.py). A request that fails before any text reached the caller is
sent once more, to another backend; one that already streamed text fails as a whole, since two
backends' halves of an answer are not one answer.
"""

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing

import torch

from server.engines.base import BackendMetrics, EngineUnavailable, Sampling, Usage
from server.engines.replica_load import LoadScraper
from server.engines.routing import Router
from server.engines.vllm import VLLMEngine

log = logging.getLogger("onellm.replicas")


class ReplicatedVLLMEngine:
    """Streams from whichever of `urls` the routing `policy` picks (see Router)."""

    name = "vllm"

    def __init__(self, urls: Sequence[str], metrics: BackendMetrics, policy: str = "affinity",
                 probe_interval_s: float = 2.0, dtype: torch.dtype = torch.float32, load_interval_s: float = 0.0,
                 kv_threshold: float = 0.9, **engine_options):
        """`engine_options` go to each VLLMEngine (timeouts, a transport). `load_interval_s` > 0
        reads each backend's /metrics that often for the Router's load bound; 0 leaves the bound
        on this gateway's own requests in flight."""
        self.backends = {url: VLLMEngine(url, dtype=dtype, **engine_options)
                         for url in dict.fromkeys(url.rstrip("/") for url in urls)}
        self.router = Router(list(self.backends), policy, kv_threshold=kv_threshold)
        self._load = (LoadScraper(list(self.backends), self.router, metrics, load_interval_s,
                                  transport=engine_options.get("transport")) if load_interval_s > 0 else None)
        self._load_loop: asyncio.Task | None = None
        self.metrics = metrics
        self.probe_interval_s = probe_interval_s
        # nothing is known of a backend before its first probe, which the first request or
        # readiness check waits for
        for url in self.backends:
            self.router.mark_down(url)
            metrics.backend_healthy.labels(url).set(0)
            # every series exists from the start, so that rates and alerts see each backend at 0
            for family in (metrics.backend_requests, metrics.backend_failures, metrics.backend_in_flight):
                family.labels(url)
        self._probe_loop: asyncio.Task | None = None
        self._probe: asyncio.Task | None = None  # the probe of every backend under way, shared by its waiters
        self._closed = False

    # --- health -----------------------------------------------------------------------

    def _set_health(self, url: str, up: bool) -> None:
        if up != self.router.healthy(url):
            if up:
                log.info("vLLM backend %s is answering again", url)
            else:
                log.warning("vLLM backend %s is down", url)
        (self.router.mark_up if up else self.router.mark_down)(url)
        self.metrics.backend_healthy.labels(url).set(int(up))

    async def _probe_all(self) -> bool:
        answers = await asyncio.gather(*(engine.ready() for engine in self.backends.values()))
        for url, up in zip(self.backends, answers):
            self._set_health(url, up)
        return any(answers)

    async def probe(self) -> bool:
        """Asks every backend's /health now; True when one answers. Callers that arrive while a
        probe is under way wait for that one rather than starting another."""
        if self._probe is None or self._probe.done():
            self._probe = asyncio.ensure_future(self._probe_all())
        # shielded: one waiter leaving (a client gone) must not cancel the others' probe
        return await asyncio.shield(self._probe)

    async def _probe_forever(self) -> None:
        while True:
            try:
                await self.probe()
            except Exception:  # noqa: BLE001 - the loop must outlive any one bad probe
                log.exception("probing the vLLM backends failed")
            await asyncio.sleep(self.probe_interval_s)

    def _start_probing(self) -> None:
        """The background probes start with start() or the first use, on the loop that serves."""
        if self._probe_loop is None and not self._closed:
            self._probe_loop = asyncio.create_task(self._probe_forever(), name="vllm-health-probe")
            if self._load is not None:
                self._load_loop = asyncio.create_task(self._load.run(), name="vllm-load-scrape")

    async def start(self) -> None:
        self._start_probing()

    def _any_healthy(self) -> bool:
        return any(self.router.healthy(url) for url in self.backends)

    async def ready(self) -> bool:
        self._start_probing()
        # while none is known to answer, ask them now: a backend back up is ready at once
        return self._any_healthy() or await self.probe()

    # --- requests ---------------------------------------------------------------------

    async def _pick(self, affinity: str | None, exclude: list[str]) -> str | None:
        backend = self.router.pick(affinity, exclude)
        if backend is None and any(not self.router.healthy(url) for url in self.backends if url not in exclude):
            await self.probe()
            backend = self.router.pick(affinity, exclude)
        return backend

    async def stream(self, embeddings: torch.Tensor, sampling: Sampling, usage: Usage | None = None,
                     affinity: str | None = None, cache_salt: str | None = None) -> AsyncIterator[str]:
        usage = usage if usage is not None else Usage()
        self._start_probing()
        tried: list[str] = []
        failure: EngineUnavailable | None = None
        while len(tried) < 2 and (backend := await self._pick(affinity, tried)) is not None:
            if tried:
                self.metrics.vllm_retries.inc()
                log.warning("sending the request again, to %s, after: %s", backend, failure)
                _reset(usage)
            tried.append(backend)
            streamed = False
            self._started(backend)
            try:
                async with aclosing(self.backends[backend].stream(embeddings, sampling, usage,
                                                                   cache_salt=cache_salt)) as deltas:
                    async for delta in deltas:
                        streamed = True
                        yield delta
                return
            except EngineUnavailable as error:
                self.metrics.backend_failures.labels(backend).inc()
                self._set_health(backend, False)
                if streamed:
                    raise
                failure = error
            finally:
                self._finished(backend)
        if failure is not None:
            raise failure
        raise EngineUnavailable(f"none of the {len(self.backends)} vLLM backends is answering")

    def _started(self, backend: str) -> None:
        self.router.started(backend)
        self.metrics.backend_requests.labels(backend).inc()
        self.metrics.backend_in_flight.labels(backend).inc()

    def _finished(self, backend: str) -> None:
        self.router.finished(backend)
        self.metrics.backend_in_flight.labels(backend).dec()

    async def close(self) -> None:
        self._closed = True
        tasks = [task for task in (self._probe_loop, self._probe, self._load_loop) if task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._load is not None:
            await self._load.close()
        await asyncio.gather(*(engine.close() for engine in self.backends.values()))


def _reset(usage: Usage) -> None:
    """Forget what a failed attempt recorded (token ids of deltas without text)."""
    usage.completion_tokens = 0
    usage.finish_reason = None
    usage.token_ids.clear()
