"""The threads that work off the event loop: a bounded pool for all work on upload bytes, and two
for the encoder, whose requests are batched: one for batches of batch lines' inputs, one for the rest."""

import asyncio
from concurrent.futures import ThreadPoolExecutor

import torch

from server.engines.priority import BATCH, LiveTraffic, request_priority
from server.metrics import Metrics
from server.model.batcher import EncoderBatcher
from server.model.onellm import OneLLM


class Workers:
    def __init__(self, model: OneLLM, metrics: Metrics, decoding_threads: int, encoder_max_batch: int = 8,
                 encoder_max_wait_ms: float = 1.0, live: LiveTraffic | None = None):
        # decoding runs in a pool so a large video never stalls other users' token streams;
        # the encoder has threads of its own, one computing at a time: torch already uses every core for one batch
        self.decoding = ThreadPoolExecutor(decoding_threads, thread_name_prefix="preprocess")
        self._encoder = ThreadPoolExecutor(1, thread_name_prefix="encoder")
        self._encoder_for_batch_lines = ThreadPoolExecutor(1, thread_name_prefix="encoder-batch-lines")
        # batch lines' work starts only while no online request is being served: a decoding job once
        # running in the pool takes the cores until it ends, an encoder run until its next block
        self.live = live or LiveTraffic()
        self.batcher = EncoderBatcher(model, self._encoder, self._encoder_for_batch_lines, encoder_max_batch,
                                      encoder_max_wait_ms / 1000, metrics, self.live)

    async def off_loop(self, fn, *args):
        """`fn(*args)` in the decoding pool: the one bounded pool for all work on upload bytes."""
        if request_priority.get() == BATCH:
            await self.live.until_idle()
        return await asyncio.get_running_loop().run_in_executor(self.decoding, fn, *args)

    async def encode(self, modality: str, inputs: torch.Tensor) -> torch.Tensor:
        """One model input -> its prefix, in the encoder's next batch of `modality`."""
        return await self.batcher.encode(modality, inputs)

    def close(self) -> None:
        self.batcher.close()
        self.decoding.shutdown(wait=False, cancel_futures=True)
        self._encoder.shutdown(wait=False, cancel_futures=True)
        self._encoder_for_batch_lines.shutdown(wait=False, cancel_futures=True)
