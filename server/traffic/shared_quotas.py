"""Per-caller quotas counted across every gateway in the shared Redis: a sliding window of request
starts for `per_minute`, and a semaphore of leases for `max_concurrent`.

Each request under a `max_concurrent` holds a lease, a member of the caller's sorted set scored by
the time it lapses (Redis's clock, so the gateways' own clocks do not matter). The gateway holding
it pushes that time on every lease_ttl_s/3 while the request runs; a gateway that dies stops doing
so and its leases lapse within lease_ttl_s, giving the caller's capacity back. Both checks and
both writes are one Lua script, so two gateways can never both take the last place.

While Redis does not answer, `admit` says so (None) and the caller decides with its own counts;
every renewal writes back the leases Redis lost (those of requests admitted meanwhile, or of a
Redis restarted empty or that evicted them), and one runs as soon as Redis answers again, so that
the cluster-wide count again holds every request running."""

import asyncio
import itertools
import logging
import uuid
from dataclasses import dataclass

from server.cache.redis_client import REDIS_ERRORS, SharedRedis
from server.metrics import Metrics

log = logging.getLogger("onellm.quotas")

MINUTE_MS = 60_000

# KEYS: the caller's leases, its starts in the window. ARGV: max_concurrent, per_minute (0: no
# limit), lease ttl ms, window ms, a member unique to this request.
# Returns {0, 0}: admitted; {1, 0}: at max_concurrent; {2, ms}: the window is full for ms more.
_ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local max_concurrent, per_minute = tonumber(ARGV[1]), tonumber(ARGV[2])
local ttl, window = tonumber(ARGV[3]), tonumber(ARGV[4])
if max_concurrent > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
  if redis.call('ZCARD', KEYS[1]) >= max_concurrent then return {1, 0} end
end
if per_minute > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - window)
  if redis.call('ZCARD', KEYS[2]) >= per_minute then
    local oldest = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
    return {2, tonumber(oldest[2]) + window - now}
  end
  redis.call('ZADD', KEYS[2], now, ARGV[5])
  redis.call('PEXPIRE', KEYS[2], window)
end
if max_concurrent > 0 then
  redis.call('ZADD', KEYS[1], now + ttl, ARGV[5])
  redis.call('PEXPIRE', KEYS[1], ttl)
end
return {0, 0}
"""

# KEYS: lease sets; ARGV[1]: ttl ms, ARGV[1 + i]: the lease in KEYS[i]. A lease that is gone (Redis
# restarted or evicted its set) is put back: its request still runs.
_RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
  redis.call('ZADD', key, now + ttl, ARGV[i + 1])
  redis.call('PEXPIRE', key, ttl)
end
return #KEYS
"""


@dataclass(frozen=True)
class Lease:
    key: str
    member: str


@dataclass(frozen=True)
class Verdict:
    """Redis's answer: `limit` None if admitted, else the limit reached and the seconds to wait."""

    limit: str | None
    wait_s: float = 0.0


def _leases_key(caller: str) -> str:
    return f"onellm:quota:leases:{caller}"


def _starts_key(caller: str) -> str:
    return f"onellm:quota:starts:{caller}"


class SharedQuotas:
    """The cluster-wide counts of callers' requests, in `redis`; their state is the `shared_quotas`
    metrics, which this registers on `metrics`."""

    def __init__(self, redis: SharedRedis, lease_ttl_s: float, metrics: Metrics, window_ms: int = MINUTE_MS):
        self.redis = redis
        self.ttl_ms = max(1, round(lease_ttl_s * 1000))
        self.window_ms = window_ms
        self._admit = redis.client.register_script(_ADMIT)
        self._renew = redis.client.register_script(_RENEW)
        self._gateway = uuid.uuid4().hex[:12]  # lease members of different gateways never meet
        self._numbers = itertools.count()
        self.held: set[Lease] = set()
        self._renewing: asyncio.Task | None = None
        # per renewal under way, the leases released meanwhile, which it may have put back
        self._released_during: list[list[Lease]] = []
        self._warned = False
        metrics.add_shared_quotas()
        metrics.shared_quotas_up.set_function(lambda: 1 if redis.up else 0)
        self.metrics = metrics
        redis.when_back(self._on_redis_back)

    async def admit(self, caller: str, max_concurrent: int, per_minute: int) -> tuple[Verdict | None, Lease | None]:
        """Redis's verdict on one more request of `caller` (None: Redis did not answer) and, under a
        `max_concurrent`, the lease the request holds until `release` unless Redis refused it
        (if Redis did not answer, the lease is held whatever the caller decides: it releases it)."""
        member = f"{self._gateway}:{next(self._numbers)}"
        lease = Lease(_leases_key(caller), member) if max_concurrent else None
        verdict = None
        if self.redis.up:
            try:
                code, wait_ms = await self._admit(keys=[_leases_key(caller), _starts_key(caller)],
                                                  args=[max_concurrent, per_minute, self.ttl_ms, self.window_ms, member])
            except REDIS_ERRORS as e:
                self.redis.failed("quota", e)
            else:
                verdict = Verdict((None, "key_max_concurrent", "key_requests_per_minute")[code], wait_ms / 1000)
        if verdict is None:
            self._fell_back()
        if lease is None or (verdict is not None and verdict.limit is not None):
            return verdict, None  # Redis took no lease for it
        self.held.add(lease)  # even if decided here: Redis is told of it once it answers again
        self._keep_renewing()
        return verdict, lease

    async def release(self, lease: Lease) -> None:
        self.held.discard(lease)
        for released in self._released_during:
            released.append(lease)
        # a lease Redis does not hear of lapses by itself within the ttl
        await self.redis.run("quota release", lambda: self.redis.client.zrem(lease.key, lease.member))

    async def close(self) -> None:
        if self._renewing is not None:
            self._renewing.cancel()

    def _fell_back(self) -> None:
        self.metrics.shared_quota_fallbacks.inc()
        if not self._warned:
            self._warned = True
            log.warning("cluster-wide quotas: the shared Redis (%s) does not answer; each gateway counts only its "
                        "own requests against the per-key limits until it does", self.redis.where)

    def _keep_renewing(self) -> None:
        if self._renewing is None or self._renewing.done():
            self._renewing = asyncio.create_task(self._renew_while_held())

    async def _renew_while_held(self) -> None:
        while self.held:
            await asyncio.sleep(self.ttl_ms / 3000)
            await self._push_on()

    async def _push_on(self) -> None:
        leases = list(self.held)
        if not leases or not self.redis.up:
            return
        released: list[Lease] = []
        self._released_during.append(released)
        try:
            await self.redis.run("quota renew", lambda: self._renew(
                keys=[lease.key for lease in leases], args=[self.ttl_ms, *(lease.member for lease in leases)]))
        finally:
            self._released_during.remove(released)
        if released:
            await self.redis.run("quota release", lambda: self._forget(released))

    async def _forget(self, leases: list[Lease]) -> None:
        pipe = self.redis.client.pipeline(transaction=False)
        for lease in leases:
            pipe.zrem(lease.key, lease.member)
        await pipe.execute()

    async def _on_redis_back(self) -> None:
        if self._warned:
            self._warned = False
            log.info("cluster-wide quotas: the shared Redis (%s) answers again; counting across gateways",
                     self.redis.where)
        await self._push_on()
