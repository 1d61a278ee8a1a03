"""The file store in Redis (files_url), which every gateway replica sharing that Redis sees."""

from __future__ import annotations  # `list` below is a method: annotations must not be evaluated in the class

import json
from collections.abc import AsyncIterator
from dataclasses import asdict

from server.cache.redis_client import connect
from server.errors import InputError, Unavailable
from server.storage.file_records import (PIECE_BYTES, StoredFile, new_record, stored_file_from_json, tenant_key,
                                         unavailable_as_503)

# Redis: blob:<sha> (bytes), refs:<sha> (set of file ids), meta:<tenant>:<id> (the record),
# list:<tenant> (ids by creation time). The blob and its refs live as long as the longest-lived
# record naming them; each script runs atomically, so two gateways never see half an upload.
_LINK = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('SADD', KEYS[2], ARGV[1])
local expires = math.max(tonumber(ARGV[2]), redis.call('EXPIRETIME', KEYS[1]))
redis.call('EXPIREAT', KEYS[1], expires)
redis.call('EXPIREAT', KEYS[2], expires)
redis.call('SET', KEYS[3], ARGV[3], 'EXAT', ARGV[2])
redis.call('ZADD', KEYS[4], ARGV[4], ARGV[1])
return 1
"""
_UNLINK = """
if redis.call('DEL', KEYS[3]) == 0 then return 0 end
redis.call('ZREM', KEYS[4], ARGV[1])
redis.call('SREM', KEYS[2], ARGV[1])
if redis.call('SCARD', KEYS[2]) == 0 then redis.call('DEL', KEYS[1], KEYS[2]) end
return 1
"""


class RedisFileStore:
    """The same files in Redis, for gateways that share them. Fine for a few GB; past that an
    object store (S3 and the like) is the place for the bytes."""

    name = "redis"

    def __init__(self, url: str, timeout_s: float = 10.0, namespace: str = "onellm:files:"):
        self.client = connect(url, timeout_s)
        self.ns = namespace
        self._link = self.client.register_script(_LINK)
        self._unlink = self.client.register_script(_UNLINK)

    async def start(self) -> None:
        pass  # Redis expires the records itself; a Redis that is down is a 503 per request, not a failed start

    async def close(self) -> None:
        await self.client.aclose()

    def _keys(self, tenant: str, record: StoredFile) -> list[str]:
        t = tenant_key(tenant)
        return [f"{self.ns}blob:{record.sha256}", f"{self.ns}refs:{record.sha256}", f"{self.ns}meta:{t}:{record.id}",
                f"{self.ns}list:{t}"]

    async def add(self, tenant: str, data: bytes, filename: str, purpose: str, ttl_s: int, kind: str) -> StoredFile:
        record = new_record(data, filename, purpose, ttl_s, kind)
        keys = self._keys(tenant, record)
        args = [record.id, record.expires_at, json.dumps(asdict(record)), record.uploaded_at]
        async with unavailable_as_503():
            # sent even when Redis holds these bytes already: skipping it would store them sooner,
            # telling the uploader that someone (another tenant too) had uploaded the same file
            await self.client.set(keys[0], data, exat=record.expires_at, nx=True)
            if not await self._link(keys, args):
                raise Unavailable("the file store lost the upload while storing it; retry", "file")
        return record

    async def get(self, tenant: str, file_id: str) -> StoredFile | None:
        async with unavailable_as_503():
            raw = await self.client.get(f"{self.ns}meta:{tenant_key(tenant)}:{file_id}")
        return stored_file_from_json(raw)

    async def content(self, tenant: str, file_id: str) -> tuple[StoredFile, bytes] | None:
        record = await self.get(tenant, file_id)
        if record is None:
            return None
        async with unavailable_as_503():
            data = await self.client.get(f"{self.ns}blob:{record.sha256}")
        return None if data is None else (record, data)

    async def stream(self, tenant: str, file_id: str) -> tuple[StoredFile, AsyncIterator[bytes]] | None:
        """The record and the bytes a range at a time."""
        record = await self.get(tenant, file_id)
        if record is None:
            return None
        blob = f"{self.ns}blob:{record.sha256}"
        async with unavailable_as_503():
            if not await self.client.exists(blob):
                return None
        return record, self._ranges(blob, record.bytes)

    async def _ranges(self, blob: str, size: int) -> AsyncIterator[bytes]:
        for start in range(0, size, PIECE_BYTES):
            async with unavailable_as_503():
                piece = await self.client.getrange(blob, start, start + PIECE_BYTES - 1)
            if not piece:  # the last record naming the bytes was deleted meanwhile
                raise InputError(404, "the file was deleted while it was being downloaded")
            yield piece

    async def list(self, tenant: str) -> list[StoredFile]:
        listing = f"{self.ns}list:{tenant_key(tenant)}"
        async with unavailable_as_503():
            ids = [i.decode() for i in await self.client.zrange(listing, 0, -1)]
            raws = await self.client.mget([f"{self.ns}meta:{tenant_key(tenant)}:{i}" for i in ids]) if ids else []
            gone = [i for i, raw in zip(ids, raws) if raw is None]  # expired: Redis dropped the record
            if gone:
                await self.client.zrem(listing, *gone)
        return [r for r in map(stored_file_from_json, raws) if r is not None]

    async def delete(self, tenant: str, file_id: str) -> bool:
        record = await self.get(tenant, file_id)
        if record is None:
            return False
        async with unavailable_as_503():
            return bool(await self._unlink(self._keys(tenant, record), [record.id]))
