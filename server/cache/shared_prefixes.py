"""Attachment prefixes kept in the shared Redis too, so that a chat's next turn landing on another
gateway skips decode and encoder there.

A Redis that is down or slow is a miss (see redis_client.SharedRedis). What is read back is checked
against the shape and dtype this model makes: a value that is not one is a miss, never a failed
request."""

import asyncio
import logging
import math
import struct

import torch

from server.cache.redis_client import SharedRedis
from server.metrics import Metrics
from server.model.onellm import OneLLM

log = logging.getLogger("onellm.shared_cache")

MAGIC = b"OLP1"
HEADER = struct.Struct("<4sBB")  # magic, dtype code, number of dims; the dims follow as uint32
DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # a dtype's code is its index here


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
    """Prefixes of one model in `redis` under `namespace`, each of `shape` and `dtype`, kept `ttl_s`.

    Tensors become bytes and back in a thread: on a GPU the copy to the CPU waits for the device's
    queued work, and checking a value read back reads every element."""

    def __init__(self, redis: SharedRedis, namespace: str, shape: tuple[int, ...], dtype: torch.dtype, ttl_s: int,
                 metrics: Metrics):
        self.redis = redis
        self.namespace = namespace
        self.shape = shape
        self.dtype = dtype
        self.ttl_s = ttl_s
        self.metrics = metrics

    async def get(self, key: str, modality: str) -> torch.Tensor | None:
        _, data = await self.redis.get(self.namespace + key)
        if data is None:
            return None
        prefix = await asyncio.to_thread(tensor_from_bytes, data, self.shape, self.dtype)
        if prefix is None:  # the prefix made next replaces it, so each bad value is logged about once
            self.metrics.shared_cache_errors.labels("invalid_value").inc()
            log.warning("the shared prefix cache holds a value that is not a %s %s prefix (%d bytes); "
                        "encoding the attachment instead", list(self.shape), self.dtype, len(data))
            return None
        self.metrics.shared_cache_hits.labels(modality).inc()
        return prefix

    async def put(self, key: str, prefix: torch.Tensor) -> None:
        if self.redis.up:  # else the bytes would be made for nothing
            await self.redis.set(self.namespace + key, await asyncio.to_thread(tensor_bytes, prefix), self.ttl_s)


def shared_cache_for(redis: SharedRedis, model: OneLLM, ttl_s: int) -> SharedPrefixCache:
    """The shared cache of `model`'s prefixes: [prefix_tokens, D] in the dtype its encoder runs in."""
    dtype_name = str(model.dtype).removeprefix("torch.")
    shape = (model.config["encoder"]["prefix_tokens"], model.config["llm"]["dim"])
    return SharedPrefixCache(redis, f"onellm:prefix:{model.name}:{dtype_name}:", shape, model.dtype, ttl_s,
                             redis.metrics)
