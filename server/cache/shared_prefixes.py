"""Attachment prefixes kept in Redis too, so that a chat's next turn landing on another gateway skips
decode and encoder there.

Redis helps and is never needed: an error, or a reply slower than the timeout, turns it off for this
gateway with one warning; requests go on with the local cache alone, and a probe turns Redis back on
once it answers again. What is read back is checked against the shape and dtype this model makes:
a value that is not one is a miss, never a failed request."""

import asyncio
import logging
import math
import struct
from collections.abc import Callable, Coroutine

import redis.asyncio as redis
import torch
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as ClosedConnection, RedisError

from server.metrics import Metrics
from server.model.onellm import OneLLM

log = logging.getLogger("onellm.shared_cache")

MAGIC = b"OLP1"
HEADER = struct.Struct("<4sBB")  # magic, dtype code, number of dims; the dims follow as uint32
DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # a dtype's code is its index here
RECHECK_S = 1.0  # while Redis is off, how often it is asked whether it is back


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    """A header naming dtype and shape, then the raw elements in C order (little-endian, as torch on
    every platform we serve on)."""
    tensor = tensor.detach().to("cpu").contiguous()
    header = HEADER.pack(MAGIC, DTYPES.index(tensor.dtype), tensor.dim()) + struct.pack(f"<{tensor.dim()}I", *tensor.shape)
    return header + tensor.reshape(-1).view(torch.uint8).numpy().tobytes()


def tensor_from_bytes(data: bytes, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor | None:
    """The tensor in `data` when it is one of `shape` and `dtype` with finite values, else None."""
    if len(data) < HEADER.size:
        return None
    magic, code, ndim = HEADER.unpack_from(data)
    if magic != MAGIC or code >= len(DTYPES) or DTYPES[code] != dtype or ndim != len(shape):
        return None
    start = HEADER.size + 4 * ndim
    if len(data) < start or struct.unpack_from(f"<{ndim}I", data, HEADER.size) != tuple(shape):
        return None
    if len(data) - start != math.prod(shape) * dtype.itemsize:
        return None
    tensor = torch.frombuffer(bytearray(memoryview(data)[start:]), dtype=dtype).reshape(shape)
    # the encoder never makes inf or NaN; a value holding them was not written by a gateway
    return tensor if bool(torch.isfinite(tensor).all()) else None


class SharedPrefixCache:
    """Prefixes of one model in Redis under `namespace`, each of `shape` and `dtype`, kept `ttl_s`."""

    def __init__(self, url: str, namespace: str, shape: tuple[int, ...], dtype: torch.dtype, ttl_s: int,
                 timeout_s: float, metrics: Metrics):
        # one retry on a closed connection, which is what a pooled one is after Redis restarted; none
        # on a timeout, which would be one more for the request to wait out
        self.client = redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                     retry=Retry(NoBackoff(), 1, supported_errors=(ClosedConnection,)))
        kwargs = self.client.connection_pool.connection_kwargs
        self.where = f"{kwargs.get('host', kwargs.get('path'))}:{kwargs.get('port', '')}/{kwargs.get('db', 0)}"  # no password
        self.namespace = namespace
        self.shape = shape
        self.dtype = dtype
        self.ttl_s = ttl_s
        self.metrics = metrics
        self.up = False
        self._probe: asyncio.Task | None = None
        self._on_back: list[Callable[[], Coroutine]] = []
        self._catching_up: asyncio.Task | None = None

    async def start(self) -> None:
        try:
            await self.client.ping()
        except (RedisError, OSError) as e:
            self._off("ping", e)
        else:
            self._on()

    async def close(self) -> None:
        for task in (self._probe, self._catching_up):
            if task is not None:
                task.cancel()
        await self.client.aclose()

    async def get(self, key: str, modality: str) -> torch.Tensor | None:
        if not self.up:
            return None
        try:
            data = await self.client.get(self.namespace + key)
        except (RedisError, OSError) as e:
            self._off("get", e)
            return None
        if data is None:
            return None
        prefix = tensor_from_bytes(data, self.shape, self.dtype)
        if prefix is None:  # the prefix made next replaces it, so each bad value is logged about once
            self.metrics.shared_cache_errors.labels("invalid_value").inc()
            log.warning("the shared prefix cache holds a value that is not a %s %s prefix (%d bytes); "
                        "encoding the attachment instead", list(self.shape), self.dtype, len(data))
            return None
        self.metrics.shared_cache_hits.labels(modality).inc()
        return prefix

    async def put(self, key: str, prefix: torch.Tensor) -> None:
        if not self.up:
            return
        try:
            await self.client.set(self.namespace + key, tensor_bytes(prefix), ex=self.ttl_s)
        except (RedisError, OSError) as e:
            self._off("set", e)

    async def get_value(self, name: str) -> tuple[bool, bytes | None]:
        """A small record of another kind (media references, stored responses) under this cache's
        Redis: (whether Redis answered, the value)."""
        if not self.up:
            return False, None
        try:
            return True, await self.client.get(name)
        except (RedisError, OSError) as e:
            self._off("get", e)
            return False, None

    async def set_value(self, name: str, value: bytes, ttl_s: int) -> bool:
        """Whether Redis took the write."""
        return await self._write("set", lambda: self.client.set(name, value, ex=ttl_s))

    async def delete_value(self, name: str) -> bool:
        return await self._write("delete", lambda: self.client.delete(name))

    async def _write(self, operation: str, command: Callable[[], Coroutine]) -> bool:
        if not self.up:
            return False
        try:
            await command()
        except (RedisError, OSError) as e:
            self._off(operation, e)
            return False
        return True

    def when_back(self, callback: Callable[[], Coroutine]) -> None:
        """`callback()` runs each time Redis answers again after an outage."""
        self._on_back.append(callback)

    def _on(self) -> None:
        self.up = True
        self.metrics.shared_cache_up.set(1)

    def _off(self, operation: str, error: Exception) -> None:
        self.metrics.shared_cache_errors.labels(operation).inc()
        if self.up or self._probe is None:  # the first failure only: the others are the same outage
            log.warning("the shared prefix cache (redis %s) failed on %s: %s: %s; serving from the local "
                        "cache until it answers again", self.where, operation, type(error).__name__, error)
        self.up = False
        self.metrics.shared_cache_up.set(0)
        if self._probe is None or self._probe.done():
            self._probe = asyncio.create_task(self._until_back())

    async def _until_back(self) -> None:
        while True:
            await asyncio.sleep(RECHECK_S)
            try:
                await self.client.ping()
            except (RedisError, OSError):
                continue
            log.info("the shared prefix cache (redis %s) answers again", self.where)
            self._on()
            # in a task of its own: a write that fails now must find this probe done, to start the next
            self._catching_up = asyncio.create_task(self._back())
            return

    async def _back(self) -> None:
        for callback in self._on_back:
            await callback()


def shared_cache_for(url: str, model: OneLLM, ttl_s: int, timeout_s: float, metrics: Metrics) -> SharedPrefixCache:
    """The shared cache of `model`'s prefixes: [prefix_tokens, D] in the dtype its encoder runs in."""
    dtype_name = str(model.dtype).removeprefix("torch.")
    shape = (model.config["encoder"]["prefix_tokens"], model.config["llm"]["dim"])
    metrics.add_shared_cache()
    return SharedPrefixCache(url, f"onellm:prefix:{model.name}:{dtype_name}:", shape, model.dtype, ttl_s,
                             timeout_s, metrics)
