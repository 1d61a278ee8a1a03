"""The embedded engine: stop handling, sampling, streaming through the Engine interface."""

import asyncio
import json
import random
import threading
import time

import pytest
import sentencepiece as spm
import torch

from fastapi.testclient import TestClient

from server.entrypoints.app import create_app
from server.config import Settings
from server.engines.base import Sampling, Usage
from server.engines.local import LocalEngine, TextStream, pick_token
from server.model.onellm import load_model


@pytest.fixture(scope="module")
def engine(fixture_model):
    return LocalEngine(fixture_model / "llm")


@pytest.fixture(scope="module")
def embeddings(fixture_model):
    model = load_model(fixture_model, dtype="float32")  # as the engine, whose answers the tests pin
    return model.embeddings(model.prompt_ids([("user", "Tell me a story.")]), [])


def collect(engine, embeddings, sampling) -> tuple[str, Usage]:
    usage = Usage()

    async def run():
        return "".join([d async for d in engine.stream(embeddings, sampling, usage)])

    return asyncio.run(run()), usage


def test_text_stream_never_hands_out_a_stop_string(fixture_dir):
    sp = spm.SentencePieceProcessor(model_file=str(fixture_dir / "tokenizer.model"))
    text = TextStream(sp, ("###",))
    deltas = [text.push(t) for t in sp.encode("The cat sat.\n###Human: more")]
    assert text.stopped
    assert "".join(deltas) == "The cat sat.\n"
    assert "#" not in "".join(deltas)


def test_text_stream_releases_held_text_that_did_not_become_a_stop(fixture_dir):
    sp = spm.SentencePieceProcessor(model_file=str(fixture_dir / "tokenizer.model"))
    text = TextStream(sp, ("###",))
    deltas = [text.push(t) for t in sp.encode("Item #1 and ## two")]
    assert not text.stopped
    assert "".join(deltas) + text.flush() == "Item #1 and ## two"


def test_text_stream_waits_for_all_bytes_of_a_character(fixture_dir):
    sp = spm.SentencePieceProcessor(model_file=str(fixture_dir / "tokenizer.model"))
    ids = sp.encode("🦙")  # not a piece of LLaMA's vocabulary: four byte-fallback tokens
    assert len(ids) > 2
    text = TextStream(sp, ())
    deltas = [text.push(t) for t in ids]
    assert all(d == "" for d in deltas[:-1])
    assert "".join(deltas) == "🦙"


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.2]))
    generator = torch.Generator().manual_seed(0)
    picks = {pick_token(logits, Sampling(temperature=1.0, top_p=0.6), generator) for _ in range(200)}
    assert picks == {0, 1}


def test_a_tiny_temperature_samples_the_largest_logit():
    logits = torch.tensor([1.0, 3.0, 2.0])
    generator = torch.Generator().manual_seed(0)
    assert {pick_token(logits, Sampling(temperature=1e-300), generator) for _ in range(20)} == {1}


def test_greedy_stream_starts_with_the_argmax_of_the_first_logits(engine, embeddings):
    _, usage = collect(engine, embeddings, Sampling(max_tokens=5, stop=(), ignore_eos=True))
    assert usage.token_ids[0] == int(engine.first_logits(embeddings).argmax())
    assert usage.completion_tokens == 5
    assert usage.finish_reason == "length"


def test_seeded_sampling_is_reproducible_and_seeds_differ(engine, embeddings):
    sampling = Sampling(max_tokens=8, temperature=1.0, stop=(), ignore_eos=True)
    _, a = collect(engine, embeddings, Sampling(**{**sampling.__dict__, "seed": 1}))
    _, b = collect(engine, embeddings, Sampling(**{**sampling.__dict__, "seed": 1}))
    _, c = collect(engine, embeddings, Sampling(**{**sampling.__dict__, "seed": 2}))
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


def test_tiny_top_p_samples_the_greedy_answer(engine, embeddings):
    _, greedy = collect(engine, embeddings, Sampling(max_tokens=6, stop=(), ignore_eos=True))
    _, nucleus = collect(engine, embeddings, Sampling(max_tokens=6, temperature=0.7, top_p=1e-6, seed=3,
                                                      stop=(), ignore_eos=True))
    assert nucleus.token_ids == greedy.token_ids


def test_kv_cache_decoding_equals_full_recomputation(engine, embeddings):
    _, usage = collect(engine, embeddings, Sampling(max_tokens=6, stop=(), ignore_eos=True))
    x = embeddings
    recomputed = []
    for _ in range(6):
        token = int(engine.first_logits(x).argmax())
        recomputed.append(token)
        x = torch.cat([x, engine.model.get_input_embeddings().weight[token][None]])
    assert usage.token_ids == recomputed


# --- stop strings: matched on each push's new text only, with the same result as the definition -------

def handed_out_by_definition(text: str, sent: int, stops: tuple[str, ...]) -> tuple[int, bool]:
    """Where the text handed out so far ends, and whether a stop was reached, by the definition
    (quadratic in a stop's length): everything before the earliest stop, else all but the longest
    tail that begins a stop, else nothing new while a character's bytes are still coming."""
    starts = [at for s in stops if (at := text.find(s)) >= 0]
    if starts:
        return min(starts), True
    if text.endswith("\ufffd"):
        return sent, False
    held = max((n for s in stops for n in range(len(s) - 1, 0, -1) if text.endswith(s[:n])), default=0)
    return len(text) - held, False


def test_text_stream_hands_out_what_the_definition_does(fixture_dir):
    sp = spm.SentencePieceProcessor(model_file=str(fixture_dir / "tokenizer.model"))
    rng = random.Random(0)
    alphabet = ["a", "b", "ab", "#", "##", " ", "\n", "ñ", "🦙"]  # the llama is four byte tokens
    for _ in range(300):
        answer = "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 40)))
        stops = tuple(sorted({*(answer[i:i + rng.randrange(1, 6)] for i in rng.choices(range(len(answer)), k=2)),
                              "".join(rng.choice(alphabet) for _ in range(3))}))
        stream, ids, sent, stopped = TextStream(sp, stops), sp.encode(answer), 0, False
        for n in range(1, len(ids) + 1):
            delta = stream.push(ids[n - 1])
            text = sp.decode(ids[:n])
            end, stopped = handed_out_by_definition(text, sent, stops)
            assert delta == text[sent:end], (answer, stops, n)
            assert stream.stopped == stopped
            sent = end
            if stopped:
                break
        if not stopped:
            assert stream.flush() == sp.decode(ids)[sent:]


def test_text_stream_edge_cases(fixture_dir):
    sp = spm.SentencePieceProcessor(model_file=str(fixture_dir / "tokenizer.model"))

    def stream(answer: str, stops: tuple[str, ...]) -> tuple[list[str], TextStream]:
        text = TextStream(sp, stops)
        return [text.push(t) for t in sp.encode(answer)], text

    # a stop that overlaps itself: "aab" in "aaab" begins at the second "a"
    deltas, text = stream("x aaab y", ("aab",))
    assert text.stopped and "".join(deltas) == "x a"
    # of two stops, the one that begins first ends the text, whichever is listed first
    deltas, text = stream("one two three", ("three", "two"))
    assert text.stopped and "".join(deltas) == "one "
    deltas, text = stream("one two three", ("wo thr", "three"))
    assert text.stopped and "".join(deltas) == "one t"
    # the answer begins with the stop
    deltas, text = stream("### rest", ("###",))
    assert text.stopped and "".join(deltas) == ""
    # a stop whose character comes in byte tokens is found once the character is whole
    deltas, text = stream("a 🦙 b", ("🦙",))
    assert text.stopped and "".join(deltas) == "a "
    # held text that does not become the stop is released at the end, and an empty stop is no stop
    deltas, text = stream("a aa", ("aaa", ""))
    assert not text.stopped and "".join(deltas) + text.flush() == "a aa"


def test_a_stop_of_a_kilobyte_over_a_long_answer(fixture_dir):
    sp = spm.SentencePieceProcessor(model_file=str(fixture_dir / "tokenizer.model"))
    stop = "ab" * 511 + "!"
    ids = sp.encode("ab" * 2000 + "!" + "ab" * 200 + "!")
    text = TextStream(sp, (stop,))
    deltas = []
    for token in ids:
        deltas.append(text.push(token))
        if text.stopped:
            break
    # all but the stop's first 1022 characters' worth is handed out as it comes, then the stop ends it
    assert text.stopped
    assert "".join(deltas) == "ab" * (2000 - 511)
    assert max(len("".join(deltas[:i])) for i in range(len(deltas) - 1)) >= 2 * 2000 - 1022 - 8


def test_stops_are_read_in_time_linear_in_their_length(fixture_dir):
    """A stop of 64k characters: the definition's cost, 64k prefixes compared on every token, would take
    hours for these 600 tokens; read piece by piece it takes well under a second."""
    sp = spm.SentencePieceProcessor(model_file=str(fixture_dir / "tokenizer.model"))
    stop = "a" * 65535 + "b"
    text = TextStream(sp, (stop,))
    deadline = time.monotonic() + 60  # a generous one
    deltas = []
    for token in sp.encode("a" * 3000):
        deltas.append(text.push(token))
        assert time.monotonic() < deadline
    assert "".join(deltas) == "" and text.flush() == "a" * 3000


def test_stops_are_matched_on_the_engine_thread(engine, embeddings, monkeypatch):
    threads = set()
    push = TextStream.push

    def recording_push(self, token):
        threads.add(threading.current_thread().name)
        return push(self, token)

    monkeypatch.setattr(TextStream, "push", recording_push)
    collect(engine, embeddings, Sampling(max_tokens=5, stop=("zzz",), ignore_eos=True))
    assert threads and all(name.startswith("local-llm") for name in threads)


class RunsOutOfMemory:
    """The embedded engine, running out of memory after its first text: a fault no small test
    machine shows on cue."""

    name = "local"

    def __init__(self, engine: LocalEngine):
        self.engine = engine

    async def stream(self, embeddings, sampling, usage=None, affinity=None, cache_salt=None):
        async for delta in self.engine.stream(embeddings, sampling, usage, affinity):
            yield delta
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    async def start(self) -> None:
        await self.engine.start()

    async def ready(self) -> bool:
        return True

    async def close(self) -> None:
        await self.engine.close()


def test_an_out_of_memory_mid_answer_ends_the_stream_with_its_error_event(tiny_model, caplog):
    app = create_app(Settings(model=str(tiny_model)), engine=RunsOutOfMemory(LocalEngine(tiny_model / "llm")))
    with TestClient(app) as client:
        response = client.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": 8, "stream": True})
        events = [e for e in response.text.split("\n\n") if e.strip()]
        assert events[-1] == "data: [DONE]" and events[-2].startswith("event: error\n"), events
        error = json.loads(events[-2].split("data: ", 1)[1])["error"]
        assert error["type"] == "internal_error" and "out of memory" not in error["message"]
        assert response.headers["x-request-id"] in error["message"]
        sample = app.state.metrics.registry.get_sample_value
        assert sample("onellm_requests_total", {"modality": "text", "status": "500"}) == 1
        assert sample("onellm_requests_total", {"modality": "text", "status": "499"}) is None
    # logged once, with its traceback
    assert [r.exc_info[0] for r in caplog.records if r.exc_info] == [torch.OutOfMemoryError]
