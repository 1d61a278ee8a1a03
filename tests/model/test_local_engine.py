"""The embedded engine: stop handling, sampling, streaming through the Engine interface."""

import asyncio

import pytest
import sentencepiece as spm
import torch

from server.engines.base import Sampling, Usage
from server.engines.local import LocalEngine, TextStream, pick_token
from server.model.repo import load_model


@pytest.fixture(scope="module")
def engine(fixture_model):
    return LocalEngine(fixture_model / "llm")


@pytest.fixture(scope="module")
def embeddings(fixture_model):
    model = load_model(fixture_model)
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
