"""A batch's input file -> its lines, checked whole before any is sent: each line a JSON object
{"custom_id", "method": "POST", "url": the batch's endpoint, "body": the request}, custom_ids
unique. What is wrong is reported as OpenAI's batch errors, each naming its line."""

import json

from server.core.batch_lines import BatchLine

MAX_LINES = 50_000  # OpenAI's requests per batch
MAX_ERRORS = 100  # reported of a bad file: enough to fix it, without a list as long as the file
MAX_CUSTOM_ID = 512


def _error(number: int | None, code: str, message: str, param: str | None = None) -> dict:
    return {"code": code, "message": message, "param": param, "line": number}


def _line(number: int, text: str, endpoint: str) -> BatchLine | dict:
    """The request on line `number`, or the error that names what is wrong with it."""
    try:
        request = json.loads(text)
    except ValueError as e:
        return _error(number, "invalid_json_line", f"line {number} is not JSON ({e})")
    if not isinstance(request, dict):
        return _error(number, "invalid_request", f"line {number} is not a JSON object")
    custom_id = request.get("custom_id")
    if not isinstance(custom_id, str) or not 0 < len(custom_id) <= MAX_CUSTOM_ID:
        return _error(number, "invalid_request", f"line {number}: custom_id must be a string of 1 to "
                                                 f"{MAX_CUSTOM_ID} characters", "custom_id")
    if request.get("method") != "POST":
        return _error(number, "invalid_request", f"line {number}: method must be 'POST'", "method")
    if request.get("url") != endpoint:
        return _error(number, "invalid_url", f"line {number}: url {request.get('url')!r} is not the batch's "
                                             f"endpoint {endpoint!r}", "url")
    body = request.get("body")
    if not isinstance(body, dict):
        return _error(number, "invalid_request", f"line {number}: body must be a JSON object", "body")
    if body.get("stream"):
        return _error(number, "invalid_request", f"line {number}: a batch line is answered whole; "
                                                 "stream must not be true", "body.stream")
    unknown = set(request) - {"custom_id", "method", "url", "body"}
    if unknown:
        return _error(number, "invalid_request", f"line {number}: unknown field '{sorted(unknown)[0]}'",
                      sorted(unknown)[0])
    return BatchLine(number, custom_id, endpoint, json.dumps(body).encode())


def input_lines(data: bytes, endpoint: str) -> tuple[list[BatchLine], list[dict]]:
    """The lines of a batch input file (blank lines skipped), and its errors: none for a good file."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return [], [_error(None, "invalid_file", "the input file is not UTF-8 text (JSONL: one request a line)")]
    lines, errors, seen = [], [], set()
    for number, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        found = _line(number, raw, endpoint)
        if isinstance(found, BatchLine) and found.custom_id in seen:
            found = _error(number, "duplicate_custom_id", f"line {number}: custom_id {found.custom_id!r} is "
                                                          "on an earlier line too; each must be unique", "custom_id")
        if isinstance(found, BatchLine):
            seen.add(found.custom_id)
            lines.append(found)
        elif len(errors) < MAX_ERRORS:
            errors.append(found)
    if not lines and not errors:
        errors.append(_error(None, "empty_file", "the input file holds no request"))
    if len(lines) > MAX_LINES:
        errors.append(_error(None, "too_many_requests", f"the input file holds {len(lines)} requests; a batch "
                                                        f"takes at most {MAX_LINES}"))
    return lines, errors
