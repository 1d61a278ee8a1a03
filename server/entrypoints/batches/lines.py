"""A batch line sent through the app itself, as an online request of its API key is, from the
first middleware on: the same parsing, limits, admission (at the batch's lower priority) and
answer. It arrives marked as a batch line with its key's tenant (traffic/access.py: only the
process can mark a request so), so it needs no key of its own and no per-key quota."""

import asyncio
import json
import logging

from starlette.types import ASGIApp, Message

from server.core.batch_lines import BatchLine
from server.entrypoints.batches.parse import input_lines

log = logging.getLogger("onellm.batches")


def _scope(tenant: str, caller: str, url: str, body: bytes, request_id: str) -> dict:
    return {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
            "method": "POST", "scheme": "http", "path": url, "raw_path": url.encode(), "root_path": "",
            "query_string": b"", "client": ("batch", 0), "server": None,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                        (b"x-request-id", request_id.encode())],
            # queued as the caller that created the batch (traffic/access.py caller_of), at the batch's priority
            "state": {"batch_line": True, "tenant": tenant, "fingerprint": caller, "caller": "batch"}}


def line_sender(app: ASGIApp):
    """The runner's `dispatch`: (tenant, caller, url, body, request id) -> (status, JSON answer)."""

    async def send_line(tenant: str, caller: str, url: str, body: bytes, request_id: str) -> tuple[int, dict]:
        answered = asyncio.Event()
        sent_body = False
        status, pieces = 500, []

        async def receive() -> Message:
            nonlocal sent_body
            if not sent_body:
                sent_body = True
                return {"type": "http.request", "body": body, "more_body": False}
            await answered.wait()  # nobody hangs up on a batch line
            return {"type": "http.disconnect"}

        async def send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                pieces.append(message.get("body", b""))
                if not message.get("more_body", False):
                    answered.set()

        try:
            await app(_scope(tenant, caller, url, body, request_id), receive, send)
        except Exception:  # noqa: BLE001 - answered as a 500 already (RequestIds); the line fails, the batch goes on
            log.exception("batch line %s failed", request_id)
        finally:
            answered.set()
        return status, _answer(b"".join(pieces))

    return send_line


def _answer(data: bytes) -> dict:
    try:
        answer = json.loads(data)
    except ValueError:
        answer = None
    return answer if isinstance(answer, dict) else {"error": {"type": "server_error", "message": "no JSON answer"}}


def input_reader(files, off_loop):
    """The runner's `read_input`: (tenant, batch) -> (its lines, the errors that fail it)."""

    async def read_input(tenant: str, batch: dict) -> tuple[list[BatchLine], list[dict]]:
        found = await files.content(tenant, batch["input_file_id"])
        if found is None:
            return [], [{"code": "file_not_found", "message": f"the input file '{batch['input_file_id']}' is gone "
                                                              "(expired or deleted)", "param": "input_file_id",
                         "line": None}]
        return await off_loop(input_lines, found[1], batch["endpoint"])

    return read_input

