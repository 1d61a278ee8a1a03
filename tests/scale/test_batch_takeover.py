"""Batches shared by two gateways (tiny model, local engine) through one real redis-server
(--files-url: the files and the batches), over real HTTP with the unchanged `openai` SDK. A batch
is run by the gateway holding its lease: a cancel asked at the other gateway reaches it through
Redis; killed (SIGKILL) mid-batch, its lease lapses after --batch-lease-ttl-s and the other gateway
finishes the batch, each custom_id once in the output; stopped (SIGTERM) mid-batch, it releases the
lease at once. In file order: the cancel, the kill, then the stop."""

import openai
import pytest

from batch_helpers import assert_each_custom_id_once, chat_line, finished, submit
from gateway_process import GatewayProcess, start_all
from redis_server import RedisServer, require_redis_server
from scraped_metrics import total
from waiting import until

LEASE_TTL_S = 4  # above a loaded machine's event-loop stalls: a live runner keeps its batches
LINES = 40
LONG = 200  # lines that take a few seconds: a cancel or a stop comes long before their end


@pytest.fixture(scope="module")
def redis(tmp_path_factory) -> RedisServer:
    require_redis_server()
    server = RedisServer(tmp_path_factory.mktemp("batch-redis")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def gateways(tiny_model, redis, tmp_path_factory) -> list[GatewayProcess]:
    # one slot and two batch lines at once: a batch of 40 short lines lasts long enough to be cut mid-way
    args = ["--files-url", redis.url, "--batch-lease-ttl-s", str(LEASE_TTL_S), "--max-concurrent", "1",
            "--batch-max-in-flight", "2", "--log-level", "info"]
    pair = [GatewayProcess(tiny_model, tmp_path_factory.mktemp("batch-gateway"), args,
                           {"ONELLM_PREPROCESS_WORKERS": "1"}) for _ in range(2)]
    try:
        start_all(pair)
        yield pair
    finally:
        for gateway in pair:
            gateway.stop()
    for gateway in pair:
        assert "Traceback" not in gateway.log(), gateway.log()[-6000:]


def sdk_of(gateway: GatewayProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key="-", max_retries=0)


def lines_done(gateway: GatewayProcess) -> float:
    return total(gateway.url, "onellm_batch_lines_total")


def batch_lines(prefix: str, sdk: openai.OpenAI, count: int = LINES) -> list[dict]:
    model = sdk.models.list().data[0].id
    return [chat_line(f"{prefix}{i}", f"count to {i}", model, max_tokens=8) for i in range(count)]


def test_a_cancel_asked_at_the_other_gateway_stops_the_batch_where_it_runs(gateways):
    a, b = gateways
    lines = batch_lines("c", sdk_of(a), LONG)
    done_before = lines_done(a), lines_done(b)
    batch = submit(sdk_of(a), lines)
    until(lambda: lines_done(a) >= done_before[0] + 2, 120, "two lines answered on the gateway it was sent to")
    assert sdk_of(b).batches.cancel(batch.id).status == "cancelling"
    ended = finished(sdk_of(b), batch.id)
    assert ended.status == "cancelled", ended
    assert ended.request_counts.completed < LONG, "the batch finished before the cancel: make it longer"
    assert_each_custom_id_once(sdk_of(b), ended, {line["custom_id"] for line in lines})
    assert lines_done(b) == done_before[1]  # b answered none of it: a ran it, and stopped


def test_a_gateway_killed_mid_batch_leaves_it_to_the_other_which_finishes_it_each_custom_id_once(gateways):
    a, b = gateways
    lines = batch_lines("k", sdk_of(a))
    done_on_a, done_on_b = lines_done(a), lines_done(b)
    batch = submit(sdk_of(a), lines)
    until(lambda: lines_done(a) >= done_on_a + 5, 120, "five lines answered on the gateway it was sent to")
    a.process.kill()  # SIGKILL: a releases nothing, its lease lapses
    a.process.wait()
    cut = sdk_of(b).batches.retrieve(batch.id)
    assert cut.status == "in_progress" and cut.request_counts.completed < LINES, cut

    ended = finished(sdk_of(b), batch.id)
    assert ended.status == "completed", ended
    assert ended.request_counts.completed == ended.request_counts.total == LINES
    assert ended.request_counts.failed == 0
    found = assert_each_custom_id_once(sdk_of(b), ended, {line["custom_id"] for line in lines})
    assert len(found) == LINES
    assert f"batch {batch.id} taken over" in b.log()
    # b answered what a had not stored: the lines cut short, and no more (a's last count may lag its
    # stored answers by the two it had in flight)
    left = LINES - cut.request_counts.completed
    assert left - 2 <= lines_done(b) - done_on_b <= left


def test_a_gateway_stopped_mid_batch_releases_it_at_once_and_the_other_finishes_it(gateways, redis):
    a, b = gateways
    a.start()  # killed by the test before
    lines = batch_lines("s", sdk_of(a), LONG)
    done_on_a = lines_done(a)
    batch = submit(sdk_of(a), lines)
    until(lambda: lines_done(a) >= done_on_a + 5, 120, "five lines answered on the gateway it was sent to")
    assert a.stop() == 0
    with redis.client() as client:  # released on the way out, not left to lapse (b may hold it already)
        holder = client.get(f"onellm:batches:lease:{batch.id}") or b""
    assert f":{a.pid}:".encode() not in holder, holder
    cut = sdk_of(b).batches.retrieve(batch.id)
    assert cut.request_counts.completed < LONG, "the batch finished before the stop: make it longer"

    ended = finished(sdk_of(b), batch.id)
    assert ended.status == "completed", ended
    assert ended.request_counts.completed == LONG
    assert len(assert_each_custom_id_once(sdk_of(b), ended, {line["custom_id"] for line in lines})) == LONG
    assert f"batch {batch.id} taken over" in b.log()
