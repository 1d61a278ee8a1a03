"""Uploaded files (OpenAI's Files API): bytes kept once per content, a record per upload, each
record its API key's own and gone when it expires.

Two stores behind one interface: a local directory (the default; it survives restarts) and Redis
(every gateway replica sees the same files). Both keep a file's bytes once however many uploads
bring them, and drop the bytes when the last record naming them is deleted or expires.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import secrets
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as ClosedConnection, RedisError

from server.config import DecoderLimits
from server.errors import InputError, Unavailable
from server.media.decoders.arrays import load_array
from server.media.decoders.images import decode_image
from server.media.sniff import sniff

PURPOSES = ("user_data", "vision")
# what each modality's decoders read; anything else (pickles, archives, documents) is refused on upload
ACCEPTED_FAMILIES = {"image", "video", "audio", "array", "mesh", "text"}
SWEEP_S = 300.0  # how often expired files are looked for, besides on every read
# a download is read and sent this much at a time: what one held by a reader that stopped reading costs
PIECE_BYTES = 256 << 10


@dataclass(frozen=True)
class StoredFile:
    id: str
    bytes: int
    created_at: int
    expires_at: int
    filename: str
    purpose: str
    sha256: str
    kind: str  # what sniffing found: image, video, audio, array, mesh, text; "" when unrecognised
    uploaded_at: float  # created_at to the microsecond: lists keep the upload order within a second

    def openai(self) -> dict:
        return {"id": self.id, "object": "file", "bytes": self.bytes, "created_at": self.created_at,
                "expires_at": self.expires_at, "filename": self.filename, "purpose": self.purpose,
                "status": "processed", "status_details": None}

    def expired(self, now: float) -> bool:
        return self.expires_at <= now


def new_record(data: bytes, filename: str, purpose: str, ttl_s: int, kind: str) -> StoredFile:
    now = time.time()
    return StoredFile("file-" + secrets.token_hex(12), len(data), int(now), int(now) + ttl_s, filename, purpose,
                      hashlib.sha256(data).hexdigest(), kind, now)


def check_upload(data: bytes, limits: DecoderLimits) -> str:
    """What kind of file `data` is, after the checks inline attachments get before decoding:
    the bytes name the kind (never the file name), and a kind no decoder reads is refused."""
    param = "file"
    if not data:
        raise InputError(422, "the uploaded file is empty", param)
    kind = sniff(data)
    if kind is None:
        return ""  # a decoder may still read it: decided when a chat uses it, as for inline bytes
    if kind.family not in ACCEPTED_FAMILIES:
        raise InputError(415, f"the uploaded file is {kind.describe()}, which no modality reads; accepted: "
                              "images, videos, audio, .npy or CSV arrays, 3D meshes", param)
    if kind.family == "image":  # the header's pixel count, as for an inline image
        decode_image(data, param, limits.max_image_pixels)
    if kind.family == "array":  # object arrays are pickles in disguise
        load_array(data, param, max_decode_mb=limits.max_decode_mb)
    return kind.family


def _tenant_dir(tenant: str) -> str:
    # API key ids are free text in the keys file; a hash is always a safe file and key name
    return hashlib.sha256(tenant.encode()).hexdigest()[:32]


class LocalFileStore:
    """Under `root`: blobs/<sha256> (the bytes), refs/<sha256>/<file id> (who names them),
    meta/<tenant>/<file id>.json (the record). Writes go through a temp file and a rename, so a
    crash leaves either the old state or the new. One gateway process per directory: the
    operations run one at a time in a thread of their own, which is what keeps them consistent."""

    name = "local directory"

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser()
        self._io = ThreadPoolExecutor(1, thread_name_prefix="files")
        self._sweeper: asyncio.Task | None = None

    async def start(self) -> None:
        await self._run(self._sweep)
        self._sweeper = asyncio.create_task(self._sweep_every(SWEEP_S))

    async def close(self) -> None:
        if self._sweeper:
            self._sweeper.cancel()
        self._io.shutdown(wait=True)

    async def _run(self, fn, *args):
        async with _unavailable_as_503():  # a full or failing disk
            return await asyncio.get_running_loop().run_in_executor(self._io, fn, *args)

    async def add(self, tenant: str, data: bytes, filename: str, purpose: str, ttl_s: int, kind: str) -> StoredFile:
        return await self._run(self._add, tenant, new_record(data, filename, purpose, ttl_s, kind), data)

    async def get(self, tenant: str, file_id: str) -> StoredFile | None:
        return await self._run(self._get, tenant, file_id)

    async def content(self, tenant: str, file_id: str) -> tuple[StoredFile, bytes] | None:
        return await self._run(self._content, tenant, file_id)

    async def stream(self, tenant: str, file_id: str) -> tuple[StoredFile, AsyncIterator[bytes]] | None:
        """The record and the bytes a piece at a time; the blob is open from here on, so a
        delete meanwhile does not cut the download short."""
        found = await self._run(self._open, tenant, file_id)
        if found is None:
            return None
        record, blob = found
        return record, self._pieces(blob)

    async def _pieces(self, blob: BinaryIO) -> AsyncIterator[bytes]:
        try:
            while piece := await self._run(blob.read, PIECE_BYTES):
                yield piece
        finally:  # in the store's thread, after the read a cancelled download may have left running
            self._io.submit(blob.close)

    async def list(self, tenant: str) -> list[StoredFile]:
        return await self._run(self._list, tenant)

    async def delete(self, tenant: str, file_id: str) -> bool:
        return await self._run(self._delete, tenant, file_id)

    # the rest runs in the store's own thread

    def _meta(self, tenant: str, file_id: str) -> Path:
        return self.root / "meta" / _tenant_dir(tenant) / f"{file_id}.json"

    def _add(self, tenant: str, record: StoredFile, data: bytes) -> StoredFile:
        blob = self.root / "blobs" / record.sha256
        if not blob.exists():
            _write_atomically(blob, data)
        marker = self.root / "refs" / record.sha256 / f"{_tenant_dir(tenant)}.{record.id}"
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
        _write_atomically(self._meta(tenant, record.id), json.dumps(asdict(record)).encode())
        return record

    def _read(self, path: Path) -> StoredFile | None:
        try:
            return StoredFile(**json.loads(path.read_bytes()))
        except (OSError, ValueError, TypeError):
            return None

    def _get(self, tenant: str, file_id: str) -> StoredFile | None:
        if not _plain_id(file_id):
            return None
        record = self._read(self._meta(tenant, file_id))
        if record is not None and record.expired(time.time()):
            self._remove(tenant, record)
            return None
        return record

    def _content(self, tenant: str, file_id: str) -> tuple[StoredFile, bytes] | None:
        record = self._get(tenant, file_id)
        if record is None:
            return None
        try:
            return record, (self.root / "blobs" / record.sha256).read_bytes()
        except OSError:
            return None

    def _open(self, tenant: str, file_id: str) -> tuple[StoredFile, BinaryIO] | None:
        record = self._get(tenant, file_id)
        if record is None:
            return None
        try:
            return record, open(self.root / "blobs" / record.sha256, "rb")
        except OSError:
            return None

    def _list(self, tenant: str) -> list[StoredFile]:
        folder = self.root / "meta" / _tenant_dir(tenant)
        records = [self._get(tenant, path.stem) for path in folder.glob("*.json")] if folder.exists() else []
        return [r for r in records if r is not None]

    def _delete(self, tenant: str, file_id: str) -> bool:
        record = self._get(tenant, file_id)
        if record is None:
            return False
        self._remove(tenant, record)
        return True

    def _remove(self, tenant_or_dir: str, record: StoredFile, hashed: bool = False) -> None:
        tenant_dir = tenant_or_dir if hashed else _tenant_dir(tenant_or_dir)
        (self.root / "meta" / tenant_dir / f"{record.id}.json").unlink(missing_ok=True)
        refs = self.root / "refs" / record.sha256
        (refs / f"{tenant_dir}.{record.id}").unlink(missing_ok=True)
        if refs.exists() and not any(refs.iterdir()):  # nobody names these bytes any more
            refs.rmdir()
            (self.root / "blobs" / record.sha256).unlink(missing_ok=True)

    def _sweep(self) -> None:
        now = time.time()
        for path in (self.root / "meta").glob("*/*.json"):
            record = self._read(path)
            if record is not None and record.expired(now):
                self._remove(path.parent.name, record, hashed=True)

    async def _sweep_every(self, seconds: float) -> None:
        while True:
            await asyncio.sleep(seconds)
            await self._run(self._sweep)


def _plain_id(file_id: str) -> bool:
    # ids come from URLs: one that is not ours must not become a path
    return file_id.startswith("file-") and file_id[5:].isalnum() and len(file_id) <= 64


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=".upload-")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


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
        # one retry on a closed connection, which is what every pooled one is after Redis restarted
        # (else a 503 each); none on a timeout, which would be one more for the request to wait out
        self.client = redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                     retry=Retry(NoBackoff(), 1, supported_errors=(ClosedConnection,)))
        self.ns = namespace
        self._link = self.client.register_script(_LINK)
        self._unlink = self.client.register_script(_UNLINK)

    async def start(self) -> None:
        pass  # Redis expires the records itself; a Redis that is down is a 503 per request, not a failed start

    async def close(self) -> None:
        await self.client.aclose()

    def _keys(self, tenant: str, record: StoredFile) -> list[str]:
        t = _tenant_dir(tenant)
        return [f"{self.ns}blob:{record.sha256}", f"{self.ns}refs:{record.sha256}", f"{self.ns}meta:{t}:{record.id}",
                f"{self.ns}list:{t}"]

    async def add(self, tenant: str, data: bytes, filename: str, purpose: str, ttl_s: int, kind: str) -> StoredFile:
        record = new_record(data, filename, purpose, ttl_s, kind)
        keys = self._keys(tenant, record)
        args = [record.id, record.expires_at, json.dumps(asdict(record)), record.uploaded_at]
        async with _unavailable_as_503():
            if not await self._link(keys, args):  # bytes not held yet (or expiring just now): send them once
                await self.client.set(keys[0], data, exat=record.expires_at, nx=True)
                if not await self._link(keys, args):
                    raise Unavailable("the file store lost the upload while storing it; retry", "file")
        return record

    async def get(self, tenant: str, file_id: str) -> StoredFile | None:
        async with _unavailable_as_503():
            raw = await self.client.get(f"{self.ns}meta:{_tenant_dir(tenant)}:{file_id}")
        return _record(raw)

    async def content(self, tenant: str, file_id: str) -> tuple[StoredFile, bytes] | None:
        record = await self.get(tenant, file_id)
        if record is None:
            return None
        async with _unavailable_as_503():
            data = await self.client.get(f"{self.ns}blob:{record.sha256}")
        return None if data is None else (record, data)

    async def stream(self, tenant: str, file_id: str) -> tuple[StoredFile, AsyncIterator[bytes]] | None:
        """The record and the bytes a range at a time."""
        record = await self.get(tenant, file_id)
        if record is None:
            return None
        blob = f"{self.ns}blob:{record.sha256}"
        async with _unavailable_as_503():
            if not await self.client.exists(blob):
                return None
        return record, self._ranges(blob, record.bytes)

    async def _ranges(self, blob: str, size: int) -> AsyncIterator[bytes]:
        for start in range(0, size, PIECE_BYTES):
            async with _unavailable_as_503():
                piece = await self.client.getrange(blob, start, start + PIECE_BYTES - 1)
            if not piece:  # the last record naming the bytes was deleted meanwhile
                raise InputError(404, "the file was deleted while it was being downloaded")
            yield piece

    async def list(self, tenant: str) -> list[StoredFile]:
        listing = f"{self.ns}list:{_tenant_dir(tenant)}"
        async with _unavailable_as_503():
            ids = [i.decode() for i in await self.client.zrange(listing, 0, -1)]
            raws = await self.client.mget([f"{self.ns}meta:{_tenant_dir(tenant)}:{i}" for i in ids]) if ids else []
            gone = [i for i, raw in zip(ids, raws) if raw is None]  # expired: Redis dropped the record
            if gone:
                await self.client.zrem(listing, *gone)
        return [r for r in map(_record, raws) if r is not None]

    async def delete(self, tenant: str, file_id: str) -> bool:
        record = await self.get(tenant, file_id)
        if record is None:
            return False
        async with _unavailable_as_503():
            return bool(await self._unlink(self._keys(tenant, record), [record.id]))


def _record(raw: bytes | None) -> StoredFile | None:
    if raw is None:
        return None
    try:
        return StoredFile(**json.loads(raw))
    except (ValueError, TypeError):
        return None


@asynccontextmanager
async def _unavailable_as_503():
    try:
        yield
    except (RedisError, OSError) as e:
        raise Unavailable(f"the file store is unavailable ({type(e).__name__})", headers={"Retry-After": "1"}) from None


def file_store_for(settings) -> LocalFileStore | RedisFileStore:
    if settings.files_url:
        return RedisFileStore(settings.files_url)
    return LocalFileStore(settings.files_dir)
