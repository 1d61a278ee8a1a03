"""Each vLLM replica's own account of its load, read from its Prometheus `/metrics` at a short
interval and handed to the Router (server/engines/routing.py).

vLLM exports `vllm:num_requests_waiting`, `vllm:num_requests_running` and
`vllm:kv_cache_usage_perc` (a share, 0 to 1; `vllm:gpu_cache_usage_perc` before vLLM 0.10), one
sample per engine of a data-parallel server: requests are summed over them, KV usage is their
highest. The body is parsed with prometheus_client's text parser and read up to a bound, since a
replica is a server we talk to, not one we control. A replica whose scrape fails keeps its last
report for `stale_after_s`, so that one slow answer does not throw the measure away, and then
counts as unknown: the Router falls back to this gateway's own requests in flight there.
"""

import asyncio
import logging
import math
import time
from collections.abc import Sequence

import httpx
from prometheus_client.parser import text_string_to_metric_families

from server.engines.base import BackendMetrics
from server.engines.routing import ReplicaLoad, Router

log = logging.getLogger("onellm.replica_load")

WAITING = "vllm:num_requests_waiting"
RUNNING = "vllm:num_requests_running"
KV_USAGE = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")
MEASURES = ("waiting", "running", "kv_cache_usage")
# vLLM's /metrics is ~50-100 KiB with its histograms; a body past this is not a vLLM's
MAX_METRICS_BYTES = 4 << 20


class ScrapeFailed(Exception):
    """A replica's /metrics could not be read or did not hold its load."""


def parse_load(text: str) -> ReplicaLoad:
    """The load in a Prometheus text exposition of a vLLM server."""
    samples: dict[str, list[float]] = {}
    try:
        for family in text_string_to_metric_families(text):
            if family.name in (WAITING, RUNNING, *KV_USAGE):
                samples.setdefault(family.name, []).extend(sample.value for sample in family.samples)
    except ValueError as error:
        raise ScrapeFailed(f"unreadable metrics: {error}") from error
    kv = next((samples[name] for name in KV_USAGE if samples.get(name)), None)
    if not samples.get(WAITING) or not samples.get(RUNNING) or kv is None:
        raise ScrapeFailed(f"the metrics lack {WAITING}, {RUNNING} or {KV_USAGE[0]}")
    values = [*samples[WAITING], *samples[RUNNING], *kv]
    if not all(math.isfinite(value) and value >= 0 for value in values):
        raise ScrapeFailed("a load metric is negative or not a number")
    return ReplicaLoad(waiting=sum(samples[WAITING]), running=sum(samples[RUNNING]), kv_usage=max(kv))


async def read_load(client: httpx.AsyncClient, url: str, max_bytes: int = MAX_METRICS_BYTES) -> ReplicaLoad:
    """GET `url`/metrics, at most `max_bytes` of it, and its load."""
    try:
        async with client.stream("GET", f"{url}/metrics") as response:
            if response.status_code != 200:
                raise ScrapeFailed(f"/metrics answered {response.status_code}")
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > max_bytes:
                    raise ScrapeFailed(f"/metrics is larger than {max_bytes} bytes")
    except httpx.HTTPError as error:
        raise ScrapeFailed(f"/metrics: {error!r}") from error
    return parse_load(body.decode("utf-8", errors="replace"))


class LoadScraper:
    """Reads every replica's load every `interval_s` into `router` and the gateway's gauges."""

    def __init__(self, urls: Sequence[str], router: Router, metrics: BackendMetrics, interval_s: float,
                 timeout_s: float = 2.0, stale_after_s: float | None = None,
                 transport: httpx.AsyncBaseTransport | None = None):
        self.urls = tuple(urls)
        self.router = router
        self.metrics = metrics
        self.interval_s = interval_s
        # three missed scrapes: a replica busy enough to answer late is the one to keep measuring
        self.stale_after_s = stale_after_s if stale_after_s is not None else 3 * interval_s
        self._client = httpx.AsyncClient(timeout=min(timeout_s, interval_s * 2), transport=transport,
                                         limits=httpx.Limits(max_connections=len(self.urls)))
        self._last_read = dict.fromkeys(self.urls, -math.inf)
        self._known: set[str] = set()
        for url in self.urls:
            self._show(url, None)

    def _show(self, url: str, load: ReplicaLoad | None) -> None:
        values = (load.waiting, load.running, load.kv_usage) if load else (math.nan,) * 3
        for measure, value in zip(MEASURES, values):
            self.metrics.backend_reported_load.labels(url, measure).set(value)

    async def scrape(self, url: str) -> None:
        try:
            load = await read_load(self._client, url)
        except ScrapeFailed as error:
            self.metrics.backend_load_scrape_failures.labels(url).inc()
            if time.monotonic() - self._last_read[url] > self.stale_after_s:
                if url in self._known:
                    log.warning("the load of vLLM backend %s is unknown until it is read again: %s", url, error)
                    self._known.discard(url)
                self.router.report(url, None)
                self._show(url, None)
            return
        self._last_read[url] = time.monotonic()
        self._known.add(url)
        self.router.report(url, load)
        self._show(url, load)

    async def run(self) -> None:
        while True:
            try:
                await asyncio.gather(*(self.scrape(url) for url in self.urls))
            except Exception:  # noqa: BLE001 - the loop must outlive any one bad read
                log.exception("reading the vLLM backends' load failed")
            await asyncio.sleep(self.interval_s)

    async def close(self) -> None:
        await self._client.aclose()
