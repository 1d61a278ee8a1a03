"""Nothing on the event loop waits for tensors: on a GPU any torch call there may wait for the
encoder's queued work, and every token stream of the gateway would stall meanwhile. A torch function
mode is per thread: entered on the loop's thread, it sees the torch calls made there and none of
the workers'. In process, with the real ChatService on the tiny model."""

import asyncio

import numpy as np
import pytest
from PIL import Image
from torch.overrides import TorchFunctionMode

import inputs_files as files
from server.config import Settings
from server.core.chat import Attachment, Chat, Turn
from server.core.service import Generation, chat_service_for
from server.engines.base import Sampling
from server.engines.local import LocalEngine
from server.metrics import Metrics
from server.model.onellm import load_model


# what a tensor's metadata answers without the device: the prefix cache counts a prefix's storage
METADATA = {"TensorBase.untyped_storage"}


class TorchCalls(TorchFunctionMode):
    """The torch functions called on the thread that entered it, but for reading metadata."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__qualname__", repr(func))
        if name not in METADATA:
            self.names.append(name)
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def service(tiny_model):
    service = chat_service_for(Settings(preprocess_workers=1, default_max_tokens=4), load_model(tiny_model),
                               LocalEngine(tiny_model / "llm"), Metrics())
    yield service
    service.close()


def picture(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    return files.image_bytes(Image.fromarray(pixels), "PNG")


def test_a_chat_with_an_attachment_is_prepared_and_answered_without_tensor_work_on_the_loop(service):
    chat = Chat([Turn("user", "What is in the picture?", [Attachment("image", {"image": picture(1)})])])

    async def answer(calls: TorchCalls) -> list[str]:
        with calls:
            prepared = await service.prepare(chat, 4)
            return [delta async for delta in service.generate(Generation(prepared), Sampling(max_tokens=4))]

    calls = TorchCalls()
    assert asyncio.run(answer(calls))
    assert calls.names == []
