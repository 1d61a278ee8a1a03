"""The event loop's lag while OneLLM-7B-shaped encoder batches run (a benchmark, not a test).

    uv run python bench/loop_lag.py --seconds 60 --chats 4

In process: the gateway's ChatService around an encoder of OneLLM-7B's shapes with random weights
(bench/encoder.py; a gateway process would need a 7B LLM folder, 13 GB, for its width) and the vLLM
engine against the stand-in vLLM on loopback (tests/vllm_standin.py), so the prompt embeddings
[L, 4096] are serialised as they are for a real vLLM. `--chats` clients each ask image and audio
questions in turn, every attachment new (no cache hit), while a ticker on the loop sleeps 1 ms at a
time and records how late it wakes. Prints the worst, p99 and median lag and the chats answered.
"""

import argparse
import asyncio
import gc
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import inputs_files as files  # noqa: E402
from encoder import SEVEN_B, random_7b_encoder  # noqa: E402
from vllm_standin import StandInVLLM  # noqa: E402

import server  # noqa: E402
from server.config import Settings  # noqa: E402
from server.core.chat import Attachment, Chat, Turn  # noqa: E402
from server.core.service import Generation, chat_service_for  # noqa: E402
from server.engines.base import Sampling  # noqa: E402
from server.engines.vllm import VLLMEngine  # noqa: E402
from server.metrics import Metrics  # noqa: E402
from server.model.onellm import load_model, place  # noqa: E402


def model_of_7b_shapes(tiny: Path, dtype: str):
    """The tiny model's tokenizer and template around an encoder of OneLLM-7B's shapes."""
    model = load_model(tiny, dtype=dtype)
    model.encoder = place(random_7b_encoder(), model.device, model.dtype)
    model.config = {**model.config, "name": "7b-shapes", "llm": {**model.config["llm"], "dim": SEVEN_B["dim"]}}
    return model


def attachment(kind: str, seed: int) -> Attachment:
    rng = np.random.default_rng(seed)
    if kind == "image":
        pixels = rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)
        return Attachment("image", {"image": files.image_bytes(Image.fromarray(pixels), "PNG")})
    noise = (rng.standard_normal(16000 * 10) * 0.1).astype(np.float32)
    return Attachment("audio", {"audio": files.sound_bytes(noise, 16000)})


async def client(service, number: int, until: float, answered: list) -> None:
    seed = number * 1_000_000
    while time.monotonic() < until:
        seed += 1
        kind = "image" if seed % 2 else "audio"
        # the client's own files are made in a thread: made on the loop, they would count as its lag
        chat = Chat([Turn("user", "What is this?", [await asyncio.to_thread(attachment, kind, seed)])])
        prepared = await service.prepare(chat, 8)
        async for _ in service.generate(Generation(prepared), Sampling(max_tokens=8)):
            pass
        answered.append(kind)


async def ticker(lags: list[float], tick_s: float = 0.001) -> None:
    loop = asyncio.get_running_loop()
    while True:
        due = loop.time() + tick_s
        await asyncio.sleep(tick_s)
        lags.append(max(0.0, loop.time() - due))


async def measure(service, chats: int, seconds: float) -> tuple[list[float], list[str]]:
    lags, answered = [], []
    tick = asyncio.create_task(ticker(lags))
    until = time.monotonic() + seconds
    # with no clients it measures what the machine alone costs the loop (other processes, the OS)
    await asyncio.gather(asyncio.sleep(seconds), *(client(service, n, until, answered) for n in range(chats)))
    tick.cancel()
    return lags, answered


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", default="model_repo/tiny", help="the model folder whose tokenizer is used")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--chats", type=int, default=4, help="clients asking at once")
    parser.add_argument("--seconds", type=float, default=60)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = model_of_7b_shapes(Path(args.tiny), args.dtype)
    standin = StandInVLLM()
    service = chat_service_for(Settings(preprocess_workers=2, prefix_cache_mb=0), model,
                               VLLMEngine(standin.url, dtype=model.dtype), Metrics())
    asyncio.run(measure(service, 1, 1))  # warm-up: the first batch of each kind allocates
    # as the gateway does: a full collection walking torch's objects would stop the loop for 0.2 s
    gc.collect()
    gc.freeze()
    lags, answered = asyncio.run(measure(service, args.chats, args.seconds))
    gc.unfreeze()  # so that they are freed at exit as usual
    service.close()
    standin.stop()
    lags.sort()
    ms = {name: 1000 * lags[min(len(lags) - 1, int(q * len(lags)))] for name, q in
          (("median", 0.5), ("p99", 0.99), ("worst", 1.0))}
    print(json.dumps({"server": str(Path(server.__file__).parent), "dtype": str(model.dtype), "chats": args.chats,
                      "seconds": args.seconds, "ticks": len(lags), "answered": {k: answered.count(k) for k in
                      ("image", "audio")}, "lag_ms": {k: round(v, 2) for k, v in ms.items()}}))


if __name__ == "__main__":
    main()
