"""`onellm convert`: a OneLLM checkpoint -> a model folder (see model_repo/README.md).

Reads the flat `llma.*` state dict memory-mapped and writes it tensor by tensor, so the
16 GB OneLLM-7B checkpoint converts on a machine with less memory than twice its size.
"""

import argparse
import math
import shutil
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from server.tools import llm_folder
from server.tools.checkpoint import (CHECKPOINT_FILE, ConvertError, count_indexed, download, load_checkpoint,
                                     load_params, modalities_in, validate)

FORMAT = "onellm-serve/1"
# The UPM's head count is fixed in OneLLM's code, whatever the width; no tensor shows it.
UPM_HEADS = 16
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
PROMPT = {
    "template": "v1",
    "system": "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions.",
    "roles": ["Human", "Assistant"],
    "stop": ["###"],
}
PREPROCESS = {
    "clip_mean": [0.48145466, 0.4578275, 0.40821073],
    "clip_std": [0.26862954, 0.26130258, 0.27577711],
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=Path, help=f"a OneLLM {CHECKPOINT_FILE}")
    source.add_argument("--from-hub", metavar="REPO", help="download the checkpoint from the Hub (csuhan/OneLLM-7B)")
    parser.add_argument("--params", type=Path, help="LLaMA params.json (default: LLaMA-2-7B's)")
    parser.add_argument("--tokenizer", type=Path,
                        help="LLaMA-2 tokenizer.model (with --from-hub: default the repo's, if it has one)")
    parser.add_argument("--clip-heads", type=int, default=16, help="CLIP attention heads: no tensor shows them")
    parser.add_argument("--out", type=Path, required=True, help="model folder to write, e.g. model_repo/onellm-7b")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype of the written weights")
    parser.add_argument("--name", help="model name (default: the folder's name)")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")


def run(args: argparse.Namespace) -> int:
    try:
        if args.from_hub:
            checkpoint, tokenizer = download(args.from_hub, args.tokenizer)
        elif args.tokenizer is None:
            raise ConvertError("--tokenizer is required with --checkpoint")
        else:
            checkpoint, tokenizer = args.checkpoint, args.tokenizer
        out = convert(checkpoint, args.params, tokenizer, args.out, clip_heads=args.clip_heads, dtype=args.dtype,
                      name=args.name, source=args.from_hub, force=args.force)
    except ConvertError as error:
        print(f"onellm convert: error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


def convert(
    checkpoint: str | Path,
    params: Mapping | str | Path | None,
    tokenizer: str | Path,
    out: str | Path,
    clip_heads: int = 16,
    dtype: str = "float32",
    name: str | None = None,
    source: str | None = None,
    force: bool = False,
    random_weights: bool = False,
) -> Path:
    """Convert a OneLLM checkpoint into the model folder `out`; returns `out`.

    `params` is a params.json path, its contents, or None for LLaMA-2-7B's. The folder is
    built beside `out` and moved into place only when complete.
    """
    checkpoint, tokenizer, out = Path(checkpoint), Path(tokenizer), Path(out)
    params = load_params(params)
    if dtype not in DTYPES:
        raise ConvertError(f"unknown dtype {dtype!r} (one of {', '.join(DTYPES)})")
    if out.exists() and not force:
        raise ConvertError(f"{out} already exists (pass --force to replace it)")
    if not tokenizer.is_file():
        raise ConvertError(f"tokenizer {tokenizer} not found")
    weights = load_checkpoint(checkpoint)
    validate(weights, params, checkpoint)
    config = model_config(weights, params, tokenizer, clip_heads, dtype)
    config = {"format": FORMAT, "name": name or out.name, "source": source or str(checkpoint.resolve()),
              "random_weights": random_weights, **config}

    out.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        write_folder(partial, weights, config, tokenizer)
        make_readable(partial)
        if out.exists():
            shutil.rmtree(out)
        partial.rename(out)
    except OSError as error:  # a full disk, mostly: the real model writes ~30 GB in float32
        raise ConvertError(f"writing {out} failed: {error}") from error
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return out


def make_readable(folder: Path) -> None:
    """World-readable like any download (a serving container may run as another user): mkdtemp
    and safetensors create owner-only entries."""
    folder.chmod(0o755)
    for path in folder.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)


def model_config(weights: Mapping[str, torch.Tensor], params: dict, tokenizer: Path, clip_heads: int,
                 dtype: str) -> dict:
    """model.json's sizes, read off the tensors and params."""
    vocab_size, dim = weights["tok_embeddings.weight"].shape
    width = weights["clip.visual.class_embedding"].shape[0]
    if clip_heads <= 0 or width % clip_heads:
        raise ConvertError(f"--clip-heads {clip_heads} does not divide the CLIP width {width}")
    patch = weights["clip.visual.conv1.weight"].shape[-1]
    grid = math.isqrt(weights["clip.visual.positional_embedding"].shape[0] - 1)
    modalities = modalities_in(weights)
    try:
        bos_id, eos_id, pieces = tokenizer_info(tokenizer)
    except ValueError as error:
        raise ConvertError(f"tokenizer {tokenizer}: {error}") from error
    if pieces != vocab_size:
        raise ConvertError(f"tokenizer {tokenizer} has {pieces} pieces but the checkpoint has {vocab_size} tokens")
    return {
        "dtype": dtype,
        "encoder": {
            "width": width,
            "clip_layers": count_indexed(weights, "clip.visual.transformer.resblocks."),
            "clip_heads": clip_heads,
            "clip_patch": patch,
            "image_size": grid * patch,
            "upm_experts": count_indexed(weights, "resample_layers."),
            "upm_blocks": count_indexed(weights, "resample_layers.0."),
            "upm_heads": UPM_HEADS,
            "prefix_tokens": weights[f"resample_tokens.{modalities[0]}"].shape[1],
            "norm_eps": params["norm_eps"],
        },
        "llm": {
            "dim": dim,
            "n_layers": params["n_layers"],
            "n_heads": params["n_heads"],
            "vocab_size": vocab_size,
            "max_positions": llm_folder.MAX_POSITIONS,
            "bos_id": bos_id,
            "eos_id": eos_id,
            "norm_eps": params["norm_eps"],
            "ffn_hidden": weights["layers.0.feed_forward.w1.weight"].shape[0],
        },
        "modalities": modalities,
        "prompt": PROMPT,
        "preprocess": PREPROCESS,
    }


def tokenizer_info(tokenizer: Path) -> tuple[int, int, int]:
    """(bos_id, eos_id, number of pieces); ValueError if it is not a LLaMA-style SentencePiece model."""
    try:
        proto = llm_folder.read_spm(tokenizer)
    except Exception as error:  # protobuf's DecodeError and friends
        raise ValueError("not a SentencePiece model") from error
    llm_folder.check_llama_style(proto)
    return proto.trainer_spec.bos_id, proto.trainer_spec.eos_id, len(proto.pieces)


def is_encoder_key(key: str) -> bool:
    """Everything but the LLaMA decoder (whose embeddings stay: prompt assembly needs them) and CLIP's text tower."""
    is_decoder = key.startswith("layers.") or key in ("norm.weight", "output.weight")
    is_text_tower = key.startswith("clip.") and not key.startswith("clip.visual.")
    return not (is_decoder or is_text_tower)


def write_folder(folder: Path, weights: Mapping[str, torch.Tensor], config: dict, tokenizer: Path) -> None:
    dtype, llm = DTYPES[config["dtype"]], config["llm"]
    encoder_keys = [key for key in weights if is_encoder_key(key)]
    llm_dir = folder / "llm"
    llm_dir.mkdir()
    total = len(encoder_keys) + len(llm_folder.llm_keys(llm["n_layers"]))
    with tqdm(total=total, unit="tensor", desc=f"converting {config['name']}") as bar:
        encoder = {key: weights[key].to(dtype).contiguous() for key in encoder_keys}
        save_file(encoder, folder / "encoder.safetensors", metadata={"format": "pt"})
        bar.update(len(encoder))
        del encoder
        llm_folder.write_weights(llm_dir, weights, llm["n_layers"], llm["n_heads"], dtype, advance=bar.update)
    llm_folder.write_tokenizer(tokenizer, llm_dir)
    hf = llm_folder.hf_config(dim=llm["dim"], n_layers=llm["n_layers"], n_heads=llm["n_heads"],
                              ffn_hidden=llm["ffn_hidden"], vocab_size=llm["vocab_size"], norm_eps=llm["norm_eps"],
                              bos_id=llm["bos_id"], eos_id=llm["eos_id"], dtype=dtype)
    llm_folder.write_json(llm_dir / "config.json", hf)
    llm_folder.write_generation_config(llm_dir, llm["bos_id"], llm["eos_id"])
    llm_folder.write_json(folder / "model.json", config)
