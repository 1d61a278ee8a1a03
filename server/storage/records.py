"""Small records a gateway keeps for a while, each an API key's own: media references (a uuid ->
the attachment's prefix key) and stored responses (for `previous_response_id`).

A bounded local copy always; with a shared Redis configured (cache_url), Redis is where they are
looked up first, so that a chat's next turn finds them on any gateway, and the local copy is
what answers while Redis is down. A write or delete that Redis did not take (it was down, or
too slow) is kept locally as the newer truth and written to Redis once it answers again: an
outage neither loses a record stored during it nor brings back one deleted during it."""

import hashlib
import json
import math
import time
from collections import OrderedDict

from server.cache.redis_client import SharedRedis
from server.errors import InputError


class Records:
    """Values by (tenant, key); the local copy holds up to `capacity_bytes` of them, least recently
    used first out. A deletion Redis has not taken yet is held as a tombstone (value None)."""

    def __init__(self, namespace: str, capacity_bytes: int, ttl_s: int, shared: SharedRedis | None):
        self.namespace = namespace
        self.capacity = capacity_bytes
        self.ttl_s = ttl_s
        self.shared = shared
        self.local: OrderedDict[str, tuple[float, bytes | None]] = OrderedDict()  # name -> (expires at, value)
        self.size = 0  # bytes of names and values held locally
        self.unsynced: set[str] = set()  # names whose local entry is newer than Redis's
        if shared is not None:
            shared.when_back(self.write_back)

    def _name(self, tenant: str, key: str) -> str:
        # keys and uuids are the client's text: hashed, they are always a safe Redis key
        return self.namespace + hashlib.sha256(f"{tenant}\0{key}".encode()).hexdigest()

    async def get(self, tenant: str, key: str) -> bytes | None:
        name = self._name(tenant, key)
        if self.shared is not None and name not in self.unsynced:
            answered, value = await self.shared.get(name)
            if answered:  # Redis is the truth while it answers: a record deleted elsewhere is gone
                return value
        entry = self.local.get(name)
        if entry is None or entry[0] <= time.monotonic():
            self._drop(name)
            return None
        self.local.move_to_end(name)
        return entry[1]

    async def put(self, tenant: str, key: str, value: bytes) -> None:
        await self._write(self._name(tenant, key), value)

    async def delete(self, tenant: str, key: str) -> None:
        await self._write(self._name(tenant, key), None)

    async def _write(self, name: str, value: bytes | None) -> None:
        """Sets (None: deletes) the record locally, then in Redis; what Redis does not take stays
        unsynced, its tombstone too, until write_back."""
        self._drop(name)
        if value is not None or self.shared is not None:
            self._keep(name, value)
        if self.shared is None:
            return
        if value is None:
            written = await self.shared.delete(name)
        else:
            written = await self.shared.set(name, value, self.ttl_s)
        if not written and name in self.local:
            self.unsynced.add(name)
        elif value is None:
            self._drop(name)

    def _keep(self, name: str, value: bytes | None) -> None:
        held = len(name) + len(value or b"")
        if held > self.capacity:
            return
        self.local[name] = (time.monotonic() + self.ttl_s, value)
        self.size += held
        while self.size > self.capacity:
            self._drop(next(iter(self.local)))

    async def write_back(self) -> None:
        """Writes to Redis what it missed while it was down; stops at the first write it does not take."""
        for name in list(self.unsynced):
            entry = self.local.get(name)
            left_s = entry[0] - time.monotonic() if entry else 0
            if left_s <= 0:  # expired meanwhile: so has any copy Redis holds
                self.unsynced.discard(name)
                continue
            value = entry[1]
            written = (await self.shared.delete(name) if value is None
                       else await self.shared.set(name, value, math.ceil(left_s)))
            if not written:
                return
            if self.local.get(name) is entry:  # not written again meanwhile
                self.unsynced.discard(name)
                if value is None:
                    self._drop(name)

    def _drop(self, name: str) -> None:
        entry = self.local.pop(name, None)
        if entry is not None:
            self.size -= len(name) + len(entry[1] or b"")
        self.unsynced.discard(name)


class MediaReferences:
    """What a media `uuid` stands for: the gateway's own (the attachment's content hash) and the
    client's (any name it gave the part), each under the API key that sent the bytes."""

    def __init__(self, records: Records):
        self.records = records

    async def remember(self, tenant: str, uuid: str, modality: str, key: str) -> None:
        await self.records.put(tenant, uuid, json.dumps([modality, key]).encode())

    async def resolve(self, tenant: str, uuid: str, param: str) -> tuple[str, str]:
        """(modality, prefix key) of `uuid`, or the 400 that tells the client to send the data again."""
        value = await self.records.get(tenant, uuid)
        if value is not None:
            try:
                modality, key = json.loads(value)
                return modality, key
            except ValueError:
                pass
        raise gone(uuid, param)


def gone(uuid: str, param: str) -> InputError:
    return InputError(400, f"no attachment with uuid '{uuid}' is held for this API key (it may have expired); "
                           "send the part with its data again", param, code="media_not_found")
