"""OneLLM-7B served on a CPU as a user serves it: `onellm serve` in a process of its own on a model
folder of OneLLM-7B's shapes (random weights) with its LLM quantized, and image questions over HTTP.
Reports each answer's time to its first token and end to end, and the server's peak memory (VmHWM):
what a host needs to serve the model. The questions are: the README's image question (the first
one on a cold server), the same again (its prefix cached), the chat's next turn, then questions
about new images (noise, nothing of theirs cached): a warm server's usual case.

    uv run --extra llamacpp python bench/realsize_serve.py --scratch /tmp/onellm-7b \\
        --tokenizer ../shared/fixtures/onellm-ref-tiny/tokenizer.model --out docs/bench-realsize-serve.json
    uv run python bench/realsize_serve.py --model model_repo/tiny        # a model folder as it is

The 7B folder is made once in --scratch: `onellm convert` of a random checkpoint with OneLLM-7B's
encoder and LLM embedding table and one LLM block (its 32 would be 13 GB written only to be quantized),
and beside it the GGUF file of LLaMA-2-7B's shapes that bench/quantized.py writes with `onellm
quantize`'s writer (served by default on a CPU, as `onellm quantize` output is).
"""

import argparse
import base64
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
from gateway_process import GatewayProcess  # noqa: E402
from peak_memory import peak_bytes  # noqa: E402
from scraped_metrics import total  # noqa: E402

IMAGE = REPO.parent / "shared" / "fixtures" / "preprocess-ref" / "inputs" / "room.jpg"
QUESTION = "What is in this image?"  # the README's
FOLLOW_UP = "What colour are the walls?"


def seven_b_folder(scratch: Path, tokenizer: Path, weight_type: str) -> Path:
    """scratch/onellm-7b-shapes, made on the first run; a weight type it lacks is added to it."""
    folder = scratch / "onellm-7b-shapes"
    if (folder / f"llm-{weight_type}.gguf").is_file():
        return folder
    from quantized import gguf_file

    if not (folder / "model.json").is_file():
        import torch

        from server.tools.convert import convert
        from server.tools.make_tiny import random_checkpoint

        params = {"dim": 4096, "multiple_of": 256, "n_heads": 32, "n_layers": 1, "norm_eps": 1e-5, "vocab_size": 32000}
        with tempfile.TemporaryDirectory(dir=scratch) as tmp:
            checkpoint = Path(tmp) / "consolidated.00-of-01.pth"
            torch.save({k: v.half() for k, v in random_checkpoint(32000, 0, width=1024, clip_layers=24,
                                                                   params=params).items()}, checkpoint)
            convert(checkpoint, params, tokenizer, folder, dtype="float16", random_weights=True, force=True)
    (folder / f"llm-{weight_type}.gguf").hardlink_to(gguf_file(scratch, weight_type, tokenizer))
    return folder


def new_image(seed: int) -> bytes:
    """A 640×480 JPEG of noise: an image no earlier question sent."""
    pixels = np.random.default_rng(seed).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG")
    return out.getvalue()


def first_turn(image: bytes) -> list[dict]:
    return [{"role": "user", "content": [
        {"type": "text", "text": QUESTION},
        {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64," + base64.b64encode(image).decode()}},
    ]}]


STAGES = {"preprocess_s": "onellm_preprocess_seconds_sum", "encoder_s": "onellm_encoder_batch_seconds_sum"}


def answer(url: str, model: str, messages: list[dict], answer_tokens: int) -> dict:
    """One streamed answer through /v1/chat/completions, greedy, exactly answer_tokens long unless the
    model ends it (its usage says how many), with the seconds the server's /metrics add up for its
    attachments' decoding and encoder runs meanwhile (none when their prefixes are cached)."""
    stages = {key: total(url, name) for key, name in STAGES.items()}
    body = {"model": model, "stream": True, "stream_options": {"include_usage": True}, "temperature": 0,
            "max_tokens": answer_tokens, "messages": messages}
    start, first, usage, text = time.perf_counter(), None, None, ""
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line.removeprefix("data: "))
            if chunk["choices"] and (delta := chunk["choices"][0]["delta"].get("content")):
                first = first or time.perf_counter()
                text += delta
            usage = chunk.get("usage") or usage
    end = time.perf_counter()
    stages = {key: total(url, name) - stages[key] for key, name in STAGES.items()}
    return {"seconds": end - start, "first_token_s": first - start, **stages, "prompt_tokens": usage["prompt_tokens"],
            "answer_tokens": usage["completion_tokens"], "text": text}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="serve this model folder as it is (instead of the 7B one)")
    parser.add_argument("--scratch", type=Path, help="where the 7B folder is made and kept (about 7 GB)")
    parser.add_argument("--tokenizer", type=Path, default=REPO.parent / "shared/fixtures/onellm-ref-tiny/tokenizer.model",
                        help="LLaMA-2's tokenizer.model (32000 pieces), for the 7B folder")
    parser.add_argument("--weights", default="q4_k", help="the quantized LLM file the 7B folder gets and serves")
    parser.add_argument("--questions", type=int, default=3,
                        help="the same image and question each time (the first is cold), then a follow-up turn")
    parser.add_argument("--new-images", type=int, default=2, help="questions about new images, after the rest")
    parser.add_argument("--answer-tokens", type=int, default=32)
    parser.add_argument("--image", type=Path, default=IMAGE)
    parser.add_argument("--serve-args", default="", help="more `onellm serve` flags, space-separated")
    parser.add_argument("--workdir", type=Path,
                        help="the server's folder: its log (serve.log), temp and stored files (default: a new one in /tmp)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if not args.model and not args.scratch:
        parser.error("--model or --scratch is needed")

    sys.path.insert(0, str(REPO / "bench"))
    folder = args.model or seven_b_folder(args.scratch, args.tokenizer, args.weights)
    # the 7B folder keeps every type made for it, and auto would serve the first of them
    serve_args = ([] if args.model else ["--llm-weights", args.weights]) + args.serve_args.split()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="onellm-serve-"))
    server = GatewayProcess(folder, workdir, serve_args)
    started = time.perf_counter()
    server.start()
    try:
        served = httpx.get(f"{server.url}/v1/models").json()["data"][0]
        report = {"model": str(folder), "serve_args": " ".join(serve_args), "ready_s": time.perf_counter() - started,
                  "served": served, "peak_bytes_ready": peak_bytes(server.pid), "questions": []}
        turn = first_turn(args.image.read_bytes())
        for _ in range(args.questions):
            report["questions"].append(answer(server.url, served["id"], turn, args.answer_tokens))
            print(f"  image question: {report['questions'][-1]}", flush=True)
        turn += [{"role": "assistant", "content": report["questions"][-1]["text"]}, {"role": "user", "content": FOLLOW_UP}]
        report["follow_up"] = answer(server.url, served["id"], turn, args.answer_tokens)
        print(f"  the chat's next turn: {report['follow_up']}", flush=True)
        report["new_images"] = []
        for seed in range(args.new_images):
            report["new_images"].append(answer(server.url, served["id"], first_turn(new_image(seed)), args.answer_tokens))
            print(f"  a new image: {report['new_images'][-1]}", flush=True)
        report["peak_bytes"] = peak_bytes(server.pid)
    finally:
        server.stop()
    print(f"ready in {report['ready_s']:.0f} s; peak memory {report['peak_bytes'] / 2**30:.2f} GiB "
          f"({report['peak_bytes_ready'] / 2**30:.2f} when ready); log {server.log_path}")
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    return report


if __name__ == "__main__":
    main()
