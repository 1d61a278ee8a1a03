"""The threads that work off the event loop: a bounded pool for all work on upload bytes, and the
encoder's, whose requests are batched: one for online requests' batches, and for batch lines' batches
one per core on a CPU (one on a GPU)."""

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

from server.engines.priority import BATCH, LiveTraffic, request_priority
from server.metrics import Metrics
from server.model.batcher import EncoderBatcher
from server.model.onellm import OneLLM


class Workers:
    def __init__(self, model: OneLLM, metrics: Metrics, decoding_threads: int, encoder_max_batch: int = 8,
                 encoder_max_wait_ms: float = 1.0, live: LiveTraffic | None = None):
        # decoding runs in a pool so a large video never stalls other users' token streams
        self.decoding = ThreadPoolExecutor(decoding_threads, thread_name_prefix="preprocess")
        # online batches run one at a time on every core: a user waits for each
        self._encoder = ThreadPoolExecutor(1, thread_name_prefix="encoder")
        # Batch lines want throughput, which on a CPU is one run per core, each on one core: once the
        # process holds more OpenMP threads than cores (it does), libgomp barely spins, so torch
        # wakes the other cores with a futex for every operation, which on small shapes costs about
        # what the second core gives (docs/benchmarks.md, "Encoder throughput").
        if model.device.type == "cpu":
            lines_runs = torch.get_num_threads()
            self._encoder_for_batch_lines = one_core_threads(lines_runs, "encoder-batch-lines")
        else:  # on a GPU the runs would queue on the one device anyway
            lines_runs = 1
            self._encoder_for_batch_lines = ThreadPoolExecutor(1, thread_name_prefix="encoder-batch-lines")
        # batch lines' work starts only while no online request is being served: a decoding job once
        # running in the pool takes the cores until it ends, an encoder run until its next block
        self.live = live or LiveTraffic()
        self.model = model
        self.batcher = EncoderBatcher(model, self._encoder, self._encoder_for_batch_lines, encoder_max_batch,
                                      encoder_max_wait_ms / 1000, metrics, self.live, lines_runs)

    async def off_loop(self, fn, *args):
        """`fn(*args)` in the decoding pool: the one bounded pool for all work on upload bytes."""
        if request_priority.get() == BATCH:
            await self.live.until_idle()
        return await asyncio.get_running_loop().run_in_executor(self.decoding, fn, *args)

    async def encode(self, modality: str, inputs: torch.Tensor) -> torch.Tensor:
        """One model input -> its prefix, in the encoder's next batch of `modality`."""
        return await self.batcher.encode(modality, inputs)

    async def encode_alone(self, modality: str, inputs: torch.Tensor) -> torch.Tensor:
        """One model input's prefix [30, D] on the thread that runs online batches, in no batch and
        counted in no metric (see server/core/warm_up.py)."""
        def encode() -> torch.Tensor:
            with self.model.encoder_stream():
                return self.model.encode(modality, inputs[None])[0].clone()

        return await asyncio.get_running_loop().run_in_executor(self._encoder, encode)

    def close(self) -> None:
        self.batcher.close()
        self.decoding.shutdown(wait=False, cancel_futures=True)
        self._encoder.shutdown(wait=False, cancel_futures=True)
        self._encoder_for_batch_lines.shutdown(wait=False, cancel_futures=True)


def one_core_threads(count: int, name: str) -> ThreadPoolExecutor:
    """`count` threads, started now, on which torch computes on one core each; the threads started
    later (every other pool's) take the process's count as before."""
    process_count = torch.get_num_threads()
    pool = ThreadPoolExecutor(count, thread_name_prefix=name, initializer=_one_core)
    all_started = threading.Barrier(count + 1)
    for _ in range(count):  # each waits for the others, so the pool starts a thread for each
        pool.submit(all_started.wait)
    all_started.wait()
    torch.set_num_threads(process_count)  # what a thread starts from, which each of these set to one
    return pool


def _one_core() -> None:
    torch.get_num_threads()  # a thread takes the process's count at its first call: that done first
    torch.set_num_threads(1)  # this thread's own count (and, for threads started after, the process's)
