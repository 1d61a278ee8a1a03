"""The `llm/` part of a model folder: a Hugging Face LLaMA folder made from Meta-layout weights.

`transformers.LlamaForCausalLM` and vLLM load the result unchanged: config.json,
generation_config.json, model.safetensors (or shards plus an index) and the tokenizer files.
"""

import json
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file
from sentencepiece import sentencepiece_model_pb2
from tokenizers import Tokenizer, decoders, normalizers, processors
from tokenizers.models import BPE

MAX_POSITIONS = 2048
ROPE_THETA = 10000.0
# Hugging Face's customary shard size; converting holds about one shard in memory at a time.
SHARD_BYTES = 5 * 1024**3

# Meta name (after `layers.{i}.`) -> Hugging Face name (after `model.layers.{i}.`)
BLOCK_NAMES = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
TOP_NAMES = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# SentencePiece piece types (sentencepiece_model.proto)
NORMAL, USER_DEFINED = 1, 4
SPM_BPE = 2


def llm_keys(n_layers: int) -> list[str]:
    """Every Meta-layout decoder key (without `llma.`), in the order the HF folder stores them."""
    blocks = [f"layers.{i}.{name}" for i in range(n_layers) for name in BLOCK_NAMES]
    return ["tok_embeddings.weight", *blocks, "norm.weight", "output.weight"]


def hf_name(meta_name: str) -> str:
    if meta_name in TOP_NAMES:
        return TOP_NAMES[meta_name]
    _, index, rest = meta_name.split(".", 2)
    return f"model.layers.{index}.{BLOCK_NAMES[rest]}"


def permute_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder the rows of wq/wk from Meta's interleaved RoPE pairs to HF's rotate-half layout.

    Meta rotates rows (2i, 2i+1) of each head together; HF rotates rows (i, i + head_dim/2).
    """
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def hf_tensor(meta_name: str, w: torch.Tensor, n_heads: int, dtype: torch.dtype) -> torch.Tensor:
    if meta_name.endswith(("attention.wq.weight", "attention.wk.weight")):
        w = permute_rope(w, n_heads)
    return w.to(dtype).contiguous()


def hf_config(
    *, dim: int, n_layers: int, n_heads: int, ffn_hidden: int, vocab_size: int, norm_eps: float,
    bos_id: int, eos_id: int, dtype: torch.dtype,
) -> dict:
    # The classic (transformers 4.x) spelling: transformers 5 and vLLM read it too.
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": dim,
        "intermediate_size": ffn_hidden,
        "num_hidden_layers": n_layers,
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_heads,
        "head_dim": dim // n_heads,
        "hidden_act": "silu",
        "rms_norm_eps": norm_eps,
        "max_position_embeddings": MAX_POSITIONS,
        "rope_theta": ROPE_THETA,
        "rope_scaling": None,
        "vocab_size": vocab_size,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def plan_shards(sizes: dict[str, int], limit: int = SHARD_BYTES) -> list[list[str]]:
    """Group names, in order, into shards of at most `limit` bytes (a bigger tensor gets its own)."""
    shards, current, current_bytes = [], [], 0
    for name, size in sizes.items():
        if current and current_bytes + size > limit:
            shards.append(current)
            current, current_bytes = [], 0
        current.append(name)
        current_bytes += size
    return shards + [current] if current else shards


def write_weights(
    llm_dir: Path, weights: Mapping[str, torch.Tensor], n_layers: int, n_heads: int, dtype: torch.dtype,
    advance: Callable[[int], object] = lambda n: None, shard_bytes: int = SHARD_BYTES,
) -> None:
    """Write the decoder as model.safetensors, or as shards with an index as HF does past `shard_bytes`.

    `weights` maps Meta names to tensors (typically memory-mapped); each is converted only when
    its shard is written, so memory holds about one shard.
    """
    element = torch.empty((), dtype=dtype).element_size()
    sizes = {name: weights[name].numel() * element for name in llm_keys(n_layers)}
    shards = plan_shards(sizes, shard_bytes)
    files = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    weight_map = {}
    for names, file in zip(shards, files):
        tensors = {hf_name(name): hf_tensor(name, weights[name], n_heads, dtype) for name in names}
        save_file(tensors, llm_dir / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))
        advance(len(names))
        del tensors  # before the next shard is built, or two would be in memory at once
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
        write_json(llm_dir / "model.safetensors.index.json", index)


def read_spm(model_file: Path) -> sentencepiece_model_pb2.ModelProto:
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(model_file).read_bytes())
    return proto


def check_llama_style(proto: sentencepiece_model_pb2.ModelProto) -> None:
    """Refuse tokenizers whose SentencePiece settings `build_hf_tokenizer` does not reproduce."""
    trainer, norm = proto.trainer_spec, proto.normalizer_spec
    problems = {
        "model type is not BPE": trainer.model_type != SPM_BPE,
        "it has user-defined pieces": any(p.type == USER_DEFINED for p in proto.pieces),
        "it normalizes text (precompiled charsmap)": bool(norm.precompiled_charsmap),
        "it removes extra whitespace": norm.remove_extra_whitespaces,
        "it does not add a dummy prefix": not norm.add_dummy_prefix,
        "it does not escape whitespace": not norm.escape_whitespaces,
        "it treats whitespace as a suffix": trainer.treat_whitespace_as_suffix,
        "it has no byte fallback": not trainer.byte_fallback,
    }
    found = [problem for problem, present in problems.items() if present]
    if found:
        raise ValueError(f"unsupported SentencePiece model (not LLaMA-style): {'; '.join(found)}")


def bpe_merges(proto: sentencepiece_model_pb2.ModelProto) -> list[tuple[str, str]]:
    """Merges that make HF's rank-ordered BPE behave like SentencePiece's score-ordered BPE.

    SentencePiece merges the adjacent pair whose concatenation is the best-scoring piece; ranking
    every (left, right) split of each piece by that piece's score (then id) reproduces it.
    """
    normal = {p.piece: (p.score, i) for i, p in enumerate(proto.pieces) if p.type == NORMAL}
    ranked = []
    for piece, (score, index) in normal.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                ranked.append((-score, index, left, right))
    return [(left, right) for _, _, left, right in sorted(ranked)]


def build_hf_tokenizer(model_file: Path) -> Tokenizer:
    """A `tokenizers` BPE tokenizer that encodes and decodes like the SentencePiece model.

    SentencePiece (LLaMA-style) prefixes one space, turns every space into "▁" and never splits
    the text into words first; the normalizer below does exactly that, with no pre-tokenizer.
    (Metaspace would skip the prefix when the text already starts with a space, which
    SentencePiece does not.)
    """
    proto = read_spm(model_file)
    check_llama_style(proto)
    trainer = proto.trainer_spec
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    model = BPE(vocab=vocab, merges=bpe_merges(proto), unk_token=trainer.unk_piece, fuse_unk=True, byte_fallback=True)
    tokenizer = Tokenizer(model)
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    bos = trainer.bos_piece
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, trainer.bos_id)]
    )
    return tokenizer


def write_tokenizer(model_file: Path, llm_dir: Path) -> tuple[int, int]:
    """Copy tokenizer.model and write its HF equivalent; returns (bos_id, eos_id)."""
    trainer = read_spm(model_file).trainer_spec
    shutil.copyfile(model_file, llm_dir / "tokenizer.model")
    build_hf_tokenizer(model_file).save(str(llm_dir / "tokenizer.json"))
    special = {"bos_token": trainer.bos_piece, "eos_token": trainer.eos_piece, "unk_token": trainer.unk_piece}
    write_json(llm_dir / "special_tokens_map.json", special)
    write_json(
        llm_dir / "tokenizer_config.json",
        {
            # Not LlamaTokenizer: transformers 5 rebuilds its pipeline from scratch (ignoring
            # tokenizer.json's) and then encodes leading spaces unlike SentencePiece.
            "tokenizer_class": "PreTrainedTokenizerFast",
            **special,
            "add_bos_token": True,
            "add_eos_token": False,
            # No `split_special_tokens`: vLLM registers a special token for prompt embeddings and
            # needs it to encode as one id. So, like any HF LLaMA tokenizer (and unlike
            # SentencePiece), this one reads "<s>" typed in a text as the control token.
            "clean_up_tokenization_spaces": False,
            "model_max_length": MAX_POSITIONS,
        },
    )
    return trainer.bos_id, trainer.eos_id


def write_generation_config(llm_dir: Path, bos_id: int, eos_id: int) -> None:
    # No sampling defaults: vLLM would adopt them over the server's own.
    write_json(llm_dir / "generation_config.json", {"bos_token_id": bos_id, "eos_token_id": eos_id})


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")
