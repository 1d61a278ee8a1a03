"""Load a model folder (`model_repo/<name>/`, see model_repo/README.md) into a ready encoder."""

import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import sentencepiece as spm
import torch
from safetensors.torch import load_file

from server.model.dtype import DtypeChoice, decide_dtype, host_cpu_flags, native_on_cpu
from server.model.encoder import Encoder
from server.model.prompt import assemble, render


@dataclass
class OneLLM:
    """The encoder side of one served model: what turns a chat with attachments into embeddings."""

    path: Path
    config: dict
    encoder: Encoder
    tokenizer: spm.SentencePieceProcessor
    stored_dtype: torch.dtype  # what the weights were written in
    compute: DtypeChoice  # what the encoder (and the embedded LLM) computes in, and why
    # on CUDA the encoder queues its work on a stream of its own, so that the LLM's work and the
    # copies other threads make need not wait behind an encoder batch
    _encoder_stream: "torch.cuda.Stream | None" = field(default=None, init=False, repr=False)

    @property
    def name(self) -> str:
        return self.config["name"]

    @property
    def device(self) -> torch.device:
        return self.encoder.tok_embeddings.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.tok_embeddings.weight.dtype

    @property
    def bos_id(self) -> int:
        return self.config["llm"]["bos_id"]

    def encode(self, modality: str, inputs: torch.Tensor,
               between_blocks: Callable[[], None] = lambda: None) -> torch.Tensor:
        """Model inputs [B, ...] -> prefixes [B, 30, D] on this model's device and dtype;
        `between_blocks` runs before each transformer block."""
        if self.device.type == "cuda":  # from page-locked memory the copy is queued, not waited for
            inputs = inputs.pin_memory().to(self.device, non_blocking=True)
        return self.encoder(modality, inputs.to(self.device, self.dtype), between_blocks)

    @contextmanager
    def encoder_stream(self) -> Iterator[None]:
        """On CUDA, the work queued inside runs on the encoder's own stream and is finished when the
        block ends (the caller is a worker thread: it waits, the event loop does not); elsewhere nothing."""
        if self.device.type != "cuda":
            yield
            return
        if self._encoder_stream is None:
            self._encoder_stream = torch.cuda.Stream(self.device)
        stream = self._encoder_stream  # both encoder threads' first runs may make one: each waits for its own
        with torch.cuda.stream(stream):
            yield
        stream.synchronize()

    def prompt_ids(self, turns: Sequence[tuple[str, str]], system: str | None = None) -> list[int]:
        text = render(turns, self.config["prompt"]["system"] if system is None else system)
        return [self.bos_id] + self.tokenizer.encode(text)

    def embeddings(self, ids: list[int], attachments: Sequence[tuple[str, torch.Tensor]]) -> torch.Tensor:
        """Prompt ids and [(modality, prefix [30, D]), ...] -> LLM input embeddings [L, D]."""
        tokens = self.encoder.embed_tokens(ids)
        blocks = [self.encoder.block(m, prefix.to(self.device, self.dtype)) for m, prefix in attachments]
        embeddings = assemble(tokens[:1], blocks, tokens[1:])
        if self.device.type == "cuda":
            # done before the prefixes may be freed (they were made on the encoder's stream, and the
            # allocator could hand their memory to it while this stream still reads them); this is
            # called in a worker thread, so the wait is not the event loop's
            torch.cuda.current_stream(self.device).synchronize()
        return embeddings


def place(encoder: Encoder, device: str | torch.device, dtype: torch.dtype) -> Encoder:
    """The encoder moved to `device` in `dtype`, ready to run: on a CPU that computes bfloat16
    natively, its weights packed, in panels or for oneDNN (server/engines/linear.py; after which it
    must not be moved or cast again)."""
    encoder.to(device=device, dtype=dtype)
    cpu_flags = host_cpu_flags()
    if torch.device(device).type == "cpu" and dtype == torch.bfloat16 and native_on_cpu(dtype, cpu_flags):
        encoder.pack_weights(cpu_flags)
    return encoder


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: str | torch.dtype = "auto") -> OneLLM:
    """The model folder at `path` on `device`, computing in `dtype`: "auto" (server/model/dtype.py
    decides from the device and the CPU) or a dtype asked for."""
    path = Path(path)
    config = json.loads((path / "model.json").read_text())
    weights = load_file(path / "encoder.safetensors")
    stored = next(iter(weights.values())).dtype
    requested = dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")
    compute = decide_dtype(requested, str(device), stored)
    enc = config["encoder"]
    encoder = place(Encoder(weights, config["modalities"], enc["clip_heads"], enc["upm_heads"], enc["norm_eps"]),
                    device, compute.dtype)
    tokenizer = spm.SentencePieceProcessor(model_file=str(path / "llm" / "tokenizer.model"))
    return OneLLM(path, config, encoder, tokenizer, stored, compute)
