"""What a gateway's first request would pay once, paid before it says it is ready: one image
question answered in two tokens, through the threads requests use (a decoding worker, the encoder's
thread for online batches, the in-process LLM's worker), outside every cache and metric. On those
threads the first run starts thread pools and first touches buffers; an engine in another process
(vLLM) warms up there, so only the image's decoding and encoder are warmed for it.

At OneLLM-7B's shapes on a 2-core CPU with the quantized LLM, a cold server's first image question
waited 0.15-0.53 s longer for its first token than the next two did (5 starts), and decoded its
image 30-70 ms slower; warmed up (5.6 s more before ready), it waited -0.16 to +0.22 s longer
(3 starts; docs/benchmarks.md)."""

import asyncio
import io

from PIL import Image

from server.core.chat import Attachment
from server.core.prefixes import preprocess_attachment
from server.core.service import ChatService
from server.engines.base import Sampling
from server.engines.local import LocalEngine

QUESTION = "What is in this image?"  # the README's
CACHE_SALT = "warm-up"  # its prompt rows, kept by the llama.cpp engine, are never any request's


async def warm_up(service: ChatService) -> str | None:
    """What was run, or None where the model takes no images (nothing was)."""
    model = service.model
    if "image" not in model.encoder.modalities:
        return None
    attachment = Attachment("image", {"image": blank_jpeg()})
    inputs = await service.workers.off_loop(preprocess_attachment, attachment, service.decoder_limits)
    prefix = await service.workers.encode_alone("image", inputs)
    if not isinstance(service.engine, LocalEngine):
        return "an image decoded and encoded"
    embeddings = await asyncio.to_thread(model.embeddings, model.prompt_ids([("user", QUESTION)]),
                                         [("image", prefix)])
    sampling = Sampling(max_tokens=2, stop=(), ignore_eos=True)
    async for _ in service.engine.stream(embeddings, sampling, cache_salt=CACHE_SALT):
        pass
    return "an image question answered in 2 tokens"


def blank_jpeg() -> bytes:
    """A 640×480 JPEG, as a camera's picture is decoded: the same decoder, resampling and crop."""
    out = io.BytesIO()
    Image.new("RGB", (640, 480), (128, 128, 128)).save(out, "JPEG")
    return out.getvalue()
