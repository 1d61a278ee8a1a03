"""OpenAI's Batch API through the unchanged `openai` SDK, against a gateway of this module's own: two
API keys, one slot (so that the order in which waiting requests get it is what a test sees), and
up to 40 batch lines in flight."""

import base64

import httpx
import openai
import pytest

import media
from batch_helpers import assert_each_custom_id_once, chat_line, file_lines, finished, jsonl, submit, wait_until
from gateway_helpers import BLOCK, metric, wait_metric
from gateway_process import GatewayProcess, serving

KEYS = {"alice": "sk-batch-alice", "bob": "sk-batch-bob"}
IN_FLIGHT = 40


@pytest.fixture(scope="module")
def batch_gateway(model_dir, tmp_path_factory):
    yield from serving(GatewayProcess(
        model_dir, tmp_path_factory.mktemp("batches"),
        ["--max-concurrent", "1", "--batch-max-in-flight", str(IN_FLIGHT)],
        env={"ONELLM_API_KEYS": ",".join(KEYS.values())},
        ready_headers={"Authorization": f"Bearer {KEYS['alice']}"}))


@pytest.fixture(scope="module")
def alice(batch_gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=batch_gateway.url + "/v1", api_key=KEYS["alice"], max_retries=0)


@pytest.fixture(scope="module")
def bob(batch_gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=batch_gateway.url + "/v1", api_key=KEYS["bob"], max_retries=0)


@pytest.fixture(scope="module")
def scraper(batch_gateway):
    with httpx.Client(base_url=batch_gateway.url, headers={"Authorization": f"Bearer {KEYS['alice']}"}) as client:
        yield client


@pytest.fixture(scope="module")
def model(alice) -> str:
    return alice.models.list().data[0].id


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def data_url(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{b64(data)}"


def every_modality(seed: int) -> dict[str, list[dict]]:
    """Content parts of each modality, inline, as online requests send them."""
    return {
        "image": [{"type": "image_url", "image_url": {"url": data_url(media.image("png", seed), "image/png")}}],
        "video": [{"type": "video_url", "video_url": {"url": data_url(media.video("mp4", seed), "video/mp4")}}],
        "audio": [{"type": "input_audio", "input_audio": {"data": b64(media.audio("wav", seed)), "format": "wav"}}],
        "point": [{"type": "input_point", "input_point": {"data": b64(media.point("ply", seed))}}],
        "rgbd": [{"type": "image_url", "image_url": {"url": data_url(media.image("jpg", seed), "image/jpeg")}},
                 {"type": "input_depth", "input_depth": {"data": b64(media.depth_map(seed))}}],
        "rgbn": [{"type": "image_url", "image_url": {"url": data_url(media.image("webp", seed), "image/webp")}},
                 {"type": "input_normal", "input_normal": {"data": b64(media.normal_map(seed))}}],
        "fmri": [{"type": "input_fmri", "input_fmri": {"data": b64(media.fmri("npy", seed))}}],
        "imu": [{"type": "input_imu", "input_imu": {"data": b64(media.imu("csv", seed, rate=50)), "sample_rate": 50}}],
    }


def test_every_modality_in_one_batch_is_answered_as_online(alice, scraper, model):
    """Inline data of every modality, a stored file by file_id, an attachment sent before by uuid,
    and a line the online endpoint refuses: each answered as the same request online is."""
    stored = alice.files.create(file=("a.png", media.image("png", 811)), purpose="user_data")
    online = alice.chat.completions.create(model=model, max_tokens=3, temperature=0, messages=[
        {"role": "user", "content": every_modality(812)["video"] + [{"type": "text", "text": "What is it?"}]}])
    lines = [chat_line(name, parts + [{"type": "text", "text": "What is it?"}], model,
                       **({"imu_sample_rate": 50} if name == "imu" else {}))
             for name, parts in every_modality(810).items()]
    lines += [chat_line("by-file-id", [{"type": "file", "file": {"file_id": stored.id}},
                                       {"type": "text", "text": "What is it?"}], model),
              chat_line("by-uuid", [{"type": "video_url", "uuid": online.usage.media[0]},
                                    {"type": "text", "text": "What is it?"}], model),
              chat_line("not-an-image", [{"type": "image_url", "image_url": {"url": data_url(b"x" * 64, "image/png")}}],
                        model)]
    completed_before = metric(scraper, "onellm_batch_lines_total", outcome="completed")

    batch = finished(alice, submit(alice, lines).id)

    assert batch.status == "completed", batch
    assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (11, 10, 1)
    found = assert_each_custom_id_once(alice, batch, {line["custom_id"] for line in lines})
    for line in lines[:-1]:  # one block of prefix rows per attachment, as online
        body = found[line["custom_id"]]["response"]["body"]
        assert body["object"] == "chat.completion" and body["usage"]["prompt_tokens"] > BLOCK
    same_online = found["by-uuid"]["response"]["body"]
    assert same_online["choices"][0]["message"]["content"] == online.choices[0].message.content
    assert same_online["usage"]["prompt_tokens"] == online.usage.prompt_tokens
    refused = found["not-an-image"]
    assert refused["response"]["status_code"] in (400, 415, 422)
    assert "image" in refused["response"]["body"]["error"]["message"]
    assert [line["custom_id"] for line in file_lines(alice, batch.error_file_id)] == ["not-an-image"]
    answered = [found[line["custom_id"]]["response"]["body"]["usage"] for line in lines[:-1]]
    assert batch.usage.input_tokens == sum(u["prompt_tokens"] for u in answered)
    assert wait_metric(scraper, "onellm_batch_lines_total", completed_before + 10, outcome="completed") \
        == completed_before + 10
    assert metric(scraper, "onellm_batches", state="completed") >= 1


def test_a_responses_batch(alice, model):
    line = {"custom_id": "r1", "method": "POST", "url": "/v1/responses", "body": {
        "model": model, "max_output_tokens": 3, "input": [{"role": "user", "content": [
            {"type": "input_text", "text": "What is it?"},
            {"type": "input_image", "image_url": data_url(media.image("png", 820), "image/png")}]}]}}
    batch = finished(alice, submit(alice, [line], endpoint="/v1/responses").id)
    assert batch.status == "completed", batch
    answer = file_lines(alice, batch.output_file_id)[0]["response"]["body"]
    assert answer["object"] == "response" and answer["usage"]["input_tokens"] > BLOCK


def test_a_malformed_input_file_fails_naming_its_lines(alice, model):
    good = chat_line("a", "hello", model)
    data = jsonl([good]) + b'{"custom_id": "b", "method": "POST"\n' + jsonl([
        {**good, "url": "/v1/embeddings", "custom_id": "c"}, good])
    batch = finished(alice, submit(alice, data).id)
    assert batch.status == "failed" and batch.failed_at
    assert [(e.line, e.code) for e in batch.errors.data] == [
        (2, "invalid_json_line"), (3, "invalid_url"), (4, "duplicate_custom_id")]
    assert batch.output_file_id is None and batch.request_counts.completed == 0


def test_bad_requests_for_a_batch_are_4xx_naming_the_field(alice, model):
    user_file = alice.files.create(file=("a.png", media.image("png", 830)), purpose="user_data")
    with pytest.raises(openai.BadRequestError, match="purpose 'batch'"):
        alice.batches.create(input_file_id=user_file.id, endpoint="/v1/chat/completions", completion_window="24h")
    with pytest.raises(openai.NotFoundError):
        alice.batches.create(input_file_id="file-nothere", endpoint="/v1/chat/completions", completion_window="24h")
    upload = alice.files.create(file=("in.jsonl", jsonl([chat_line("a", "hi", model)])), purpose="batch")
    with pytest.raises(openai.BadRequestError, match="endpoint"):
        alice.batches.create(input_file_id=upload.id, endpoint="/v1/embeddings", completion_window="24h")
    with pytest.raises(openai.APIStatusError, match="JSONL") as refused:
        alice.files.create(file=("in.png", media.image("png", 831)), purpose="batch")
    assert refused.value.status_code == 415


def test_cancel_stops_new_lines_and_keeps_the_finished_ones(alice, batch_gateway, model):
    lines = [chat_line(f"c{i}", f"count to {i}", model, max_tokens=8) for i in range(120)]
    seen = wait_until(alice, submit(alice, lines).id, lambda b: b.request_counts and b.request_counts.completed >= 2)

    assert alice.batches.cancel(seen.id).status in ("cancelling", "cancelled")
    batch = finished(alice, seen.id)

    assert batch.status == "cancelled" and batch.cancelled_at and batch.cancelling_at
    # no line is sent after the cancel: at most those already sent may have finished
    assert 2 <= batch.request_counts.completed <= seen.request_counts.completed + IN_FLIGHT
    found = assert_each_custom_id_once(alice, batch, {line["custom_id"] for line in lines})
    assert len(found) == batch.request_counts.completed, [f for f in found.values() if f["response"]["status_code"] != 200][:2]
    # its answered lines are in the output file now: the store kept the batch alone
    assert [p.name for p in (batch_gateway.files_dir / "batches").glob(f"{batch.id}.*")] == [f"{batch.id}.json"]
    with pytest.raises(openai.BadRequestError, match="cancelled"):
        alice.batches.cancel(batch.id)


def test_another_keys_batch_is_invisible(alice, bob, model):
    batch = finished(alice, submit(alice, [chat_line("only", "hi", model)]).id)
    assert batch.status == "completed"
    with pytest.raises(openai.NotFoundError):
        bob.batches.retrieve(batch.id)
    with pytest.raises(openai.NotFoundError):
        bob.batches.cancel(batch.id)
    with pytest.raises(openai.NotFoundError):
        bob.files.content(batch.output_file_id)
    assert batch.id not in [b.id for b in bob.batches.list()]
    assert batch.id in [b.id for b in alice.batches.list(limit=100)]


def test_the_list_pages_newest_first(alice, model):
    made = [submit(alice, [chat_line("p", "hi", model)]).id for _ in range(3)]
    first = alice.batches.list(limit=2)
    rest = alice.batches.list(limit=2, after=first.data[-1].id)
    assert first.has_more and [b.id for b in first.data][:2] == made[::-1][:2]
    assert rest.data[0].id == made[0]
    for batch_id in made:
        finished(alice, batch_id)


def test_online_requests_are_admitted_ahead_of_waiting_batch_lines(alice, scraper, model):
    """With one slot and the batch's lines waiting for it, an online request is served next: while
    it is answered, about one line finishes (the one holding the slot), where in arrival order it
    would come after every line that was waiting."""
    lines = [chat_line(f"q{i}", f"count to {i}", model, max_tokens=32) for i in range(IN_FLIGHT)]
    batch = submit(alice, lines)
    # all the lines are in flight at once and the gauge falls as each is answered, so the wait is for
    # most of them, not all: a line takes tens of ms, and the first may end before the first scrape
    waiting = wait_metric(scraper, "onellm_batch_lines_in_flight", IN_FLIGHT // 2, timeout=60)
    assert waiting >= IN_FLIGHT // 2, f"the batch's lines never waited for the slot: {waiting} in flight"
    done_before = metric(scraper, "onellm_batch_lines_total", outcome="completed")

    answer = alice.chat.completions.create(model=model, max_tokens=2, messages=[{"role": "user", "content": "hi"}])

    done_while_online = metric(scraper, "onellm_batch_lines_total", outcome="completed") - done_before
    assert answer.choices[0].message.content is not None
    assert done_while_online < waiting // 2, (done_while_online, waiting)
    assert finished(alice, batch.id).request_counts.completed == IN_FLIGHT
