"""Encoder throughput: prefixes per second for each modality and batch size (a benchmark, not a test).

    uv run python bench/encoder.py --model model_repo/tiny                     # CPU, float32
    uv run python bench/encoder.py --shapes 7b --device cuda --dtype float16   # OneLLM-7B sizes, random weights

Inputs are random tensors of each modality's preprocessed shape (ONELLM.md §4); decoding is not
timed. Prints a markdown table.
"""

import argparse
import platform
import time

import torch

from server.model.encoder import Encoder
from server.model.onellm import load_model, place

INPUT_SHAPES = {
    "image": (3, 224, 224), "video": (15, 3, 224, 224), "rgbd": (2, 3, 224, 224), "rgbn": (2, 3, 224, 224),
    "audio": (1, 128, 1024), "point": (8192, 6), "fmri": (1, 15724), "imu": (6, 400),
}
# OneLLM-7B: CLIP ViT-L/14 (W=1024, 24 blocks, 16 heads), LLaMA-2-7B width 4096, vocab 32000
SEVEN_B = {"width": 1024, "clip_layers": 24, "clip_heads": 16, "dim": 4096, "vocab": 32000}


def random_7b_encoder(seed: int = 0) -> Encoder:
    """An encoder of OneLLM-7B's shapes with random weights: the real checkpoint cannot be fetched here."""
    from server.tools.make_tiny import random_checkpoint

    params = {"dim": SEVEN_B["dim"], "multiple_of": 256, "n_heads": 32, "n_layers": 0, "norm_eps": 1e-5}
    sd = random_checkpoint(SEVEN_B["vocab"], seed, width=SEVEN_B["width"], clip_layers=SEVEN_B["clip_layers"],
                           params=params)
    weights = {k.removeprefix("llma."): v for k, v in sd.items()
               if not k.startswith("llma.clip.") or k.startswith("llma.clip.visual.")}
    weights = {k: v for k, v in weights.items() if k not in ("norm.weight", "output.weight")}
    return Encoder(weights, list(INPUT_SHAPES), SEVEN_B["clip_heads"], upm_heads=16, norm_eps=1e-5)


def prefixes_per_second(encoder: Encoder, modality: str, batch: int, device, dtype, seconds: float) -> float:
    x = torch.randn(batch, *INPUT_SHAPES[modality], device=device, dtype=dtype)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    encoder(modality, x)  # warm-up: allocations, kernels
    sync()
    runs, start = 0, time.perf_counter()
    while runs < 2 or time.perf_counter() - start < seconds:
        encoder(modality, x)
        runs += 1
    sync()
    return batch * runs / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="model_repo/tiny", help="model folder (ignored with --shapes 7b)")
    parser.add_argument("--shapes", choices=["model", "7b"], default="model")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    parser.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    parser.add_argument("--modalities", default=",".join(INPUT_SHAPES))
    parser.add_argument("--seconds", type=float, default=3.0, help="time per measurement")
    args = parser.parse_args()

    dtype = getattr(torch, args.dtype)
    encoder = (place(random_7b_encoder(), args.device, dtype) if args.shapes == "7b"
               else load_model(args.model, args.device, args.dtype).encoder)
    batches = [int(b) for b in args.batches.split(",")]
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    print(f"encoder {'OneLLM-7B shapes (random weights)' if args.shapes == '7b' else args.model}, "
          f"{args.dtype} on {args.device} ({where}), torch {torch.__version__}\n")
    print("| modality | " + " | ".join(f"batch {b} (prefixes/s)" for b in batches) + " |")
    print("|---|" + "---:|" * len(batches))
    for m in args.modalities.split(","):
        rates = [prefixes_per_second(encoder, m, b, args.device, dtype, args.seconds) for b in batches]
        print(f"| {m} | " + " | ".join(f"{r:.2f}" for r in rates) + " |", flush=True)


if __name__ == "__main__":
    main()
