"""A bounded LRU of attachment prefixes: a chat resends its files every turn, the encoder runs once.
Requests that bring the same bytes while their prefix is still being made share that one run."""

import asyncio
import hashlib
from collections import OrderedDict
from collections.abc import Callable, Coroutine, Hashable
from dataclasses import dataclass

import torch


def prefix_key(model: str, modality: str, files: dict[str, bytes], options: dict, salt: str | None = None) -> str:
    """The hash of an attachment's bytes and options; with `salt` (a tenant's) the same bytes hash
    apart for each salt."""
    header = f"{model}\0{modality}\0{sorted(options.items())}" + (f"\0{salt}" if salt is not None else "")
    digest = hashlib.sha256(header.encode())
    for name in sorted(files):
        digest.update(name.encode() + b"\0" + len(files[name]).to_bytes(8, "little"))
        digest.update(files[name])  # apart: joined to the header, a 64 MiB file was copied first
    return digest.hexdigest()


class PrefixCache:
    def __init__(self, capacity_bytes: int):
        self.capacity = capacity_bytes
        self.size = 0
        self.entries: OrderedDict[str, torch.Tensor] = OrderedDict()

    def get(self, key: str) -> torch.Tensor | None:
        value = self.entries.get(key)
        if value is not None:
            self.entries.move_to_end(key)
        return value

    def put(self, key: str, value: torch.Tensor) -> None:
        nbytes = held_bytes(value)
        if nbytes > self.capacity or key in self.entries:
            return
        self.entries[key] = value
        self.size += nbytes
        while self.size > self.capacity:
            _, old = self.entries.popitem(last=False)
            self.size -= held_bytes(old)


def held_bytes(tensor: torch.Tensor) -> int:
    """What keeping `tensor` keeps alive: its whole storage, which a view shares with its base."""
    return tensor.untyped_storage().nbytes()


@dataclass
class Run:
    task: asyncio.Task
    waiting: int = 0  # requests awaiting it


class SharedRuns:
    """One run per key at a time, awaited by every request that asks for that key while it runs.

    The run is a task of its own, so a request that leaves (its client gone, its deadline passed)
    does not take it from the others; it is cancelled when the last request waiting for it leaves,
    so work that nobody waits for still stops, as it did when each request ran its own."""

    def __init__(self):
        self.runs: dict[Hashable, Run] = {}

    def running(self, key: Hashable) -> bool:
        return key in self.runs

    async def result(self, key: Hashable, start: Callable[[], Coroutine]):
        """What the run for `key` returns (or raises), started with `start()` if none is running."""
        run = self.runs.get(key)
        if run is None:
            run = self.runs[key] = Run(asyncio.create_task(start()))
            run.task.add_done_callback(lambda _: self._forget(key, run))
        run.waiting += 1
        try:
            return await asyncio.shield(run.task)
        finally:
            run.waiting -= 1
            if run.waiting == 0 and not run.task.done():
                self._forget(key, run)  # a request that comes now starts afresh, not on a cancelled run
                run.task.cancel()

    def _forget(self, key: Hashable, run: Run) -> None:
        if self.runs.get(key) is run:
            del self.runs[key]
