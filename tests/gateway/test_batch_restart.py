"""A batch outlives its gateway: killed (SIGKILL) mid-batch and started again over the same files
folder, the gateway finishes it, and the output holds each custom_id once. The restarted gateway
gives new batches a completion window of 2 s, so that one can be seen to expire."""

import signal

import openai
import pytest

from batch_helpers import assert_each_custom_id_once, chat_line, file_lines, finished, submit, wait_until
from gateway_process import GatewayProcess, stop_cleanly

LINES = 60
WINDOW_S = 2


@pytest.fixture(scope="module")
def resumed(model_dir, tmp_path_factory):
    """(the restarted gateway, the batch it resumed, its custom_ids)."""
    workdir = tmp_path_factory.mktemp("batch-restart")
    first = GatewayProcess(model_dir, workdir, ["--max-concurrent", "1", "--batch-max-in-flight", "4"]).start()
    sdk = openai.OpenAI(base_url=first.url + "/v1", api_key="-", max_retries=0)
    model = sdk.models.list().data[0].id
    lines = [chat_line(f"k{i}", f"count to {i}", model, max_tokens=8) for i in range(LINES)]
    batch = wait_until(sdk, submit(sdk, lines).id, lambda b: b.request_counts and b.request_counts.completed >= 5)
    first.process.send_signal(signal.SIGKILL)
    first.process.wait()
    assert batch.request_counts.completed < LINES, "the batch finished before the kill: make it longer"

    (workdir / "tmp").rename(workdir / "tmp-killed")  # the new process makes its own
    again = GatewayProcess(model_dir, workdir, ["--max-concurrent", "1", "--batch-completion-window-s", str(WINDOW_S)])
    again.start()
    yield again, batch.id, {line["custom_id"] for line in lines}
    stop_cleanly(again)


@pytest.fixture(scope="module")
def sdk(resumed) -> openai.OpenAI:
    return openai.OpenAI(base_url=resumed[0].url + "/v1", api_key="-", max_retries=0)


def test_a_batch_killed_mid_way_is_finished_after_a_restart_with_each_custom_id_once(resumed, sdk):
    _, batch_id, custom_ids = resumed
    batch = finished(sdk, batch_id)
    assert batch.status == "completed", batch
    assert batch.request_counts.completed == batch.request_counts.total == LINES
    found = assert_each_custom_id_once(sdk, batch, custom_ids)
    assert len(found) == LINES


def test_a_batch_not_done_within_its_window_expires(sdk):
    model = sdk.models.list().data[0].id
    lines = [chat_line(f"e{i}", f"count to {i}", model, max_tokens=16) for i in range(400)]
    batch = finished(sdk, submit(sdk, lines).id)
    assert batch.status == "expired" and batch.expired_at, batch
    assert batch.expires_at - batch.created_at == WINDOW_S
    found = assert_each_custom_id_once(sdk, batch, {line["custom_id"] for line in lines})
    assert len(found) == len(lines)  # the unanswered ones in the error file
    never_run = file_lines(sdk, batch.error_file_id)
    assert never_run and all(line["error"]["code"] == "batch_expired" and line["response"] is None
                             for line in never_run)
    assert batch.request_counts.completed + len(never_run) == len(lines)
