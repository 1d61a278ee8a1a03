"""What a batch is made of and what it ends with, apart from running it: its input lines, the
result line of each (OpenAI's output line format), the counts and token usage of those results,
and the output and error files they make."""

import json
import secrets
import time
from dataclasses import dataclass

ENDPOINTS = ("/v1/chat/completions", "/v1/responses")


@dataclass(frozen=True)
class BatchLine:
    """One request of a batch's input file: its line number (from 1), custom_id, endpoint and JSON body."""
    number: int
    custom_id: str
    url: str
    body: bytes


def new_batch_id() -> str:
    # the time first, so that ids sort as the batches were made (lists are newest first)
    return f"batch_{time.time_ns():016x}{secrets.token_hex(8)}"


def new_line_id() -> str:
    return "batch_req_" + secrets.token_hex(12)


def answered_line(line: BatchLine, line_id: str, status: int, body: dict) -> dict:
    """The output line of a request that was answered, whatever its status (OpenAI puts a refused
    request's answer under `response` as well; `error` is for requests never answered)."""
    return {"id": line_id, "custom_id": line.custom_id,
            "response": {"status_code": status, "request_id": line_id, "body": body}, "error": None}


def unanswered_line(line: BatchLine, code: str, message: str) -> dict:
    return {"id": new_line_id(), "custom_id": line.custom_id, "response": None,
            "error": {"code": code, "message": message}}


def succeeded(result: dict) -> bool:
    return (result.get("response") or {}).get("status_code") == 200


def _tokens(body: dict) -> tuple[int, int]:
    """(input, output) tokens of a chat completion or a response."""
    usage = body.get("usage") or {}
    return (usage.get("prompt_tokens", usage.get("input_tokens", 0)),
            usage.get("completion_tokens", usage.get("output_tokens", 0)))


def tally(batch: dict, results: dict[str, dict]) -> None:
    """`request_counts` and `usage` of `batch` from its stored results, so that they stay true
    whatever a crash cut short."""
    completed = [r for r in results.values() if succeeded(r)]
    batch["request_counts"] = {"total": batch["request_counts"]["total"], "completed": len(completed),
                               "failed": len(results) - len(completed)}
    spent = [_tokens(r["response"]["body"]) for r in completed]
    taken, given = sum(t[0] for t in spent), sum(t[1] for t in spent)
    batch["usage"] = {"input_tokens": taken, "input_tokens_details": {"cached_tokens": 0},
                      "output_tokens": given, "output_tokens_details": {"reasoning_tokens": 0},
                      "total_tokens": taken + given}


def result_files(lines: list[BatchLine], results: dict[str, dict], expired: bool) -> tuple[bytes, bytes]:
    """(output file, error file): the succeeded lines, then those that failed (and, when the batch
    expired, one `batch_expired` line for each request never answered), in the input file's order,
    each custom_id once."""
    output, errors = [], []
    for line in lines:
        result = results.get(line.custom_id)
        if result is None and expired:
            result = unanswered_line(line, "batch_expired", "this request could not be executed before the "
                                                            "completion window expired")
        if result is not None:
            (output if succeeded(result) else errors).append(json.dumps(result) + "\n")
    return "".join(output).encode(), "".join(errors).encode()
