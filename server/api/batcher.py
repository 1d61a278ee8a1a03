"""Dynamic batching of the encoder: requests of one modality queue and run as one batch.

A batch runs when `max_batch` requests wait or `max_wait` has passed since the first one came;
each request gets its own prefix rows back. Modalities batch separately (their inputs differ in
shape); a video batch sends all B·T frames through the CLIP trunk in one call.
"""

import asyncio
import time
from collections import defaultdict
from concurrent.futures import Executor

import torch

from server.api.metrics import Metrics
from server.model.repo import OneLLM


class EncoderBatcher:
    def __init__(self, model: OneLLM, executor: Executor, max_batch: int, max_wait_s: float,
                 metrics: Metrics | None = None):
        self.model = model
        self.metrics = metrics
        self.executor = executor
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.waiting: dict[str, list[tuple[torch.Tensor, asyncio.Future]]] = defaultdict(list)
        self.timers: dict[str, asyncio.TimerHandle] = {}
        self.batch_sizes: list[int] = []  # of every batch run, for tests and benchmarks

    async def encode(self, modality: str, inputs: torch.Tensor) -> torch.Tensor:
        """One model input (no batch dim) -> its prefix [30, D]."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        queue = self.waiting[modality]
        queue.append((inputs, future))
        if len(queue) >= self.max_batch:
            self._flush(modality)
        elif modality not in self.timers:
            self.timers[modality] = loop.call_later(self.max_wait_s, self._flush, modality)
        return await future  # a cancelled caller's input is dropped before its batch runs

    def _flush(self, modality: str) -> None:
        if timer := self.timers.pop(modality, None):
            timer.cancel()
        queue = self.waiting[modality]
        batch = [(x, f) for x, f in queue[: self.max_batch] if not f.cancelled()]
        del queue[: self.max_batch]
        if queue:  # more than one batch's worth came at once: the rest runs right after
            self.timers[modality] = asyncio.get_running_loop().call_later(0, self._flush, modality)
        if batch:
            self.batch_sizes.append(len(batch))
            asyncio.ensure_future(self._run(modality, batch))

    async def _run(self, modality: str, batch: list[tuple[torch.Tensor, asyncio.Future]]) -> None:
        inputs = torch.stack([x for x, _ in batch])
        try:
            prefixes = await asyncio.get_running_loop().run_in_executor(self.executor, self._encode, modality, inputs)
        except Exception as e:  # noqa: BLE001 - every waiting request learns of the failure
            for _, future in batch:
                if not future.done():
                    future.set_exception(e)
            return
        for (_, future), prefix in zip(batch, prefixes):
            if not future.done():
                future.set_result(prefix)

    def _encode(self, modality: str, inputs: torch.Tensor) -> torch.Tensor:
        started = time.perf_counter()
        prefixes = self.model.encode(modality, inputs)
        if self.metrics is not None:
            self.metrics.encoder_seconds.labels(modality).observe(time.perf_counter() - started)
            self.metrics.encoder_batch_size.labels(modality).observe(len(inputs))
        return prefixes
