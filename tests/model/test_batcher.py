"""The encoder's dynamic batcher: concurrent requests of one modality share a batch, results are their own."""

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from server.model.batcher import EncoderBatcher
from server.model.onellm import load_model


@pytest.fixture(scope="module")
def model(fixture_model):
    return load_model(fixture_model, dtype="float32")  # the comparisons below are at float32 precision


def images(n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(3, 224, 224, generator=g) for _ in range(n)]


def run_concurrently(batcher, items, modality="image"):
    async def main():
        return await asyncio.gather(*(batcher.encode(modality, x) for x in items))

    return asyncio.run(main())


def test_concurrent_requests_run_as_one_batch_with_their_own_rows(model):
    batcher = EncoderBatcher(model, ThreadPoolExecutor(1), ThreadPoolExecutor(1), max_batch=8, max_wait_s=0.05)
    inputs = images(5)
    prefixes = run_concurrently(batcher, inputs)
    assert batcher.batch_sizes == [5]
    for x, prefix in zip(inputs, prefixes):
        torch.testing.assert_close(prefix, model.encode("image", x[None])[0], atol=1e-5, rtol=1e-5)


def test_a_full_batch_runs_without_waiting_and_the_rest_follows(model):
    # the timer never fires
    batcher = EncoderBatcher(model, ThreadPoolExecutor(1), ThreadPoolExecutor(1), max_batch=2, max_wait_s=3600)

    async def main():
        # a generous deadline, far below the timer: a batcher that waited it out fails here
        async with asyncio.timeout(120):
            return await asyncio.gather(*(batcher.encode("image", x) for x in images(4)))

    prefixes = asyncio.run(main())
    assert batcher.batch_sizes == [2, 2]
    assert len(prefixes) == 4


def test_modalities_batch_separately(model):
    batcher = EncoderBatcher(model, ThreadPoolExecutor(1), ThreadPoolExecutor(1), max_batch=8, max_wait_s=0.05)

    async def main():
        return await asyncio.gather(batcher.encode("image", images(1)[0]), batcher.encode("imu", torch.randn(6, 400)),
                                    batcher.encode("image", images(2)[1]))

    image_a, imu, image_b = asyncio.run(main())
    assert sorted(batcher.batch_sizes) == [1, 2]
    assert imu.shape == image_a.shape == image_b.shape


def test_a_cancelled_request_leaves_the_batch_before_it_runs(model):
    batcher = EncoderBatcher(model, ThreadPoolExecutor(1), ThreadPoolExecutor(1), max_batch=8, max_wait_s=0.05)

    async def main():
        a, b, c = (asyncio.ensure_future(batcher.encode("image", x)) for x in images(3))
        await asyncio.sleep(0)
        b.cancel()
        return await asyncio.gather(a, c)

    assert len(asyncio.run(main())) == 2
    assert batcher.batch_sizes == [2]


def test_each_prefix_of_a_batch_holds_only_its_own_rows(model):
    """The prefix cache counts 30 x D per entry: a row that kept its batch alive would hold B times that."""
    batcher = EncoderBatcher(model, ThreadPoolExecutor(1), ThreadPoolExecutor(1), max_batch=8, max_wait_s=0.05)
    prefixes = run_concurrently(batcher, images(4))
    assert batcher.batch_sizes == [4]
    for prefix in prefixes:
        assert prefix.untyped_storage().nbytes() == prefix.numel() * prefix.element_size()


class Watched(torch.Tensor):
    """An input that records the thread of every torch function given it (and computes as a plain tensor)."""

    threads: set[int] = set()

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        cls.threads.add(threading.get_ident())
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **(kwargs or {}))


def test_no_tensor_work_of_a_batch_runs_on_the_event_loop(model):
    # on a GPU, stacking or copying there would wait for the encoder's queued work
    batcher = EncoderBatcher(model, ThreadPoolExecutor(1), ThreadPoolExecutor(1), max_batch=8, max_wait_s=0.05)
    Watched.threads = set()

    async def main():
        prefixes = await asyncio.gather(*(batcher.encode("image", x.as_subclass(Watched)) for x in images(3)))
        return prefixes, threading.get_ident()

    prefixes, loop_thread = asyncio.run(main())
    assert batcher.batch_sizes == [3] and len(prefixes) == 3
    assert Watched.threads and loop_thread not in Watched.threads
