"""The gateway's Redis: one way to connect for every store kept there, and the shared Redis that
the prefix cache, the media references, the stored responses and the cluster-wide quotas use.

That shared Redis helps and is never needed: an error, or a reply slower than the timeout, turns
it off for this gateway with one warning; callers go on with what they hold locally, and a probe
turns Redis back on once it answers again (and tells those that asked, see `when_back`)."""

import asyncio
import logging
from collections.abc import Callable, Coroutine

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as ClosedConnection, RedisError

from server.metrics import Metrics

log = logging.getLogger("onellm.shared_cache")

REDIS_ERRORS = (RedisError, OSError)  # what a Redis that is down, slow or restarting raises
RECHECK_S = 1.0  # while Redis is off, how often it is asked whether it is back


def connect(url: str, timeout_s: float) -> redis.Redis:
    """A client of the Redis at `url` whose every command gives up after `timeout_s`."""
    # one retry on a closed connection, which is what every pooled one is after Redis restarted
    # (else a failed request each); none on a timeout, which would be one more for the request to wait out
    return redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                          retry=Retry(NoBackoff(), 1, supported_errors=(ClosedConnection,)))


class SharedRedis:
    """The Redis at `url`, used while it answers within `timeout_s`; its state and failures are
    the `shared_cache` metrics, which this registers on `metrics`."""

    def __init__(self, url: str, timeout_s: float, metrics: Metrics):
        self.client = connect(url, timeout_s)
        kwargs = self.client.connection_pool.connection_kwargs
        self.where = f"{kwargs.get('host', kwargs.get('path'))}:{kwargs.get('port', '')}/{kwargs.get('db', 0)}"  # no password
        metrics.add_shared_cache()
        self.metrics = metrics
        self.up = False
        self._probe: asyncio.Task | None = None
        self._on_back: list[Callable[[], Coroutine]] = []
        self._catching_up: asyncio.Task | None = None

    async def start(self) -> None:
        """Asks whether Redis answers; one that does not is probed until it does, never a failed start."""
        try:
            await self.client.ping()
        except REDIS_ERRORS as e:
            self.failed("ping", e)
        else:
            self._on()

    async def close(self) -> None:
        for task in (self._probe, self._catching_up):
            if task is not None:
                task.cancel()
        await self.client.aclose()

    async def get(self, name: str) -> tuple[bool, bytes | None]:
        """(whether Redis answered, the value under `name`)."""
        if not self.up:
            return False, None
        try:
            return True, await self.client.get(name)
        except REDIS_ERRORS as e:
            self.failed("get", e)
            return False, None

    async def set(self, name: str, value: bytes, ttl_s: int) -> bool:
        """Whether Redis took the write."""
        return await self.run("set", lambda: self.client.set(name, value, ex=ttl_s))

    async def delete(self, name: str) -> bool:
        return await self.run("delete", lambda: self.client.delete(name))

    async def run(self, operation: str, command: Callable[[], Coroutine]) -> bool:
        """Whether `command()` ran: not while Redis is off, and a failure turns it off."""
        if not self.up:
            return False
        try:
            await command()
        except REDIS_ERRORS as e:
            self.failed(operation, e)
            return False
        return True

    def when_back(self, callback: Callable[[], Coroutine]) -> None:
        """`callback()` runs each time Redis answers again after an outage."""
        self._on_back.append(callback)

    def _on(self) -> None:
        self.up = True
        self.metrics.shared_cache_up.set(1)

    def failed(self, operation: str, error: Exception) -> None:
        """`operation` got `error` from Redis: it is off until it answers again."""
        self.metrics.shared_cache_errors.labels(operation).inc()
        if self.up or self._probe is None:  # the first failure only: the others are the same outage
            log.warning("the shared Redis (%s) failed on %s: %s: %s; this gateway goes on with its local "
                        "caches and counts until it answers again", self.where, operation, type(error).__name__, error)
        self.up = False
        self.metrics.shared_cache_up.set(0)
        if self._probe is None or self._probe.done():
            self._probe = asyncio.create_task(self._until_back())

    async def _until_back(self) -> None:
        while True:
            await asyncio.sleep(RECHECK_S)
            try:
                await self.client.ping()
            except REDIS_ERRORS:
                continue
            log.info("the shared Redis (%s) answers again", self.where)
            self._on()
            # in a task of its own: a write that fails now must find this probe done, to start the next
            self._catching_up = asyncio.create_task(self._back())
            return

    async def _back(self) -> None:
        for callback in self._on_back:
            await callback()
