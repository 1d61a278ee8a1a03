"""`onellm quantize`: a model folder's `llm/` -> `llm-<type>.gguf`, the LLM with weight-only
quantized matrices for the embedded engine's llama.cpp path (server/engines/llamacpp.py).

llama.cpp was measured against torch's own int8/int4 CPU kernels at LLaMA-2-7B's shapes on this
project's CPU (docs/benchmarks.md, "Quantized weights"): its decode reads the weights at close to the
machine's bandwidth, torch's kernels at half of it or less, so the quantized path is llama.cpp's.
The file is written tensor by tensor (one tensor in memory at a time), so OneLLM-7B quantizes on a
machine with less memory than its float32 weights.
"""

import argparse
import json
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import sentencepiece as spm
import torch
from safetensors import safe_open
from tqdm import tqdm

from server.tools import q4_k

# weight-only types of the matrices: Q8_0 and Q4_0 are llama.cpp's plain formats (32 weights share a
# float16 scale), Q4_K its 4.5-bit one of 256-weight blocks with 6-bit scales and mins (server/tools/q4_k.py)
TYPES = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0,
         "q4_k": gguf.GGMLQuantizationType.Q4_K}
FILE_TYPES = {"q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
              "q4_k": gguf.LlamaFileType.MOSTLY_Q4_K_S}
F32 = gguf.GGMLQuantizationType.F32
# a matrix whose rows are no whole number of a type's blocks (only in small test models: OneLLM-7B's
# 4096 and 11008 are multiples of 256) keeps 4 bits in Q4_0's blocks of 32
NARROW = gguf.GGMLQuantizationType.Q4_0

HF_BLOCK = {  # Hugging Face name after `model.layers.{i}.` -> GGUF name after `blk.{i}.`
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
HF_TOP = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
          "lm_head.weight": "output.weight"}


class QuantizeError(Exception):
    pass


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, required=True, help="model folder (with llm/), e.g. model_repo/onellm-7b")
    parser.add_argument("--type", choices=TYPES, default="q4_k",
                        help="weight type of the matrices (default %(default)s: the fastest decode measured)")
    parser.add_argument("--force", action="store_true", help="replace the file if it exists")


def run(args: argparse.Namespace) -> int:
    try:
        out = quantize(args.model, args.type, force=args.force)
    except QuantizeError as error:
        print(f"onellm quantize: error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


def gguf_path(model_dir: Path, weight_type: str) -> Path:
    return Path(model_dir) / f"llm-{weight_type}.gguf"


@dataclass(frozen=True)
class Planned:
    gguf_name: str
    hf_name: str
    shape: tuple[int, ...]  # [out, in] for matrices, [dim] for norms
    qtype: gguf.GGMLQuantizationType


def quantize(model_dir: str | Path, weight_type: str, force: bool = False, out: Path | None = None) -> Path:
    """Writes `<model_dir>/llm-<weight_type>.gguf` (or `out`) from `<model_dir>/llm/`; returns its path."""
    llm = Path(model_dir) / "llm"
    if not (llm / "config.json").is_file():
        raise QuantizeError(f"{llm} is not an LLM folder (no config.json): convert the model first")
    out = out or gguf_path(model_dir, weight_type)
    if out.exists() and not force:
        raise QuantizeError(f"{out} already exists (pass --force to replace it)")
    config = json.loads((llm / "config.json").read_text())
    files = weight_files(llm)
    check_quantizable(config, files)
    partial = out.with_name(f".{out.name}.partial")
    try:
        write_gguf(partial, config, llm / "tokenizer.model", weight_type, lambda name: read_tensor(files, name))
        partial.rename(out)
    except OSError as error:  # a full disk, mostly: OneLLM-7B's q8_0 file is 7 GB
        raise QuantizeError(f"writing {out} failed: {error}") from error
    finally:
        partial.unlink(missing_ok=True)
    return out


def write_gguf(out: Path, config: dict, tokenizer: Path, weight_type: str,
               tensor_of: Callable[[str], torch.Tensor]) -> None:
    """The GGUF file of the LLM whose Hugging Face config is `config`, reading each tensor by its
    Hugging Face name from `tensor_of` when it is written."""
    plan = list(tensor_plan(config, weight_type))
    writer = gguf.GGUFWriter(out, "llama")
    add_metadata(writer, config, weight_type, tokenizer)
    for p in plan:  # the header lists every tensor's size before the first is written
        if p.qtype == F32:
            writer.add_tensor_info(p.gguf_name, p.shape, np.float32, 4 * int(np.prod(p.shape)), raw_dtype=F32)
        else:
            byte_shape = gguf.quant_shape_to_byte_shape(p.shape, p.qtype)
            writer.add_tensor_info(p.gguf_name, byte_shape, np.uint8, int(np.prod(byte_shape)), raw_dtype=p.qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads", heads)
    for p in tqdm(plan, desc=f"quantizing to {weight_type}", unit="tensor", file=sys.stderr):
        weights = tensor_of(p.hf_name).float()
        if p.gguf_name.endswith("attn_q.weight"):
            weights = meta_rope_layout(weights, heads)
        elif p.gguf_name.endswith("attn_k.weight"):
            weights = meta_rope_layout(weights, kv_heads)
        writer.write_tensor_data(encode(weights.numpy(), p.qtype))
    writer.close()


def encode(data: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    if qtype == F32:
        return data
    if qtype == gguf.GGMLQuantizationType.Q4_K:
        return q4_k.quantize(data)
    return gguf.quants.quantize(data, qtype)


def weight_files(llm: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it (one file, or shards and their index)."""
    index = llm / "model.safetensors.index.json"
    if index.is_file():
        return {name: llm / file for name, file in json.loads(index.read_text())["weight_map"].items()}
    single = llm / "model.safetensors"
    if not single.is_file():
        raise QuantizeError(f"{llm} has no model.safetensors")
    with safe_open(single, "pt") as f:
        return dict.fromkeys(f.keys(), single)


def read_tensor(files: dict[str, Path], name: str) -> torch.Tensor:
    with safe_open(files[name], "pt") as f:
        return f.get_tensor(name)


def tensor_plan(config: dict, weight_type: str) -> Iterator[Planned]:
    """Every tensor of the file in llama.cpp's names and order, with its type and logical shape."""
    dim, hidden, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    kv_dim = dim // config["num_attention_heads"] * config.get("num_key_value_heads", config["num_attention_heads"])
    shapes = {"attn_norm.weight": (dim,), "ffn_norm.weight": (dim,), "attn_q.weight": (dim, dim),
              "attn_k.weight": (kv_dim, dim), "attn_v.weight": (kv_dim, dim), "attn_output.weight": (dim, dim),
              "ffn_gate.weight": (hidden, dim), "ffn_up.weight": (hidden, dim), "ffn_down.weight": (dim, hidden)}
    matrix_type = TYPES[weight_type]
    block = gguf.GGML_QUANT_SIZES[matrix_type][0]
    # the tensors whose errors every token meets (its embedding, the logits) keep 8 bits in 4-bit
    # files too, as llama.cpp's own 4-bit recipes keep them wider
    yield Planned("token_embd.weight", "model.embed_tokens.weight", (vocab, dim), TYPES["q8_0"])
    for i in range(config["num_hidden_layers"]):
        for hf, name in HF_BLOCK.items():
            shape = shapes[name]
            yield Planned(f"blk.{i}.{name}", f"model.layers.{i}.{hf}", shape,
                          F32 if len(shape) == 1 else matrix_type if shape[1] % block == 0 else NARROW)
    yield Planned("output_norm.weight", "model.norm.weight", (dim,), F32)
    yield Planned("output.weight", "lm_head.weight", (vocab, dim), TYPES["q8_0"])


def check_quantizable(config: dict, files: dict[str, Path]) -> None:
    block = gguf.GGML_QUANT_SIZES[NARROW][0]  # 32: the narrowest blocks a matrix may take
    dim, hidden = config["hidden_size"], config["intermediate_size"]
    if dim % block or hidden % block:
        raise QuantizeError(f"quantized blocks need widths that are multiples of {block} (width {dim}, hidden {hidden})")
    names = [*HF_TOP, *(f"model.layers.{i}.{hf}" for i in range(config["num_hidden_layers"]) for hf in HF_BLOCK)]
    if missing := [name for name in names if name not in files]:
        raise QuantizeError(f"the LLM folder lacks {missing[0]}" + (f" and {len(missing) - 1} more" if missing[1:] else ""))


def meta_rope_layout(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of wq/wk from Hugging Face's rotate-half RoPE layout back to Meta's interleaved pairs,
    which llama.cpp's LLaMA rotates (the inverse of llm_folder.permute_rope)."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def add_metadata(writer: gguf.GGUFWriter, config: dict, weight_type: str, tokenizer: Path) -> None:
    heads = config["num_attention_heads"]
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.get("num_key_value_heads", heads))
    writer.add_rope_dimension_count(config["hidden_size"] // heads)
    writer.add_rope_freq_base(config.get("rope_theta", 10000.0))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type(FILE_TYPES[weight_type])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_vocab(writer, tokenizer, config)


def add_vocab(writer: gguf.GGUFWriter, tokenizer: Path, config: dict) -> None:
    """The SentencePiece vocabulary: llama.cpp loads one with every model, though the gateway
    tokenizes and detokenizes with its own."""
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    pieces = range(sp.get_piece_size())
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([sp.id_to_piece(i).encode() for i in pieces])
    writer.add_token_scores([sp.get_score(i) for i in pieces])
    writer.add_token_types([token_type(sp, i) for i in pieces])
    writer.add_bos_token_id(config["bos_token_id"])
    writer.add_eos_token_id(config["eos_token_id"])
    writer.add_unk_token_id(sp.unk_id())
    writer.add_add_bos_token(False)  # the prompt arrives as embeddings, never as text


def token_type(sp: spm.SentencePieceProcessor, i: int) -> gguf.TokenType:
    if sp.is_unknown(i):
        return gguf.TokenType.UNKNOWN
    if sp.is_control(i):
        return gguf.TokenType.CONTROL
    if sp.is_byte(i):
        return gguf.TokenType.BYTE
    if sp.is_unused(i):
        return gguf.TokenType.UNUSED
    return gguf.TokenType.NORMAL
