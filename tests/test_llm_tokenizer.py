"""The HF tokenizer written into llm/ must encode and decode exactly like the SentencePiece model.

vLLM detokenises with it and the prompt may be encoded with either, so any difference is a bug.
Checked on the fixture's LLaMA-2 tokenizer (32000 pieces) and on make-tiny's.
"""

import random

import pytest
import sentencepiece as spm
from transformers import AutoTokenizer

from server.tools import llm_folder

SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
          "detailed, and polite answers to the human's questions.")
STRINGS = [
    "",
    " ",
    "  ",
    "   ",
    "\n",
    "\n\n",
    "a",
    "Hello world",
    " Hello",
    "Hello ",
    "  Hello  world  ",
    "a  b   c    d",
    "line one\nline two\n",
    "\tindented\ttabs",
    f"{SYSTEM}\n\n###Human: What is in this image?\n###Assistant:",
    f"{SYSTEM}\n\n###Human: hi\n###Assistant: Hello! How can I help?\n###Human: Describe the sound.\n###Assistant:",
    "###",
    "0123456789 3.14159 2024-11-25 15724 voxels",
    "café naïve résumé Ünïcödé straße",
    "日本語のテキストです。中文字符。한국어 문장.",
    "Привет, мир! Γειά σου κόσμε.",
    "emoji 😀🎉👍🏽 and a flag 🇫🇷",
    "zero\u200bwidth and no\u00a0break and ideographic\u3000space",
    "▁ a literal metaspace ▁▁",
    "<0x41> looks like a byte piece",
    "tricky punctuation: (a) [b] {c} <d> 'e' \"f\" `g` ~!@#$%^&*_+-=|\\/?,.;:",
    "x" * 300,
    "The quick brown fox jumps over the lazy dog. " * 20,
]


def random_strings(count: int, seed: int = 0) -> list[str]:
    """Mixed ASCII, whitespace runs, accents, CJK, emoji, and random code points (byte fallback)."""
    rng = random.Random(seed)
    alphabet = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,;:!?'\"()[]<>#*-_\n\t")
    alphabet += list("   ▁éèüßçñ日本語中文한국어кирилицаΣσς😀🎉👍🏽\u200b\u00a0")
    strings = []
    for _ in range(count):
        length = rng.randint(0, 40)
        if rng.random() < 0.7:
            strings.append("".join(rng.choice(alphabet) for _ in range(length)))
        else:
            code_points = (rng.randint(1, 0x2FFFF) for _ in range(length))
            strings.append("".join(chr(c) for c in code_points if not 0xD800 <= c <= 0xDFFF))
    return strings


# where each tokenizer.model lives, under the conftest fixture that provides it
TOKENIZERS = {"fixture_dir": "tokenizer.model", "tiny_model": "llm/tokenizer.model"}


@pytest.fixture(scope="module", params=list(TOKENIZERS))
def tokenizer_pair(request, tmp_path_factory):
    """(SentencePiece processor, HF tokenizer loaded from a freshly written llm/ folder)."""
    model_file = request.getfixturevalue(request.param) / TOKENIZERS[request.param]
    llm_dir = tmp_path_factory.mktemp("llm")
    llm_folder.write_tokenizer(model_file, llm_dir)
    return spm.SentencePieceProcessor(model_file=str(model_file)), AutoTokenizer.from_pretrained(llm_dir)


def test_special_ids_match(tokenizer_pair):
    sp, hf = tokenizer_pair
    assert (hf.bos_token_id, hf.eos_token_id, hf.unk_token_id) == (sp.bos_id(), sp.eos_id(), sp.unk_id())
    assert len(hf) == sp.get_piece_size()


@pytest.mark.parametrize("text", STRINGS)
def test_encodes_like_sentencepiece(tokenizer_pair, text):
    sp, hf = tokenizer_pair
    ids = sp.encode(text)
    assert hf(text)["input_ids"] == [sp.bos_id()] + ids
    assert hf.encode(text, add_special_tokens=False) == ids
    assert hf.decode(ids) == sp.decode(ids)
    assert hf.decode([sp.bos_id()] + ids, skip_special_tokens=True) == sp.decode(ids)


def test_special_token_text(tokenizer_pair):
    """Typed "<s>" is the control token to HF (vLLM needs its added tokens matched), plain text to
    SentencePiece; `split_special_tokens=True` gives SentencePiece's reading."""
    sp, hf = tokenizer_pair
    text = "<s> </s> <unk> typed as text"
    assert hf.encode(text, add_special_tokens=False, split_special_tokens=True) == sp.encode(text)
    assert hf.encode("a<s>b", add_special_tokens=False)[1] == sp.bos_id()


def test_random_strings_encode_and_decode_alike(tokenizer_pair):
    sp, hf = tokenizer_pair
    for text in random_strings(3000):
        ids = sp.encode(text)
        assert hf.encode(text, add_special_tokens=False) == ids, repr(text)
        assert hf.decode(ids) == sp.decode(ids), repr(text)


def test_text_round_trips(tokenizer_pair):
    _, hf = tokenizer_pair
    # A literal "▁" comes back as a space, in SentencePiece too: it is the space symbol.
    for text in [t for t in STRINGS + random_strings(500, seed=1) if "▁" not in t]:
        assert hf.decode(hf.encode(text), skip_special_tokens=True) == text, repr(text)


def test_refuses_non_llama_sentencepiece(tmp_path):
    import io

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(["a unigram model is not what LLaMA uses"] * 20), model_writer=model,
        model_type="unigram", vocab_size=30, hard_vocab_limit=False, minloglevel=2,
    )
    path = tmp_path / "unigram.model"
    path.write_bytes(model.getvalue())
    with pytest.raises(ValueError, match="not BPE"):
        llm_folder.build_hf_tokenizer(path)
