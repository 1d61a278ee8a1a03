"""Batches in the Redis that keeps the files (files_url), shared by every gateway using it.

Keys under the namespace: batch:<id> (the batch with its tenant), ids (every batch id, scored by
creation time), results:<id> (a hash: custom_id -> its output line, each written once with HSETNX,
so that a line answered again after a takeover is still one line of output), cancel:<id> (asked to
cancel, when) and lease:<id> (the instance token of the gateway running the batch, host:pid:random,
lapsing after `lease_ttl_s` unless renewed). Only the lease's holder writes the batch and its
results: a gateway that lost its lease (it stalled past the TTL and another took the batch over)
gets `LeaseLost` instead of overwriting the new runner's progress, or writing results that the
batch, once ended, has already put in its output file (and deleted here)."""

from __future__ import annotations  # `list` below is a method: annotations must not be evaluated in the class

import json
import os
import secrets
import socket
import time

from server.cache.redis_client import connect
from server.storage.batch_records import LeaseLost, decode_batch, encode_batch, plain_batch_id, results_by_custom_id
from server.storage.file_records import unavailable_as_503

# KEYS: batch, ids, lease. ARGV: the encoded batch, its id, its creation time, this gateway's token
_SAVE = """
if redis.call('GET', KEYS[3]) ~= ARGV[4] then return 0 end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[2])
return 1
"""
# KEYS: results, lease. ARGV: custom_id, the output line, this gateway's token
_ADD_RESULT = """
if redis.call('GET', KEYS[2]) ~= ARGV[3] then return 0 end
redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2])
return 1
"""
# KEYS: lease. ARGV: token, ttl ms. Pushes the lease's end on only while it is still this gateway's
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class RedisBatchStore:
    shared = True  # several gateways run batches from it, each under a lease

    def __init__(self, url: str, lease_ttl_s: float, timeout_s: float = 10.0, namespace: str = "onellm:batches:"):
        self.client = connect(url, timeout_s)
        self.ns = namespace
        self.lease_ttl_s = lease_ttl_s
        # this gateway's instance, as its leases name it: which one runs a batch is one GET away
        self.token = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(8)}"
        self._save = self.client.register_script(_SAVE)
        self._add_result = self.client.register_script(_ADD_RESULT)
        self._renew = self.client.register_script(_RENEW)
        self._release = self.client.register_script(_RELEASE)

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        await self.client.aclose()

    async def save(self, tenant: str, batch: dict) -> None:
        batch_id = batch["id"]
        keys = [f"{self.ns}batch:{batch_id}", f"{self.ns}ids", f"{self.ns}lease:{batch_id}"]
        async with unavailable_as_503():
            saved = await self._save(keys, [encode_batch(tenant, batch), batch_id, batch["created_at"], self.token])
        if not saved:
            raise LeaseLost(batch_id)

    async def get(self, tenant: str, batch_id: str) -> dict | None:
        if not plain_batch_id(batch_id):
            return None
        async with unavailable_as_503():
            found = decode_batch(await self.client.get(f"{self.ns}batch:{batch_id}"))
        return found[1] if found is not None and found[0] == tenant else None

    async def list(self, tenant: str) -> list[dict]:
        return [batch for owner, batch in await self.all() if owner == tenant]

    async def all(self) -> list[tuple[str, dict]]:
        """(tenant, batch) of every batch stored, every key's."""
        async with unavailable_as_503():
            ids = [i.decode() for i in await self.client.zrange(f"{self.ns}ids", 0, -1)]
            raws = await self.client.mget([f"{self.ns}batch:{i}" for i in ids]) if ids else []
        return [found for found in map(decode_batch, raws) if found is not None]

    async def add_result(self, batch_id: str, result: dict) -> None:
        keys = [f"{self.ns}results:{batch_id}", f"{self.ns}lease:{batch_id}"]
        async with unavailable_as_503():
            added = await self._add_result(keys, [result["custom_id"], json.dumps(result), self.token])
        if not added:
            raise LeaseLost(batch_id)

    async def results(self, batch_id: str) -> dict[str, dict]:
        async with unavailable_as_503():
            return results_by_custom_id(await self.client.hvals(f"{self.ns}results:{batch_id}"))

    async def forget_progress(self, batch_id: str) -> None:
        async with unavailable_as_503():
            await self.client.delete(f"{self.ns}results:{batch_id}", f"{self.ns}cancel:{batch_id}")

    async def cancel(self, batch_id: str) -> None:
        async with unavailable_as_503():
            await self.client.set(f"{self.ns}cancel:{batch_id}", int(time.time()), nx=True)

    async def cancelled_at(self, batch_id: str) -> int | None:
        async with unavailable_as_503():
            raw = await self.client.get(f"{self.ns}cancel:{batch_id}")
        return int(raw) if raw is not None else None

    async def claim(self, batch_id: str) -> bool:
        """Whether this gateway now runs the batch: no other holds its lease."""
        async with unavailable_as_503():
            return bool(await self.client.set(f"{self.ns}lease:{batch_id}", self.token, nx=True,
                                              px=int(self.lease_ttl_s * 1000)))

    async def renew(self, batch_id: str) -> bool:
        """Whether the lease is still this gateway's (and now lasts another `lease_ttl_s`)."""
        async with unavailable_as_503():
            return bool(await self._renew([f"{self.ns}lease:{batch_id}"], [self.token, int(self.lease_ttl_s * 1000)]))

    async def release(self, batch_id: str) -> None:
        async with unavailable_as_503():
            await self._release([f"{self.ns}lease:{batch_id}"], [self.token])
