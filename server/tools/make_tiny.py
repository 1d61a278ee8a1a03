"""`onellm make-tiny`: a small random-weight OneLLM model folder, built offline.

It is a real OneLLM checkpoint (all eight modalities, the reference's structure, tiny widths)
run through `onellm convert`, so it exercises the converter and everything that loads a model
folder. Its weights are random: it produces fluent-looking nonsense, never real answers.
"""

import argparse
import io
import json
import math
import sys
import tempfile
from pathlib import Path

import sentencepiece as spm
import torch

from server.tools.checkpoint import CHECKPOINT_FILE, MODALITIES, ConvertError
from server.tools.convert import convert

CORPUS = Path(__file__).parent / "data" / "tiny_corpus.txt"
VOCAB_SIZE = 1000
WIDTH = 64  # encoder width W
CLIP_LAYERS = 2
CLIP_HEADS = 2
TEXT_WIDTH = 32  # CLIP's text tower, which the converter must drop
PARAMS = {"dim": 128, "multiple_of": 256, "n_heads": 4, "n_layers": 2, "norm_eps": 1e-05, "vocab_size": -1}
# OneLLM's structure, kept at full size
UPM_EXPERTS, UPM_BLOCKS, PREFIX_TOKENS = 3, 8, 30
PATCH, IMAGE_SIZE = 14, 224
FMRI_VOXELS, FMRI_TOKENS = 15724, 8
POSITIONS = {"audio": 1213, "point": 1025, "imu": 392, "fmri": FMRI_TOKENS + 1}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("model_repo/tiny"), help="model folder to write")
    parser.add_argument("--seed", type=int, default=0, help="seed for the random weights")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")


def run(args: argparse.Namespace) -> int:
    try:
        out = make_tiny(args.out, args.seed, args.force)
    except ConvertError as error:
        print(f"onellm make-tiny: error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {out}: a tiny OneLLM with RANDOM weights; its answers are meaningless (for tests and demos only)")
    return 0


def make_tiny(out: str | Path, seed: int = 0, force: bool = False) -> Path:
    with tempfile.TemporaryDirectory(prefix="onellm-tiny-") as tmp:
        tmp = Path(tmp)
        tokenizer = tmp / "tokenizer.model"
        tokenizer.write_bytes(train_tokenizer())
        vocab_size = spm.SentencePieceProcessor(model_file=str(tokenizer)).get_piece_size()
        torch.save(random_checkpoint(vocab_size, seed), tmp / CHECKPOINT_FILE)
        (tmp / "params.json").write_text(json.dumps(PARAMS))
        return convert(tmp / CHECKPOINT_FILE, tmp / "params.json", tokenizer, out, clip_heads=CLIP_HEADS,
                       source=f"onellm make-tiny --seed {seed}", force=force, random_weights=True)


def train_tokenizer() -> bytes:
    """A LLaMA-style SentencePiece BPE model trained on the shipped corpus (deterministic)."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS.read_text().splitlines()),
        model_writer=model,
        model_type="bpe",
        vocab_size=VOCAB_SIZE,
        # LLaMA-2's settings: special ids, no normalisation, digits split, any text encodes via bytes
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        byte_fallback=True,
        character_coverage=1.0,
        num_threads=1,
        minloglevel=2,
    )
    return model.getvalue()


def ffn_hidden(dim: int, multiple_of: int) -> int:
    """LLaMA's SwiGLU width: 2/3 of 4·dim, rounded up to a multiple of `multiple_of`."""
    return multiple_of * math.ceil(int(2 * 4 * dim / 3) / multiple_of)


class RandomStateDict(dict):
    """Builds a `llma.*` state dict: weights ~ N(0, 0.02), norm scales 1, LayerNorm biases 0."""

    def __init__(self, seed: int):
        super().__init__()
        self.generator = torch.Generator().manual_seed(seed)

    def normal(self, key: str, *shape: int) -> None:
        self[f"llma.{key}"] = torch.randn(shape, generator=self.generator) * 0.02

    def linear(self, key: str, out_features: int, in_features: int, bias: bool = True) -> None:
        self.normal(f"{key}.weight", out_features, in_features)
        if bias:
            self.normal(f"{key}.bias", out_features)

    def layer_norm(self, key: str, width: int) -> None:
        self[f"llma.{key}.weight"] = torch.ones(width)
        self[f"llma.{key}.bias"] = torch.zeros(width)

    def llama_block(self, key: str, width: int, hidden: int) -> None:
        for name in ("wq", "wk", "wv", "wo"):
            self.linear(f"{key}.attention.{name}", width, width, bias=False)
        self.linear(f"{key}.feed_forward.w1", hidden, width, bias=False)
        self.linear(f"{key}.feed_forward.w2", width, hidden, bias=False)
        self.linear(f"{key}.feed_forward.w3", hidden, width, bias=False)
        self[f"llma.{key}.attention_norm.weight"] = torch.ones(width)
        self[f"llma.{key}.ffn_norm.weight"] = torch.ones(width)


def random_checkpoint(vocab_size: int, seed: int, width: int = WIDTH, clip_layers: int = CLIP_LAYERS,
                      params: dict = PARAMS) -> dict[str, torch.Tensor]:
    """A OneLLM-format checkpoint with random weights: tiny widths unless told otherwise."""
    sd = RandomStateDict(seed)
    W, D = width, params["dim"]
    add_llm(sd, vocab_size, params)
    add_clip(sd, W, clip_layers)
    add_modality_inputs(sd, W)
    for expert in range(UPM_EXPERTS):
        for block in range(UPM_BLOCKS):
            sd.llama_block(f"resample_layers.{expert}.{block}", W, ffn_hidden(W, params["multiple_of"]))
    for m in MODALITIES:
        sd.normal(f"resample_tokens.{m}", 1, PREFIX_TOKENS, W)
        sd.linear(f"clip_proj1.{m}.0", W, W)
        sd.layer_norm(f"clip_proj1.{m}.1", W)
        sd.linear(f"clip_proj2.{m}.0", D, W)
        sd.layer_norm(f"clip_proj2.{m}.1", D)
        sd.linear(f"routers.{m}.fc1", 4 * W, W)
        sd.linear(f"routers.{m}.fc2", UPM_EXPERTS, 4 * W)
        sd.normal(f"start_tag.{m}", 1, 1, D)
        sd.normal(f"end_tag.{m}", 1, 1, D)
    return dict(sd)


def add_llm(sd: RandomStateDict, vocab_size: int, params: dict) -> None:
    dim = params["dim"]
    sd.normal("tok_embeddings.weight", vocab_size, dim)
    for i in range(params["n_layers"]):
        sd.llama_block(f"layers.{i}", dim, ffn_hidden(dim, params["multiple_of"]))
    sd["llma.norm.weight"] = torch.ones(dim)
    sd.normal("output.weight", vocab_size, dim)


def add_clip(sd: RandomStateDict, width: int, layers: int) -> None:
    grid = IMAGE_SIZE // PATCH
    sd.normal("clip.visual.class_embedding", width)
    sd.normal("clip.visual.positional_embedding", grid * grid + 1, width)
    sd.normal("clip.visual.conv1.weight", width, 3, PATCH, PATCH)
    sd.layer_norm("clip.visual.ln_pre", width)
    for i in range(layers):
        block = f"clip.visual.transformer.resblocks.{i}"
        sd.layer_norm(f"{block}.ln_1", width)
        sd.normal(f"{block}.attn.in_proj_weight", 3 * width, width)
        sd.normal(f"{block}.attn.in_proj_bias", 3 * width)
        sd.linear(f"{block}.attn.out_proj", width, width)
        sd.layer_norm(f"{block}.ln_2", width)
        sd.linear(f"{block}.mlp.c_fc", 4 * width, width)
        sd.linear(f"{block}.mlp.c_proj", width, 4 * width)
    sd.layer_norm("clip.visual.ln_post", width)
    sd.normal("clip.visual.proj", width, width)
    # some of CLIP's text tower, which real checkpoints carry and the converter must drop
    sd.normal("clip.token_embedding.weight", 64, TEXT_WIDTH)
    sd.normal("clip.positional_embedding", 8, TEXT_WIDTH)
    sd.layer_norm("clip.ln_final", TEXT_WIDTH)
    sd.normal("clip.text_projection", TEXT_WIDTH, width)
    sd["llma.clip.logit_scale"] = torch.tensor(math.log(1 / 0.07))


def add_modality_inputs(sd: RandomStateDict, width: int) -> None:
    sd.normal("conv1.audio.weight", width, 1, 16, 16)
    sd.normal("conv1.audio.bias", width)
    sd.normal("conv1.point.conv1.weight", width, 6, 1, 1)
    sd.normal("conv1.point.conv1.bias", width)
    sd.normal("conv1.imu.weight", width, 6, 10)
    sd.linear("conv1.fmri", FMRI_TOKENS * width, FMRI_VOXELS)
    for m, rows in POSITIONS.items():
        sd.normal(f"positional_embedding.{m}", rows, width)
