"""The embedded engine on quantized weights: a model folder's `llm-<type>.gguf` (written by
`onellm quantize`) run in-process by llama.cpp, through llama-cpp-python's C API.

The prompt goes in as embedding rows (llama_batch.embd), exactly the rows the transformers engine
is given; generated tokens go in as ids, embedded by the file's own (8-bit) table. Requests share
one llama.cpp context, each on a sequence of its own with a KV cache of `max_positions` rows; a
request waits for a free sequence. Like the transformers engine, steps run on one worker thread and
concurrent requests interleave step by step; the text side (stop strings, UTF-8) is that engine's.

A free sequence keeps its last prompt's rows in its KV cache, and a request takes the free sequence
whose kept rows begin its own prompt for longest: a chat's next turn (same attachment, same earlier
turns) or the same question again computes only the rows that are new: on a CPU the prefill is much
of an answer's time. The logits are then those of one pass over the whole prompt up to rounding:
llama.cpp's kernels round by how the rows are split between calls (docs/benchmarks.md says how much).
Rows kept for one cache salt (a tenant's) are never reused for another.
"""

import asyncio
import ctypes
import hashlib
import logging
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import AsyncExitStack, contextmanager
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch

from server.engines.base import Sampling, Usage
from server.engines.local import LocalEngine, pick_token
from server.engines.priority import ONLINE, LiveTraffic, request_priority

log = logging.getLogger("onellm.engine")
PROMPT_CHUNK = 512  # prompt rows per llama_decode call (its n_batch)
# the fastest decode first: decoding reads every weight once a token, so the fewest bytes, and of
# q4_k and q4_0 (the same 4.5 bits) the blocks llama.cpp decoded faster (docs/benchmarks.md)
AUTO_ORDER = ("q4_k", "q4_0", "q8_0")


def import_llama_cpp():
    """llama_cpp, or an ImportError that says how to install it (it builds from source: minutes)."""
    try:
        import llama_cpp
    except ImportError as error:
        raise ImportError("quantized weights are served by llama.cpp: install it with "
                          "`uv sync --extra llamacpp` (it compiles from source, a few minutes)") from error
    return llama_cpp


def quantized_weights(requested: str, model_dir: Path, device: str) -> Path | None:
    """The GGUF file to serve for `--llm-weights requested`, or None for the full weights."""
    if requested == "full":
        return None
    if requested != "auto":
        path = Path(model_dir) / f"llm-{requested}.gguf"
        if not path.is_file():
            raise ValueError(f"--llm-weights {requested}: {path} not found (write it with "
                             f"`onellm quantize --model {model_dir} --type {requested}`)")
        import_llama_cpp()
        return path
    found = [path for kind in AUTO_ORDER if (path := Path(model_dir) / f"llm-{kind}.gguf").is_file()]
    if not found or torch.device(device).type != "cpu":  # this build of llama.cpp runs on the CPU
        return None
    try:
        import_llama_cpp()
    except ImportError as error:
        log.warning("serving the full weights, not %s: %s", found[0].name, error)
        return None
    log.info("serving %s on llama.cpp (--llm-weights full serves the llm/ folder instead)", found[0].name)
    return found[0]


class LlamaCppEngine(LocalEngine):
    name = "llama.cpp"
    _log_callback = None

    def __init__(self, gguf_path: str | Path, tokenizer: str | Path, max_positions: int, sequences: int = 4,
                 threads: int | None = None, live: LiveTraffic | None = None):
        if live is not None and sequences < 2:
            # a batch line keeps its sequence while it waits for the online requests to be served,
            # so one sequence must be left for them (see stream)
            raise ValueError("the llama.cpp engine needs at least 2 sequences beside batch lines (--llm-sequences)")
        self.lib = lib = import_llama_cpp()
        lib.llama_backend_init()
        if LlamaCppEngine._log_callback is None:  # llama.cpp keeps calling it: it lives as long as the process
            LlamaCppEngine._log_callback = lib.llama_log_callback(_forward_log)
            lib.llama_log_set(LlamaCppEngine._log_callback, ctypes.c_void_p())
        model_params = lib.llama_model_default_params()
        # read into memory of its own rather than mapped: mapped pages of a file are the first the
        # kernel drops under memory pressure, and every token then reads the weights from disk again
        model_params.load_mode = lib.LLAMA_LOAD_MODE_NONE
        self.llm = lib.llama_model_load_from_file(str(gguf_path).encode(), model_params)
        if not self.llm:
            raise ValueError(f"llama.cpp could not load {gguf_path}")
        params = lib.llama_context_default_params()
        params.n_ctx = max_positions * sequences  # split evenly: each sequence gets max_positions rows
        params.n_seq_max = sequences
        params.n_batch = params.n_ubatch = PROMPT_CHUNK
        params.n_threads = params.n_threads_batch = threads or torch.get_num_threads()
        self.ctx = lib.llama_init_from_model(self.llm, params)
        if not self.ctx:
            raise ValueError(f"llama.cpp could not make a context of {params.n_ctx} positions for {gguf_path}")
        self.dim = lib.llama_model_n_embd(self.llm)
        self.vocab_size = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(self.llm))
        self.tokenizer = spm.SentencePieceProcessor(model_file=str(tokenizer))
        self.eos_id = self.tokenizer.eos_id()
        self.max_positions = max_positions
        self.weights = Path(gguf_path).stem.removeprefix("llm-")  # q4_k, q4_0 or q8_0, as `onellm quantize` names them
        self._free = list(range(sequences))  # in the order they were freed: the longest free first
        self._kept: dict[int, list[bytes]] = {}  # sequence -> digests of the prompt rows its KV cache holds
        self._sequence_gate = asyncio.Semaphore(sequences)
        self._batch_gate = asyncio.Semaphore(max(sequences - 1, 1))
        self._token_batch = lib.llama_batch_init(1, 0, 1)
        self._prompt_batch = lib.llama_batch_init(PROMPT_CHUNK, self.dim, 1)
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="llama-cpp")
        self.live = live or LiveTraffic()  # batch streams yield to it, as in LocalEngine.stream

    def first_logits(self, embeddings: torch.Tensor, cache_salt: str | None = None) -> torch.Tensor:
        """Logits [V] of the first generated token for prompt embeddings [L, D]."""
        with self._prompt_in_sequence(embeddings, cache_salt) as (_, logits):
            return logits

    def token_ids(self, embeddings: torch.Tensor, sampling: Sampling, cache_salt: str | None = None) -> Iterator[int]:
        """Generated ids one by one; stops at EOS unless told not to. Holds a sequence until closed."""
        generator = torch.Generator().manual_seed(sampling.seed) if sampling.seed is not None else None
        limit = min(sampling.max_tokens, self.max_positions - embeddings.shape[0])
        with self._prompt_in_sequence(embeddings, cache_salt) as (seq, logits):
            for step in range(limit):
                token = pick_token(logits, sampling, generator)
                yield token
                if token == self.eos_id and not sampling.ignore_eos or step + 1 == limit:
                    return
                logits = self._next(seq, token, embeddings.shape[0] + step)

    async def stream(self, embeddings: torch.Tensor, sampling: Sampling, usage: Usage | None = None,
                     affinity: str | None = None, cache_salt: str | None = None) -> AsyncIterator[str]:
        # batch lines hold at most all but one sequence: paused while online requests are served,
        # they would otherwise keep every sequence from the online requests they wait for
        async with AsyncExitStack() as gates:
            if request_priority.get() != ONLINE:
                await gates.enter_async_context(self._batch_gate)
            await gates.enter_async_context(self._sequence_gate)  # token_ids takes a sequence free by then
            async for delta in super().stream(embeddings, sampling, usage, affinity, cache_salt):
                yield delta

    def _prompt_rows(self, embeddings: torch.Tensor) -> np.ndarray:
        """[L, D] float32, as llama_batch.embd takes them: rows of another width would be copied
        past the end of its buffer."""
        if embeddings.dim() != 2 or embeddings.shape[1] != self.dim:
            raise ValueError(f"prompt embeddings of shape {tuple(embeddings.shape)}: this model takes [L, {self.dim}]")
        return embeddings.float().contiguous().numpy()

    @contextmanager
    def _prompt_in_sequence(self, embeddings: torch.Tensor,
                            cache_salt: str | None) -> Iterator[tuple[int, torch.Tensor]]:
        """A free sequence holding the prompt, and the logits after it. On exit the sequence is free
        again, keeping the prompt's rows if its prefill was finished (the rows it reused otherwise)."""
        rows = self._prompt_rows(embeddings)
        digests = row_digests(rows, cache_salt)
        seq, kept = self._take_sequence(digests)
        try:
            logits = self._prefill(seq, rows, kept)
            kept = len(rows)
            yield seq, logits
        finally:
            self._release(seq, digests, kept)

    def _take_sequence(self, digests: list[bytes]) -> tuple[int, int]:
        """A free sequence, the one whose kept rows begin the prompt for longest (the longest free
        among equals), and how many of its rows are kept: at most all but the last, whose logits
        are needed. Its cache is cut back to them."""
        seq = max(self._free, key=lambda s: common_prefix(self._kept.get(s, ()), digests))
        self._free.remove(seq)
        kept = min(common_prefix(self._kept.pop(seq, ()), digests), max(len(digests) - 1, 0))
        self.lib.llama_memory_seq_rm(self.lib.llama_get_memory(self.ctx), seq, kept, -1)
        return seq, kept

    def _release(self, seq: int, digests: list[bytes], kept: int) -> None:
        """The sequence back to the free ones, its cache holding the prompt's first `kept` rows (the
        generated tokens' rows dropped: a next turn sends the answer as text, embedded otherwise)."""
        self.lib.llama_memory_seq_rm(self.lib.llama_get_memory(self.ctx), seq, kept, -1)
        if kept:
            self._kept[seq] = digests[:kept]
        self._free.append(seq)

    def _prefill(self, seq: int, rows: np.ndarray, first: int = 0) -> torch.Tensor:
        """Logits after rows[first:] are added to a sequence that holds rows[:first]."""
        batch = self._prompt_batch
        for start in range(first, len(rows), PROMPT_CHUNK):
            chunk = rows[start:start + PROMPT_CHUNK]
            ctypes.memmove(batch.embd, chunk.ctypes.data, chunk.nbytes)
            for i in range(len(chunk)):
                batch.pos[i] = start + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = seq
                batch.logits[i] = start + i == len(rows) - 1  # only the last row's logits are read
            batch.n_tokens = len(chunk)
            self._decode(batch)
        return self._logits()

    def _next(self, seq: int, token: int, position: int) -> torch.Tensor:
        batch = self._token_batch
        batch.token[0], batch.pos[0], batch.n_seq_id[0], batch.seq_id[0][0], batch.logits[0] = token, position, 1, seq, 1
        batch.n_tokens = 1
        self._decode(batch)
        return self._logits()

    def _decode(self, batch) -> None:
        if (status := self.lib.llama_decode(self.ctx, batch)) != 0:
            raise RuntimeError(f"llama_decode failed ({status})")

    def _logits(self) -> torch.Tensor:
        pointer = self.lib.llama_get_logits_ith(self.ctx, -1)
        return torch.from_numpy(np.ctypeslib.as_array(pointer, shape=(self.vocab_size,)).copy())

    async def close(self) -> None:
        await super().close()
        self.lib.llama_batch_free(self._token_batch)
        self.lib.llama_batch_free(self._prompt_batch)
        self.lib.llama_free(self.ctx)
        self.lib.llama_model_free(self.llm)


def row_digests(rows: np.ndarray, salt: str | None = None) -> list[bytes]:
    """A digest of each row's bytes: what a sequence remembers of the rows its cache holds. Keyed
    by `salt`, the same rows of two salts differ, so neither reuses the other's."""
    key = hashlib.sha256(salt.encode()).digest() if salt is not None else b""
    return [hashlib.blake2b(row.tobytes(), digest_size=16, key=key).digest() for row in rows]


def common_prefix(kept: Sequence[bytes], digests: list[bytes]) -> int:
    """How many leading rows the two lists of digests share."""
    return next((i for i, (a, b) in enumerate(zip(kept, digests)) if a != b), min(len(kept), len(digests)))


def _forward_log(level: int, text: bytes, user_data) -> None:
    """llama.cpp's own log: its warnings and errors go to ours, its progress lines nowhere."""
    if level in (3, 4):  # GGML_LOG_LEVEL_WARN, GGML_LOG_LEVEL_ERROR
        log.warning("llama.cpp: %s", text.decode(errors="replace").rstrip())
