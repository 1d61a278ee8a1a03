"""Per-caller quotas: chat requests at once and a minute for each API key (without keys, each
client address), answered 429 with Retry-After before the body is read. File downloads count
among the requests at once (each may hold a reader's connection for long), not among the minute's.

Each gateway counts alone unless it has a shared Redis (cache_url): then the counts are the
cluster's, in Redis (shared_quotas.py), and this gateway's own counts decide only while Redis does
not answer. Alone, the minute's quota is a token bucket (as nginx's limit_req and Envoy's local
rate limit): it holds `per_minute` requests and refills at per_minute/60 a second, so a caller may
burst up to its quota and then goes on at the steady rate; in Redis it is a sliding window (as
Envoy's global rate limit service): at most `per_minute` starts in any 60 seconds.
"""

import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from starlette.types import ASGIApp, Receive, Scope, Send

from server.traffic.access import ApiKey, caller_of, is_batch_line, metric_key, send_error
from server.traffic.routes import kind_of
from server.traffic.shared_quotas import SharedQuotas, Verdict
from server.metrics import Metrics
from server.errors import InputError

# buckets of callers gone quiet are full again, the same as no bucket: past this many they go
_PRUNE_AT = 4096


@dataclass(frozen=True)
class Quota:
    max_concurrent: int  # 0: no limit
    per_minute: int  # 0: no limit


class _Bucket:
    def __init__(self, capacity: int, now: float):
        self.capacity = capacity
        self.tokens = float(capacity)
        self.stamp = now

    def refill(self, now: float) -> None:
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.capacity / 60)
        self.stamp = now

    def take(self, now: float) -> float:
        """0 if a request may start now (and counts it), else the seconds until one may."""
        self.refill(now)
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) * 60 / self.capacity


class CallerQuotas:
    """ASGI middleware: each caller's requests at once and a minute, from `default` or its key's own;
    counted across the gateways while `shared()` gives the cluster's counts."""

    def __init__(self, app: ASGIApp, default: Quota, keys: tuple[ApiKey, ...], metrics: Metrics,
                 shared: Callable[[], SharedQuotas | None] = lambda: None):
        self.app = app
        self.default = default
        self.quotas = {key.fingerprint: Quota(
            default.max_concurrent if key.max_concurrent is None else key.max_concurrent,
            default.per_minute if key.per_minute is None else key.per_minute) for key in keys}
        self.metrics = metrics
        self.shared = shared
        self._active: Counter[str] = Counter()
        self._buckets: dict[str, _Bucket] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = kind_of(scope)
        if kind is None or is_batch_line(scope):  # the batch runner bounds its own lines
            return await self.app(scope, receive, send)
        caller = caller_of(scope)
        quota = self.quotas.get(caller, self.default)
        if kind != "chat":
            quota = Quota(quota.max_concurrent, 0)
        shared = self.shared() if quota.max_concurrent or quota.per_minute else None
        lease = None
        if shared is None:
            refusal = self._refusal(caller, quota)
        else:
            verdict, lease = await shared.admit(caller, quota.max_concurrent, quota.per_minute)
            refusal = self._refusal(caller, quota) if verdict is None else _cluster_refusal(verdict, quota)
        if refusal is not None:
            limit, error = refusal
            self.metrics.refusals.labels(limit, metric_key(scope)).inc()
            if lease is not None:
                await shared.release(lease)
            return await send_error(send, error, close=True)  # the body is left unread
        self._active[caller] += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self._active[caller] -= 1
            if not self._active[caller]:
                del self._active[caller]
            if lease is not None:
                await shared.release(lease)

    def _refusal(self, caller: str, quota: Quota) -> tuple[str, InputError] | None:
        if quota.max_concurrent and self._active[caller] >= quota.max_concurrent:
            return _too_many(quota, "")
        if quota.per_minute:
            now = time.monotonic()
            bucket = self._buckets.get(caller)
            if bucket is None or bucket.capacity != quota.per_minute:
                if len(self._buckets) >= _PRUNE_AT:
                    self._prune(now)
                bucket = self._buckets[caller] = _Bucket(quota.per_minute, now)
            wait = bucket.take(now)
            if wait:
                return _too_often(quota, wait, "")
        return None

    def _prune(self, now: float) -> None:
        for caller, bucket in list(self._buckets.items()):
            bucket.refill(now)
            if bucket.tokens >= bucket.capacity:
                del self._buckets[caller]


def _too_many(quota: Quota, where: str) -> tuple[str, InputError]:
    return "key_max_concurrent", InputError(
        429, f"this caller already has {quota.max_concurrent} requests in progress{where}, its limit "
             "(key_max_concurrent); retry when one has ended", headers={"Retry-After": "1"})


def _too_often(quota: Quota, wait_s: float, where: str) -> tuple[str, InputError]:
    return "key_requests_per_minute", InputError(
        429, f"this caller has used its {quota.per_minute} requests a minute{where} (key_requests_per_minute); "
             "retry later", headers={"Retry-After": str(max(1, math.ceil(wait_s)))})


def _cluster_refusal(verdict: Verdict, quota: Quota) -> tuple[str, InputError] | None:
    where = " across the gateways"
    if verdict.limit == "key_max_concurrent":
        return _too_many(quota, where)
    if verdict.limit == "key_requests_per_minute":
        return _too_often(quota, verdict.wait_s, where)
    return None
