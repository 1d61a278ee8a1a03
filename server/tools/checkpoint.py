"""A OneLLM checkpoint: where it comes from (a file, or the Hub), the keys it must hold, and
its tensors read memory-mapped."""

import json
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch

from server.tools import llm_folder

CHECKPOINT_FILE = "consolidated.00-of-01.pth"
# LLaMA-2-7B's params.json, which OneLLM-7B uses
DEFAULT_PARAMS = {"dim": 4096, "multiple_of": 256, "n_heads": 32, "n_layers": 32, "norm_eps": 1e-05, "vocab_size": -1}
MODALITIES = ("image", "video", "audio", "point", "rgbd", "rgbn", "fmri", "imu")

BLOCK_KEYS = list(llm_folder.BLOCK_NAMES)  # a LLaMA block: the decoder's and each UPM expert's
CLIP_KEYS = ["class_embedding", "positional_embedding", "conv1.weight", "ln_pre.weight", "ln_pre.bias",
             "ln_post.weight", "ln_post.bias"]
CLIP_BLOCK_KEYS = ["ln_1.weight", "ln_1.bias", "attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight",
                   "attn.out_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
                   "mlp.c_proj.weight", "mlp.c_proj.bias"]
# per modality m: format with m=...
MODALITY_KEYS = [
    "resample_tokens.{m}", "start_tag.{m}", "end_tag.{m}",
    *(f"{proj}.{{m}}.{i}.{p}" for proj in ("clip_proj1", "clip_proj2") for i in (0, 1) for p in ("weight", "bias")),
    *(f"routers.{{m}}.{fc}.{p}" for fc in ("fc1", "fc2") for p in ("weight", "bias")),
]
# The modality tokenizers that are not CLIP's conv1
INPUT_KEYS = {
    "audio": ["conv1.audio.weight", "conv1.audio.bias", "positional_embedding.audio"],
    "point": ["conv1.point.conv1.weight", "conv1.point.conv1.bias", "positional_embedding.point"],
    "imu": ["conv1.imu.weight", "positional_embedding.imu"],
    "fmri": ["conv1.fmri.weight", "conv1.fmri.bias", "positional_embedding.fmri"],
}


class ConvertError(Exception):
    """A problem with the inputs; the CLI reports it as one line, without a traceback."""


def download(repo: str, tokenizer: Path | None) -> tuple[Path, Path]:
    """The checkpoint (and tokenizer.model unless given) from a Hub repo, with the Hub's progress bars."""
    from huggingface_hub import hf_hub_download

    def fetch(filename: str, hint: str = "") -> Path:
        try:
            return Path(hf_hub_download(repo, filename))
        except Exception as error:  # network, auth, missing repo or file: all reported alike
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise ConvertError(f"could not download {filename} from {repo} ({reason}){hint}") from error

    checkpoint = fetch(CHECKPOINT_FILE)
    return checkpoint, tokenizer or fetch("tokenizer.model", ": pass LLaMA-2's tokenizer.model with --tokenizer")


def load_params(params: Mapping | str | Path | None) -> dict:
    if params is None:
        return dict(DEFAULT_PARAMS)
    if isinstance(params, Mapping):
        loaded = dict(params)
    else:
        try:
            loaded = json.loads(Path(params).read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise ConvertError(f"cannot read params {params}: {error}") from error
    missing = [key for key in ("dim", "n_layers", "n_heads", "norm_eps") if key not in loaded]
    if missing:
        raise ConvertError(f"params {params} lack {', '.join(missing)}")
    return loaded


def load_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors without their `llma.` prefix, memory-mapped."""
    if not path.is_file():
        raise ConvertError(f"checkpoint {path} not found")
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except PermissionError as error:
        raise ConvertError(f"cannot read checkpoint {path}: {error.strerror}") from error
    except (OSError, RuntimeError, pickle.UnpicklingError, EOFError, ValueError, zipfile.BadZipFile) as error:
        reason = str(error).strip().split(". ")[0] or type(error).__name__  # torch's messages run on
        raise ConvertError(
            f"checkpoint {path} is truncated or corrupt, or not a PyTorch checkpoint ({reason})"
        ) from error
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConvertError(f"checkpoint {path} is not a OneLLM checkpoint: expected a flat state dict of tensors")
    return {key.removeprefix("llma."): value for key, value in state.items() if key.startswith("llma.")}


def count_indexed(weights: Mapping[str, torch.Tensor], prefix: str) -> int:
    """How many `{prefix}{i}.` groups there are (max index + 1; gaps surface as missing keys)."""
    parts = (key[len(prefix):].split(".")[0] for key in weights if key.startswith(prefix))
    indices = {int(part) for part in parts if part.isdigit()}
    return max(indices) + 1 if indices else 0


def modalities_in(weights: Mapping[str, torch.Tensor]) -> list[str]:
    return [m for m in MODALITIES if f"resample_tokens.{m}" in weights]


def required_keys(weights: Mapping[str, torch.Tensor], n_layers: int) -> list[str]:
    """Every key a OneLLM checkpoint with these layer counts and modalities must hold."""
    keys = llm_folder.llm_keys(n_layers)
    keys += [f"clip.visual.{k}" for k in CLIP_KEYS]
    clip_layers = max(1, count_indexed(weights, "clip.visual.transformer.resblocks."))
    keys += [f"clip.visual.transformer.resblocks.{i}.{k}" for i in range(clip_layers) for k in CLIP_BLOCK_KEYS]
    experts = max(1, count_indexed(weights, "resample_layers."))
    blocks = max(1, count_indexed(weights, "resample_layers.0."))
    keys += [f"resample_layers.{e}.{b}.{k}" for e in range(experts) for b in range(blocks) for k in BLOCK_KEYS]
    for m in modalities_in(weights) or MODALITIES[:1]:
        keys += [k.format(m=m) for k in MODALITY_KEYS] + INPUT_KEYS.get(m, [])
    return keys


def validate(weights: Mapping[str, torch.Tensor], params: dict, checkpoint: Path) -> None:
    missing = [key for key in required_keys(weights, params["n_layers"]) if key not in weights]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ConvertError(f"checkpoint {checkpoint} is not a OneLLM checkpoint: missing key 'llma.{missing[0]}'{more}")
    vocab_size, dim = weights["tok_embeddings.weight"].shape
    if dim != params["dim"]:
        raise ConvertError(f"params say dim={params['dim']} but the checkpoint's LLM width is {dim}: wrong --params?")
    if count_indexed(weights, "layers.") != params["n_layers"]:
        raise ConvertError(f"params say n_layers={params['n_layers']} but the checkpoint has "
                           f"{count_indexed(weights, 'layers.')} decoder layers: wrong --params?")
    if dim % params["n_heads"] or (dim // params["n_heads"]) % 2:
        raise ConvertError(f"params: dim={dim} does not split into {params['n_heads']} heads of even size")
    if params.get("vocab_size", -1) > 0 and params["vocab_size"] != vocab_size:
        raise ConvertError(f"params say vocab_size={params['vocab_size']} but the checkpoint has {vocab_size} tokens")


