"""Dynamic batching of the encoder: requests of one modality queue and run as one batch.

The encoder runs one batch at a time. When it is free, a modality's queue runs as soon as it
holds `max_batch` requests or its oldest has waited `max_wait`; of several such queues the one
with the oldest request goes first. While a batch runs the queues keep filling, so under load
batches grow to what has arrived in the meantime instead of lining up one request each.
Each request gets its own prefix rows back, copied out of the batch. Modalities batch separately (their inputs differ
in shape); a video batch sends all B·T frames through the CLIP trunk in one call.

Online requests come before batch lines: while any online input waits, only queues holding one
may run, and a batch takes its queue's online inputs first; a batch of batch lines' inputs alone
starts only while no online request is being served (`live`), as an encoder run cannot be cut short.
"""

import asyncio
import time
from collections import defaultdict
from concurrent.futures import Executor
from typing import Protocol

import torch
from opentelemetry.trace import Span

from server import tracing
from server.engines.priority import ONLINE, LiveTraffic, request_priority
from server.model.onellm import OneLLM


class Histogram(Protocol):
    def observe(self, amount: float) -> None: ...


class HistogramsByModality(Protocol):
    def labels(self, modality: str) -> Histogram: ...


class BatchMetrics(Protocol):
    """What the batcher records of each batch; the gateway's prometheus Metrics has these."""

    encoder_seconds: HistogramsByModality  # one batch on the encoder thread
    encoder_batch_size: HistogramsByModality


class EncoderBatcher:
    def __init__(self, model: OneLLM, executor: Executor, max_batch: int, max_wait_s: float,
                 metrics: BatchMetrics | None = None, live: LiveTraffic | None = None):
        self.model = model
        self.live = live or LiveTraffic()
        self.held_for_live = False  # batch lines' inputs wait for the online requests being served
        self.metrics = metrics
        self.executor = executor
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        # modality -> [(input, future, arrival time, the request's span of its wait and batch, its
        # priority)], oldest first
        self.waiting: dict[str, list[tuple[torch.Tensor, asyncio.Future, float, Span, int]]] = defaultdict(list)
        self.running = False
        self.timer: asyncio.TimerHandle | None = None
        self.batch_sizes: list[int] = []  # of every batch run, for tests and benchmarks

    async def encode(self, modality: str, inputs: torch.Tensor) -> torch.Tensor:
        """One model input (no batch dim) -> its prefix [30, D]."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with tracing.span("encoder.batch", {"onellm.modality": modality}) as span:
            self.waiting[modality].append((inputs, future, loop.time(), span, request_priority.get()))
            self._dispatch()
            return await future  # a cancelled caller's input is dropped before its batch runs

    def _dispatch(self) -> None:
        """Start the next batch if the encoder is free and a queue is due; else wake up when one will be."""
        if self.timer:
            self.timer.cancel()
            self.timer = None
        if self.running:
            return  # the running batch dispatches again when it ends
        for queue in self.waiting.values():
            # online inputs first, each priority oldest first (the sort is stable)
            queue[:] = sorted((entry for entry in queue if not entry[1].cancelled()), key=lambda entry: entry[4])
        heads = {m: queue[0] for m, queue in self.waiting.items() if queue}
        if any(head[4] == ONLINE for head in heads.values()):
            heads = {m: head for m, head in heads.items() if head[4] == ONLINE}
        elif heads and self.live.serving:
            if not self.held_for_live:
                self.held_for_live = True
                asyncio.ensure_future(self._after_live())
            return
        if not heads:
            return
        loop = asyncio.get_running_loop()
        arrivals = {m: head[2] for m, head in heads.items()}
        due = [m for m, arrived in arrivals.items()
               if len(self.waiting[m]) >= self.max_batch or loop.time() - arrived >= self.max_wait_s]
        if not due:
            self.timer = loop.call_at(min(arrivals.values()) + self.max_wait_s, self._dispatch)
            return
        modality = min(due, key=arrivals.get)
        queue = self.waiting[modality]
        batch = [(x, f) for x, f, *_ in queue[: self.max_batch]]
        for _, _, _, span, _ in queue[: self.max_batch]:
            span.set_attribute("onellm.encoder.batch_size", len(batch))
        del queue[: self.max_batch]
        self.running = True
        self.batch_sizes.append(len(batch))
        asyncio.ensure_future(self._run(modality, batch))

    async def _after_live(self) -> None:
        await self.live.until_idle()
        self.held_for_live = False
        self._dispatch()

    async def _run(self, modality: str, batch: list[tuple[torch.Tensor, asyncio.Future]]) -> None:
        try:
            prefixes = await asyncio.get_running_loop().run_in_executor(self.executor, self._encode, modality,
                                                                        [x for x, _ in batch])
        except Exception as e:  # noqa: BLE001 - every waiting request learns of the failure
            for _, future in batch:
                if not future.done():
                    future.set_exception(e)
        else:
            for (_, future), prefix in zip(batch, prefixes):
                if not future.done():
                    future.set_result(prefix)
        finally:
            self.running = False
            self._dispatch()

    def _encode(self, modality: str, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        """On the encoder thread, from stacking the inputs to each request's own rows: nothing here
        may run on the event loop, which on a GPU would wait for the encoder's queued work."""
        started = time.perf_counter()
        with self.model.encoder_stream():
            prefixes = self.model.encode(modality, torch.stack(inputs))
            # each request's own copy: a row of the batch would keep all B rows alive in the prefix
            # cache while it counts one
            copies = [prefix.clone() for prefix in prefixes]
        if self.metrics is not None:
            self.metrics.encoder_seconds.labels(modality).observe(time.perf_counter() - started)
            self.metrics.encoder_batch_size.labels(modality).observe(len(inputs))
        return copies
