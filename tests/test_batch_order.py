"""The order in which the batch runner sends a batch's lines: those of one kind of media one after
another (the encoder batches only inputs of one modality that wait at once, and in the file's order
the few lines in flight would seldom share one), each kind in the file's order; the output file
keeps the input file's order whatever the lines were sent in."""

import asyncio
import json
import time
from dataclasses import replace

from server.config import Settings
from server.core.batch_lines import new_batch_id
from server.core.batches import BatchRunner
from server.entrypoints.batches.parse import input_lines
from server.metrics import Metrics
from server.storage.local_batches import LocalBatchStore
from server.storage.local_files import LocalFileStore

PARTS = {
    "image": {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
    "audio": {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
    "point": {"type": "input_point", "input_point": {"data": "AAAA"}},
}


def chat_line(custom_id: str, kind: str | None) -> dict:
    content = [{"type": "text", "text": "What is it?"}] + ([PARTS[kind]] if kind else [])
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": content}]}}


def responses_line(custom_id: str, part: dict) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/responses",
            "body": {"input": [{"role": "user", "content": [{"type": "input_text", "text": "What is it?"}, part]}]}}


def jsonl(lines: list[dict]) -> bytes:
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


def test_a_lines_media_are_the_types_of_its_parts_in_either_api():
    chat, errors = input_lines(jsonl([chat_line("a", "audio"), chat_line("t", None)]), "/v1/chat/completions")
    responses, more_errors = input_lines(jsonl([responses_line("r", {"type": "input_image", "image_url": "x"})]),
                                         "/v1/responses")
    assert errors == more_errors == []
    assert [line.media for line in chat + responses] == ["input_audio", "", "input_image"]
    both = {"custom_id": "ap", "method": "POST", "url": "/v1/chat/completions", "body": {"messages": [
        {"role": "user", "content": [PARTS["point"], PARTS["audio"]]}, {"role": "assistant", "content": "ok"}]}}
    assert input_lines(jsonl([both]), "/v1/chat/completions")[0][0].media == "input_audio,input_point"


def test_lines_of_one_kind_are_sent_together_and_the_output_keeps_the_files_order(tmp_path):
    kinds = ["image", "audio", None, "point"] * 3
    lines = [chat_line(f"line-{i}", kind) for i, kind in enumerate(kinds)]
    sent: list[str] = []

    async def dispatch(tenant, caller, url, body, request_id):
        sent.append(json.loads(body)["marker"])
        return 200, {"object": "chat.completion", "usage": {"prompt_tokens": 1, "completion_tokens": 1}}

    async def scenario():
        store, files = LocalBatchStore(tmp_path / "batches"), LocalFileStore(tmp_path / "files")
        await store.start()
        await files.start()
        data = jsonl([{**line, "body": {**line["body"], "marker": line["custom_id"]}} for line in lines])

        async def read_input(tenant, batch):
            return input_lines(data, batch["endpoint"])

        settings = replace(Settings(), batch_max_in_flight=1)  # one at a time: the order sent is the order run
        runner = BatchRunner(store, files, settings, Metrics(), dispatch, read_input, lambda: False)
        batch = {"id": new_batch_id(), "object": "batch", "endpoint": "/v1/chat/completions", "status": "validating",
                 "created_at": int(time.time()), "expires_at": int(time.time()) + 3600, "request_counts": {"total": 0}}
        await runner.create("alice", batch)
        while batch["status"] != "completed":
            await asyncio.sleep(0.01)
        output = (await files.content("alice", batch["output_file_id"]))[1]
        await runner.close()
        return [json.loads(row)["custom_id"] for row in output.splitlines()]

    output_order = asyncio.run(asyncio.wait_for(scenario(), 30))

    by_kind = {kind: [line["custom_id"] for line, k in zip(lines, kinds) if k == kind] for kind in PARTS}
    text_alone = [line["custom_id"] for line, k in zip(lines, kinds) if k is None]
    # text alone first (no media), then each part type by name: image_url, input_audio, input_point
    assert sent == text_alone + by_kind["image"] + by_kind["audio"] + by_kind["point"]
    assert output_order == [line["custom_id"] for line in lines]
