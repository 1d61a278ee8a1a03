"""What the Batch API tests share: input lines as OpenAI's docs spell them, and waiting on a batch
through the `openai` SDK."""

import json
import time

import openai

FINAL = ("completed", "failed", "expired", "cancelled")


def chat_line(custom_id: str, content, model: str, max_tokens: int = 3, **extra) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
                     "temperature": 0, **extra}}


def jsonl(lines: list[dict]) -> bytes:
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


def submit(sdk: openai.OpenAI, lines: list[dict] | bytes, endpoint: str = "/v1/chat/completions"):
    data = lines if isinstance(lines, bytes) else jsonl(lines)
    upload = sdk.files.create(file=("input.jsonl", data), purpose="batch")
    return sdk.batches.create(input_file_id=upload.id, endpoint=endpoint, completion_window="24h")


def wait_until(sdk: openai.OpenAI, batch_id: str, done, timeout: float = 180):
    """The batch once `done(batch)` holds, polled."""
    deadline = time.monotonic() + timeout
    while not done(batch := sdk.batches.retrieve(batch_id)):
        assert time.monotonic() < deadline, f"batch still {batch.status}: {batch.request_counts}"
        time.sleep(0.1)
    return batch


def finished(sdk: openai.OpenAI, batch_id: str, timeout: float = 180):
    return wait_until(sdk, batch_id, lambda b: b.status in FINAL, timeout)


def file_lines(sdk: openai.OpenAI, file_id: str | None) -> list[dict]:
    return [json.loads(line) for line in sdk.files.content(file_id).text.splitlines()] if file_id else []


def assert_each_custom_id_once(sdk: openai.OpenAI, batch, expected: set[str]) -> dict[str, dict]:
    """The output and error files hold each custom_id at most once, and between them those of
    `expected` (or, for a batch that stopped early, some of them); their counts agree with the batch's."""
    output, errors = file_lines(sdk, batch.output_file_id), file_lines(sdk, batch.error_file_id)
    ids = [line["custom_id"] for line in output + errors]
    assert len(ids) == len(set(ids)), sorted(ids)
    assert set(ids) == expected if batch.status == "completed" else set(ids) <= expected
    assert batch.request_counts.completed == len(output)
    assert all(line["response"]["status_code"] == 200 and line["error"] is None for line in output)
    return {line["custom_id"]: line for line in output + errors}
