"""What the gateway tests check responses against, written from the spec (ONELLM.md §3, OpenAI's
streaming format, Prometheus' text format), not from the server's code."""

import json
import time
from functools import cache
from pathlib import Path

import httpx
import sentencepiece as spm
from prometheus_client.parser import text_string_to_metric_families

# ONELLM.md §3, conversation "v1"
SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
          "detailed, and polite answers to the human's questions.")
ROLES = {"user": "Human", "assistant": "Assistant"}
BOS = 1
ALLOWED_HOST = "127.0.0.1"  # the gateway under test allows URLs of this host on its file server's port
BLOCK = 32  # start tag + 30 prefix rows + end tag, per attachment


@cache
def _tokenizer(path: str) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=path)


def v1_prompt(turns: list[tuple[str, str]], system: str = SYSTEM) -> str:
    text = system + "\n\n"
    for role, content in turns:
        text += f"###{ROLES[role]}: {content}\n"
    return text + "###Assistant:"


def prompt_ids(model_dir: Path, turns: list[tuple[str, str]], system: str = SYSTEM) -> list[int]:
    return [BOS] + _tokenizer(str(model_dir / "llm" / "tokenizer.model")).encode(v1_prompt(turns, system))


def expected_prompt_tokens(model_dir: Path, turns: list[tuple[str, str]], attachments: int,
                           system: str = SYSTEM) -> int:
    return len(prompt_ids(model_dir, turns, system)) + BLOCK * attachments


def token_count(model_dir: Path, text: str) -> int:
    return len(_tokenizer(str(model_dir / "llm" / "tokenizer.model")).encode(text))


def parse_sse(response: httpx.Response) -> tuple[str, list[dict]]:
    """Checks an OpenAI-style chat stream is well-formed; returns (text, chunks)."""
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    events = [e for e in response.text.split("\n\n") if e.strip()]
    assert events, "empty stream"
    assert events[-1] == "data: [DONE]", f"stream does not end with [DONE]: {events[-1]!r}"
    chunks = []
    for event in events[:-1]:
        assert event.startswith("data: ") and "\n" not in event, f"not a single data line: {event!r}"
        chunk = json.loads(event[len("data: "):])
        assert chunk["object"] == "chat.completion.chunk"
        chunks.append(chunk)
    assert len({c["id"] for c in chunks}) == 1, "chunks of one answer must share an id"
    choices = [c for c in chunks if c["choices"]]
    first, last = choices[0]["choices"][0], choices[-1]["choices"][0]
    assert first["delta"].get("role") == "assistant", f"first delta has no role: {first}"
    assert last["finish_reason"] in ("stop", "length"), f"last choice has no finish_reason: {last}"
    assert all(c["choices"][0].get("finish_reason") is None for c in choices[:-1])
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in choices)
    assert "###" not in text
    return text, chunks


def assert_error(response: httpx.Response, status: int, param: str | None = ...) -> dict:
    """An error body `{"error": {"type", "message", "param"}}` with `status` (and `param` when given)."""
    assert response.status_code == status, f"{response.status_code} {response.text}"
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert {"type", "message", "param"} <= error.keys(), error
    assert isinstance(error["type"], str) and error["type"]
    assert isinstance(error["message"], str) and error["message"]
    assert "Traceback" not in error["message"]
    if param is not ...:
        assert error["param"] == param, error
    return error


def metrics(client: httpx.Client) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} from /metrics."""
    response = client.get("/metrics")
    assert response.status_code == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(response.text) for s in family.samples}


def metric(client: httpx.Client, name: str, **labels) -> float:
    return metrics(client).get((name, tuple(sorted(labels.items()))), 0.0)


def wait_metric(client: httpx.Client, name: str, at_least: float, timeout: float = 10, **labels) -> float:
    """A streamed request is counted when its stream closes, a moment after the client read [DONE]."""
    deadline = time.monotonic() + timeout
    while (value := metric(client, name, **labels)) < at_least and time.monotonic() < deadline:
        time.sleep(0.05)
    return value
