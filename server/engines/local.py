"""The embedded engine: the converted `llm/` folder run in-process with `transformers`.

It needs no GPU and no vLLM, so anyone can serve a model in one command. Generation steps run
on one worker thread: concurrent requests interleave step by step, each with its own KV cache.
A batch line's stream takes no step while an online request is being served (see LiveTraffic).
"""

import asyncio
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import sentencepiece as spm
import torch
from transformers import LlamaForCausalLM

from server.engines.base import Sampling, Usage
from server.engines.linear import adopt_linears
from server.engines.priority import ONLINE, LiveTraffic, request_priority


# as vLLM's sampler: smaller temperatures are greedy (dividing by them overflows float32 logits)
GREEDY_BELOW = 1e-5


def pick_token(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> int:
    """Greedy when temperature is (about) 0, else temperature + nucleus (top-p) sampling."""
    if sampling.temperature < GREEDY_BELOW:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(-1) - sorted_probs < sampling.top_p  # always keeps the top token
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


class StopMatcher:
    """Where one stop string first occurs in a text read piece by piece, in time linear in the
    text: a Knuth-Morris-Pratt automaton, whose state is the longest prefix of the stop that
    ends the text read so far."""

    def __init__(self, stop: str):
        self.stop = stop
        self.fallback = _prefix_function(stop)
        self.matched = 0

    def read(self, text: str, start: int, end: int) -> int | None:
        """Reads text[start:end]; the index in `text` where the stop begins once it is complete."""
        stop, fallback, matched = self.stop, self.fallback, self.matched
        for i in range(start, end):
            char = text[i]
            while matched and stop[matched] != char:
                matched = fallback[matched - 1]
            if stop[matched] == char:
                matched += 1
                if matched == len(stop):
                    self.matched = matched
                    return i + 1 - matched
        self.matched = matched
        return None


def _prefix_function(s: str) -> list[int]:
    """For each i, the length of the longest proper prefix of s[:i + 1] that is also its suffix."""
    lengths = [0] * len(s)
    k = 0
    for i in range(1, len(s)):
        while k and s[i] != s[k]:
            k = lengths[k - 1]
        if s[i] == s[k]:
            k += 1
        lengths[i] = k
    return lengths


class TextStream:
    """Token ids in, text deltas out; holds back text that may still become a stop string.

    Each push reads only the text it added. That relies on the tokenizer's decoding of more ids
    extending the decoding of fewer, which holds for SentencePiece but for a trailing unfinished
    UTF-8 sequence (shown as U+FFFD until its other bytes come): that tail is read once complete.
    """

    def __init__(self, tokenizer: spm.SentencePieceProcessor, stops: tuple[str, ...]):
        self.tokenizer = tokenizer
        self.matchers = [StopMatcher(s) for s in dict.fromkeys(stops) if s]
        self.ids: list[int] = []
        self.sent = 0  # characters of the decoded text already handed out
        self.read = 0  # characters of the decoded text the matchers have read
        self.stopped = False

    def push(self, token: int) -> str:
        if self.stopped:
            return ""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        complete = len(text.rstrip("\ufffd"))
        if (at := self._find_stop(text, complete)) is not None:
            return self._take(text, at)
        if complete < len(text):  # an unfinished UTF-8 sequence: wait for its other bytes
            return ""
        held = max((m.matched for m in self.matchers), default=0)
        return self._take(text, len(text) - held)

    def flush(self) -> str:
        if self.stopped:
            return ""
        text = self.tokenizer.decode(self.ids)
        return self._take(text, self._find_stop(text, len(text)))

    def _find_stop(self, text: str, end: int) -> int | None:
        """Reads text[self.read:end]; where the earliest stop found in it begins."""
        found = [at for m in self.matchers if (at := m.read(text, self.read, end)) is not None]
        self.read = end
        if found:
            self.stopped = True
            return min(found)
        return None

    def _take(self, text: str, end: int | None) -> str:
        delta = text[self.sent:end]
        self.sent += len(delta)
        return delta


class LocalEngine:
    name = "local"
    weights = "full"  # the llm/ folder's, in the computed dtype

    def __init__(self, llm_dir: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 live: LiveTraffic | None = None):
        llm_dir = Path(llm_dir)
        self._hold(LlamaForCausalLM.from_pretrained(llm_dir, dtype=dtype).to(device).eval(),
                   spm.SentencePieceProcessor(model_file=str(llm_dir / "tokenizer.model")), live)

    @classmethod
    def around(cls, model: LlamaForCausalLM, tokenizer: spm.SentencePieceProcessor | None = None) -> "LocalEngine":
        """An engine over a model already in memory: the real-size benchmark builds a 7B one there
        rather than writing 13 GB to disk. Without a tokenizer it yields ids but cannot stream text."""
        engine = cls.__new__(cls)
        engine._hold(model, tokenizer)
        return engine

    def _hold(self, model: LlamaForCausalLM, tokenizer: spm.SentencePieceProcessor | None,
              live: LiveTraffic | None = None) -> None:
        adopt_linears(model)  # a float32 decode step multiplies one row: about a third faster through oneDNN
        self.model = model
        self.tokenizer = tokenizer
        self.eos_id = model.config.eos_token_id
        self.max_positions = model.config.max_position_embeddings
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="local-llm")
        # the gateway's count of online requests, or this engine's own of its online streams
        self.live = live or LiveTraffic()

    @torch.inference_mode()
    def first_logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Logits [V] of the first generated token for prompt embeddings [L, D]."""
        x = embeddings.unsqueeze(0).to(self.model.device, self.model.dtype)
        return self.model(inputs_embeds=x, logits_to_keep=1).logits[0, -1].float()

    def token_ids(self, embeddings: torch.Tensor, sampling: Sampling, cache_salt: str | None = None) -> Iterator[int]:
        """Generated ids one by one, decoding with a KV cache; stops at EOS unless told not to.
        The cache is the request's alone, kept for no other, so `cache_salt` sets nothing apart here."""
        generator = torch.Generator().manual_seed(sampling.seed) if sampling.seed is not None else None
        limit = min(sampling.max_tokens, self.max_positions - embeddings.shape[0])
        with torch.inference_mode():
            x = embeddings.unsqueeze(0).to(self.model.device, self.model.dtype)
            out = self.model(inputs_embeds=x, use_cache=True, logits_to_keep=1)
            for step in range(limit):
                token = pick_token(out.logits[0, -1].float().cpu(), sampling, generator)
                yield token
                if token == self.eos_id and not sampling.ignore_eos or step + 1 == limit:
                    return
                ids = torch.tensor([[token]], device=self.model.device)
                out = self.model(input_ids=ids, cache=out.cache, use_cache=True)

    def _step(self, ids: Iterator[int], text: TextStream, sampling: Sampling) -> tuple[int, str] | None:
        """One token and the text it releases, on the worker thread: the stop strings are
        matched there too, so the event loop only hands the delta on."""
        token = next(ids, None)
        if token is None:
            return None
        return token, "" if self._is_end(token, sampling) else text.push(token)

    def _is_end(self, token: int, sampling: Sampling) -> bool:
        return token == self.eos_id and not sampling.ignore_eos

    async def stream(self, embeddings: torch.Tensor, sampling: Sampling, usage: Usage | None = None,
                     affinity: str | None = None, cache_salt: str | None = None) -> AsyncIterator[str]:
        usage = usage if usage is not None else Usage()
        loop = asyncio.get_running_loop()
        ids = self.token_ids(embeddings, sampling, cache_salt)
        text = TextStream(self.tokenizer, sampling.stop)
        usage.finish_reason = "length"
        # the one worker thread interleaves every stream's steps: a batch stream takes none while
        # online traffic is served, so an online step waits at most for the batch step under way
        online = request_priority.get() == ONLINE
        if online:
            self.live.enter()
        try:
            while True:
                if not online:
                    await self.live.until_idle()
                if (step := await loop.run_in_executor(self._worker, self._step, ids, text, sampling)) is None:
                    break
                token, delta = step
                usage.completion_tokens += 1
                usage.token_ids.append(token)
                if self._is_end(token, sampling):
                    usage.finish_reason = "stop"
                    break
                if delta:
                    yield delta
                if text.stopped:
                    usage.finish_reason = "stop"
                    return
            if tail := await loop.run_in_executor(self._worker, text.flush):
                yield tail
        finally:
            if online:
                self.live.leave()
            await loop.run_in_executor(self._worker, ids.close)

    async def start(self) -> None:
        """Nothing to watch in the background: the model is in this process."""

    async def ready(self) -> bool:
        return True

    async def close(self) -> None:
        self._worker.shutdown(wait=False, cancel_futures=True)
