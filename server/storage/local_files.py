"""The file store in a local directory (files_dir, the default): it survives restarts."""

from __future__ import annotations  # `list` below is a method: annotations must not be evaluated in the class

import asyncio
import json
import os
import tempfile
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import BinaryIO

from server.storage.file_records import (PIECE_BYTES, StoredFile, new_record, stored_file_from_json, tenant_key,
                                         unavailable_as_503)

SWEEP_S = 300.0  # how often expired files are looked for, besides on every read


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
        async with unavailable_as_503():  # a full or failing disk
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
        return self.root / "meta" / tenant_key(tenant) / f"{file_id}.json"

    def _add(self, tenant: str, record: StoredFile, data: bytes) -> StoredFile:
        # written even when another file holds these bytes: skipping it would store them sooner,
        # telling the uploader that someone (another tenant too) had uploaded the same file
        write_atomically(self.root / "blobs" / record.sha256, data)
        marker = self.root / "refs" / record.sha256 / f"{tenant_key(tenant)}.{record.id}"
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
        write_atomically(self._meta(tenant, record.id), json.dumps(asdict(record)).encode())
        return record

    def _read(self, path: Path) -> StoredFile | None:
        try:
            return stored_file_from_json(path.read_bytes())
        except OSError:
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
        opened = self._open(tenant, file_id)
        if opened is None:
            return None
        record, blob = opened
        with blob:
            return record, blob.read()

    def _open(self, tenant: str, file_id: str) -> tuple[StoredFile, BinaryIO] | None:
        record = self._get(tenant, file_id)
        if record is None:
            return None
        try:
            return record, open(self.root / "blobs" / record.sha256, "rb")
        except OSError:
            return None

    def _list(self, tenant: str) -> list[StoredFile]:
        folder = self.root / "meta" / tenant_key(tenant)
        records = [self._get(tenant, path.stem) for path in folder.glob("*.json")] if folder.exists() else []
        return [r for r in records if r is not None]

    def _delete(self, tenant: str, file_id: str) -> bool:
        record = self._get(tenant, file_id)
        if record is None:
            return False
        self._remove(tenant, record)
        return True

    def _remove(self, tenant_or_dir: str, record: StoredFile, hashed: bool = False) -> None:
        tenant_dir = tenant_or_dir if hashed else tenant_key(tenant_or_dir)
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


def write_atomically(path: Path, data: bytes) -> None:
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
