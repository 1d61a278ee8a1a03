"""Dynamic batching of the encoder: requests of one modality queue and run as one batch.

The encoder runs one batch of online requests at a time. When it is free, a modality's queue
runs as soon as it holds `max_batch` requests or its oldest has waited `max_wait`; of several
such queues the one with the oldest request goes first. While a batch runs the queues keep filling, so under load
batches grow to what has arrived in the meantime instead of lining up one request each.
Each request gets its own prefix rows back, copied out of the batch. Modalities batch separately (their inputs differ
in shape); a video batch sends all B·T frames through the CLIP trunk in one call.

Online requests come before batch lines: while any online input waits, only queues holding one
may run, and a batch takes its queue's online inputs first. A batch of batch lines' inputs alone
starts only while no online request is being served (`live`) and no online batch runs; it runs on
a thread of its own and, once online requests are served again, waits between two transformer
blocks until none is left, while their inputs run on the encoder's thread. An audio input is
26 blocks deep in the tiny model, and a whole run of one would hold the cores for up to a second.
Batches of batch lines' inputs run up to `batch_lines_runs` at once (one per thread of their
executor): they are throughput work, which on a CPU goes further as one run per core than as one
run over every core (server/core/workers.py).
"""

import asyncio
import time
from collections import Counter, defaultdict
from concurrent.futures import Executor
from typing import Protocol

import torch
from opentelemetry.trace import Span

from server import tracing
from server.engines.priority import BATCH, ONLINE, LiveTraffic, request_priority
from server.errors import Cancelled
from server.model.onellm import OneLLM

# how often a run of batch lines' inputs paused for online traffic looks whether the gateway is
# closing: a thread left waiting would keep the process from exiting
CLOSING_CHECK_S = 0.1


class Histogram(Protocol):
    def observe(self, amount: float) -> None: ...


class HistogramsByModality(Protocol):
    def labels(self, modality: str) -> Histogram: ...


class BatchMetrics(Protocol):
    """What the batcher records of each batch; the gateway's prometheus Metrics has these."""

    encoder_seconds: HistogramsByModality  # one batch on an encoder thread, not counting its pauses
    encoder_batch_size: HistogramsByModality


class EncoderBatcher:
    def __init__(self, model: OneLLM, executor: Executor, batch_lines_executor: Executor, max_batch: int,
                 max_wait_s: float, metrics: BatchMetrics | None = None, live: LiveTraffic | None = None,
                 batch_lines_runs: int = 1):
        self.model = model
        self.live = live or LiveTraffic()
        self.held_for_live = False  # batch lines' inputs wait for the online requests being served
        self.metrics = metrics
        # a paused run of batch lines' inputs holds its thread: the online inputs need another one
        self.executors = {ONLINE: executor, BATCH: batch_lines_executor}
        self.batch_lines_runs = batch_lines_runs
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        # modality -> [(input, future, arrival time, the request's span of its wait and batch, its
        # priority)], oldest first
        self.waiting: dict[str, list[tuple[torch.Tensor, asyncio.Future, float, Span, int]]] = defaultdict(list)
        # runs under way by priority: one online at most, up to `batch_lines_runs` of batch lines
        self.running: Counter[int] = Counter()
        self.timer: asyncio.TimerHandle | None = None
        self.batch_sizes: list[int] = []  # of every batch run, for tests and benchmarks
        self.closed = False

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
        if self.running[ONLINE]:
            return  # the running batch dispatches again when it ends
        for queue in self.waiting.values():
            # online inputs first, each priority oldest first (the sort is stable)
            queue[:] = sorted((entry for entry in queue if not entry[1].cancelled()), key=lambda entry: entry[4])
        heads = {m: queue[0] for m, queue in self.waiting.items() if queue}
        if any(head[4] == ONLINE for head in heads.values()):
            heads, priority = {m: head for m, head in heads.items() if head[4] == ONLINE}, ONLINE
        elif self.running[BATCH] >= self.batch_lines_runs or not heads:
            return
        elif self.live.serving:
            if not self.held_for_live:
                self.held_for_live = True
                asyncio.ensure_future(self._after_live())
            return
        else:
            priority = BATCH
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
        self.running[priority] += 1
        self.batch_sizes.append(len(batch))
        asyncio.ensure_future(self._run(modality, batch, priority))
        if priority == BATCH:
            self._dispatch()  # another queue may be due for a run beside this one

    def close(self) -> None:
        """A run of batch lines' inputs paused for online traffic stops at once (its lines fail as
        Cancelled: a gateway shutting down sends them again when it starts)."""
        self.closed = True

    async def _after_live(self) -> None:
        await self.live.until_idle()
        self.held_for_live = False
        self._dispatch()

    async def _run(self, modality: str, batch: list[tuple[torch.Tensor, asyncio.Future]], priority: int) -> None:
        try:
            prefixes = await asyncio.get_running_loop().run_in_executor(
                self.executors[priority], self._encode, modality, [x for x, _ in batch], priority)
        except Exception as e:  # noqa: BLE001 - every waiting request learns of the failure
            for _, future in batch:
                if not future.done():
                    future.set_exception(e)
        else:
            for (_, future), prefix in zip(batch, prefixes):
                if not future.done():
                    future.set_result(prefix)
        finally:
            self.running[priority] -= 1
            self._dispatch()

    def _encode(self, modality: str, inputs: list[torch.Tensor], priority: int) -> list[torch.Tensor]:
        """On an encoder thread, from stacking the inputs to each request's own rows: nothing here
        may run on the event loop, which on a GPU would wait for the encoder's queued work."""
        started, paused = time.perf_counter(), 0.0

        def between_blocks() -> None:
            nonlocal paused
            if priority == BATCH:
                waiting = time.perf_counter()
                while not self.live.wait_until_idle_in_thread(CLOSING_CHECK_S):
                    if self.closed:
                        raise Cancelled("the gateway is shutting down")
                paused += time.perf_counter() - waiting

        with self.model.encoder_stream():
            prefixes = self.model.encode(modality, torch.stack(inputs), between_blocks)
            # each request's own copy: a row of the batch would keep all B rows alive in the prefix
            # cache while it counts one
            copies = [prefix.clone() for prefix in prefixes]
        if self.metrics is not None:
            self.metrics.encoder_seconds.labels(modality).observe(time.perf_counter() - started - paused)
            self.metrics.encoder_batch_size.labels(modality).observe(len(inputs))
        return copies
