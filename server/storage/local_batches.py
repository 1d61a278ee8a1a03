"""Batches in the local file directory (files_dir), beside the files they read and write: under
`root`/batches, <id>.json (the batch), <id>.results (its finished lines, appended one at a time
and synced to disk, so a gateway killed mid-batch loses at most the lines it was answering) and
<id>.cancel (asked to cancel, when: kept apart from <id>.json, which only the batch's runner
writes); the last two are deleted once the batch has ended and its output file holds its lines.
One gateway per directory, as for the files: it runs every batch, so its leases are always its own."""

from __future__ import annotations  # `list` below is a method: annotations must not be evaluated in the class

import asyncio
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from server.storage.batch_records import decode_batch, encode_batch, plain_batch_id, results_by_custom_id
from server.storage.file_records import unavailable_as_503
from server.storage.local_files import write_atomically


class LocalBatchStore:
    shared = False

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser() / "batches"
        self._io = ThreadPoolExecutor(1, thread_name_prefix="batches")

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        self._io.shutdown(wait=True)

    async def _run(self, fn, *args):
        async with unavailable_as_503():  # a full or failing disk
            return await asyncio.get_running_loop().run_in_executor(self._io, fn, *args)

    async def save(self, tenant: str, batch: dict) -> None:
        await self._run(write_atomically, self.root / f"{batch['id']}.json", encode_batch(tenant, batch))

    async def get(self, tenant: str, batch_id: str) -> dict | None:
        found = await self._run(self._read, batch_id) if plain_batch_id(batch_id) else None
        return found[1] if found is not None and found[0] == tenant else None

    async def list(self, tenant: str) -> list[dict]:
        return [batch for owner, batch in await self._run(self._all) if owner == tenant]

    async def all(self) -> list[tuple[str, dict]]:
        """(tenant, batch) of every batch stored, every key's."""
        return await self._run(self._all)

    async def add_result(self, batch_id: str, result: dict) -> None:
        await self._run(self._append, self.root / f"{batch_id}.results", json.dumps(result).encode() + b"\n")

    async def results(self, batch_id: str) -> dict[str, dict]:
        return await self._run(self._results, batch_id)

    async def forget_progress(self, batch_id: str) -> None:
        await self._run(self._forget_progress, batch_id)

    async def cancel(self, batch_id: str) -> None:
        await self._run(write_atomically, self.root / f"{batch_id}.cancel", str(int(time.time())).encode())

    async def cancelled_at(self, batch_id: str) -> int | None:
        return await self._run(self._cancelled_at, batch_id)

    async def claim(self, batch_id: str) -> bool:
        return True

    async def renew(self, batch_id: str) -> bool:
        return True

    async def release(self, batch_id: str) -> None:
        pass

    # the rest runs in the store's own thread

    def _read(self, batch_id: str) -> tuple[str, dict] | None:
        try:
            return decode_batch((self.root / f"{batch_id}.json").read_bytes())
        except OSError:
            return None

    def _all(self) -> list[tuple[str, dict]]:
        found = [self._read(path.stem) for path in self.root.glob("batch_*.json")] if self.root.exists() else []
        return [f for f in found if f is not None]

    @staticmethod
    def _append(path: Path, line: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a+b") as out:
            if out.tell() and (out.seek(-1, os.SEEK_END), out.read(1))[1] != b"\n":
                line = b"\n" + line  # a line cut short by a crash stays apart from this one
            out.write(line)
            out.flush()
            os.fsync(out.fileno())

    def _results(self, batch_id: str) -> dict[str, dict]:
        try:
            return results_by_custom_id((self.root / f"{batch_id}.results").read_bytes().splitlines())
        except FileNotFoundError:
            return {}

    def _forget_progress(self, batch_id: str) -> None:
        for suffix in (".results", ".cancel"):
            (self.root / f"{batch_id}{suffix}").unlink(missing_ok=True)

    def _cancelled_at(self, batch_id: str) -> int | None:
        try:
            return int((self.root / f"{batch_id}.cancel").read_text())
        except (OSError, ValueError):
            return None
