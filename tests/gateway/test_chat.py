"""Conversations through the real server: history and context-window trimming, the two endpoints
agreeing, the `openai` SDK, remote URLs from an allowed host, the prefix cache, and a client that
hangs up mid-answer."""

import base64
import json
import time

import httpx
import openai
import pytest

import media
from gateway_helpers import (assert_error, expected_prompt_tokens, metric, parse_sse, prompt_ids, token_count,
                             wait_metric)
from server.core.parts import BASE64_PIECE


def data_url(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def completion(client: httpx.Client, **body) -> dict:
    response = client.post("/v1/chat/completions", json={"max_tokens": 2, **body})
    assert response.status_code == 200, response.text
    return response.json()


@pytest.fixture(scope="module")
def context_window(model_dir) -> int:
    return json.loads((model_dir / "llm" / "config.json").read_text())["max_position_embeddings"]


# --- multi-turn ---------------------------------------------------------------------------------

def test_history_and_system_message_are_in_the_prompt(client, model_dir):
    history = [{"role": "system", "content": "You answer in one word."},
               {"role": "user", "content": "Hi, can you see pictures?"},
               {"role": "assistant", "content": "Yes, send me one."}]
    response = client.post("/v1/chat", files=[("image", ("a.png", media.image("png", seed=51), "image/png"))],
                           data={"messages": json.dumps(history), "prompt": "What is in it?", "max_tokens": "2",
                                 "stream": "false"})
    assert response.status_code == 200, response.text
    turns = [("user", "Hi, can you see pictures?"), ("assistant", "Yes, send me one."), ("user", "What is in it?")]
    assert response.json()["usage"]["prompt_tokens"] == expected_prompt_tokens(
        model_dir, turns, attachments=1, system="You answer in one word.")


def test_earlier_turns_keep_their_attachments(client, model_dir):
    image = data_url(media.image("jpg", seed=52), "image/jpeg")
    body = completion(client, messages=[
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}},
                                     {"type": "text", "text": "What is this?"}]},
        {"role": "assistant", "content": "A gradient."},
        {"role": "user", "content": "Which colours?"}])
    turns = [("user", "What is this?"), ("assistant", "A gradient."), ("user", "Which colours?")]
    assert body["usage"]["prompt_tokens"] == expected_prompt_tokens(model_dir, turns, attachments=1)


def long_text(model_dir, topic: int, tokens: int) -> str:
    text = f"Tell me about topic {topic}."
    while token_count(model_dir, text) < tokens:
        text += f" The quick brown fox number {topic} jumps over the lazy dog again and again."
    return text


def test_too_long_history_drops_the_oldest_turns(client, model_dir, context_window):
    max_tokens = 4
    turns = []
    for i in range(8):
        turns += [("user", long_text(model_dir, i, 200)), ("assistant", long_text(model_dir, 100 + i, 200))]
    history = [{"role": r, "content": t} for r, t in turns]
    prompt = "And what did we say first?"
    full = turns + [("user", prompt)]
    assert len(prompt_ids(model_dir, full)) + 32 > context_window  # the whole chat does not fit
    # OneLLM's rule, from the spec: drop whole turns from the oldest until prompt + answer fit
    expected = next(n for start in range(0, len(full), 2)
                    if (n := expected_prompt_tokens(model_dir, full[start:], 1)) + max_tokens <= context_window)

    response = client.post("/v1/chat", files=[("audio", ("a.flac", media.audio("flac", seed=53), "audio/flac"))],
                           data={"messages": json.dumps(history), "prompt": prompt, "max_tokens": str(max_tokens),
                                 "stream": "false"})
    assert response.status_code == 200, response.text
    usage = response.json()["usage"]
    assert usage["prompt_tokens"] == expected
    assert usage["prompt_tokens"] + usage["completion_tokens"] <= context_window


@pytest.mark.parametrize("endpoint", ["/v1/chat", "/v1/chat/completions"])
def test_current_turn_alone_over_the_context_is_a_400(client, model_dir, context_window, endpoint):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                {"role": "user", "content": long_text(model_dir, 1, context_window + 10)}]
    if endpoint == "/v1/chat":
        response = client.post(endpoint, data={"messages": json.dumps(messages), "max_tokens": "2"})
    else:
        response = client.post(endpoint, json={"messages": messages, "max_tokens": 2})
    assert_error(response, 400, "messages")


def test_a_current_turn_that_nearly_fills_the_context_gets_the_room_left(client, model_dir, context_window):
    prompt = long_text(model_dir, 2, context_window - 90)
    expected = expected_prompt_tokens(model_dir, [("user", prompt)], attachments=0)
    assert 0 < context_window - expected < 50, "adjust the prompt length"
    body = completion(client, max_tokens=50, messages=[{"role": "user", "content": prompt}])
    assert body["usage"]["prompt_tokens"] == expected
    assert body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"] <= context_window


# --- the two endpoints agree --------------------------------------------------------------------

def parts_for(name: str, seed: int) -> tuple[list, dict, list, dict]:
    """(multipart files, extra form fields, OpenAI content parts, extra JSON fields) for one attachment."""
    if name == "image":
        data = media.image("png", seed)
        return [("image", ("a.png", data, "image/png"))], {}, [
            {"type": "image_url", "image_url": {"url": data_url(data, "image/png")}}], {}
    if name == "audio":
        data = media.audio("wav", seed)
        return [("audio", ("a.wav", data, "audio/wav"))], {}, [
            {"type": "input_audio", "input_audio": {"data": b64(data), "format": "wav"}}], {}
    if name == "video":
        data = media.video("mp4", seed)
        return [("video", ("a.mp4", data, "video/mp4"))], {}, [
            {"type": "video_url", "video_url": {"url": data_url(data, "video/mp4")}}], {}
    if name == "point":
        data = media.point("npy", seed)
        return [("point", ("a.npy", data, "application/octet-stream"))], {}, [
            {"type": "input_point", "input_point": {"data": b64(data)}}], {}
    if name == "rgbd":
        image, depth = media.image("jpg", seed), media.depth_map(seed)
        return [("image", ("a.jpg", image, "image/jpeg")), ("depth", ("d.png", depth, "image/png"))], {}, [
            {"type": "image_url", "image_url": {"url": data_url(image, "image/jpeg")}},
            {"type": "input_depth", "input_depth": {"data": b64(depth)}}], {}
    if name == "rgbn":
        image, normal = media.image("webp", seed), media.normal_map(seed)
        return [("image", ("a.webp", image, "image/webp")), ("normal", ("n.png", normal, "image/png"))], {}, [
            {"type": "image_url", "image_url": {"url": data_url(image, "image/webp")}},
            {"type": "input_normal", "input_normal": {"data": b64(normal)}}], {}
    if name == "fmri":
        data = media.fmri("npy", seed)
        return [("fmri", ("a.npy", data, "application/octet-stream"))], {}, [
            {"type": "input_fmri", "input_fmri": {"data": b64(data)}}], {}
    if name == "imu":
        data = media.imu("csv", seed, rate=50)
        return [("imu", ("a.csv", data, "text/csv"))], {"imu_sample_rate": "50"}, [
            {"type": "input_imu", "input_imu": {"data": b64(data), "sample_rate": 50}}], {}
    raise AssertionError(name)


@pytest.mark.parametrize("modality", ["image", "audio", "video", "point", "rgbd", "rgbn", "fmri", "imu"])
def test_both_endpoints_give_the_same_greedy_answer(client, modality):
    prompt = "Describe it in detail."
    files, form, parts, extra = parts_for(modality, seed=60)
    multipart = client.post("/v1/chat", files=files, data={"prompt": prompt, "max_tokens": "6", "temperature": "0",
                                                           "stream": "false", **form})
    assert multipart.status_code == 200, multipart.text
    openai_style = completion(client, max_tokens=6, temperature=0, **extra,
                              messages=[{"role": "user", "content": [{"type": "text", "text": prompt}, *parts]}])
    assert openai_style["object"] == "chat.completion"
    assert openai_style["choices"][0]["message"]["content"] == multipart.json()["choices"][0]["message"]["content"]
    assert openai_style["usage"] == multipart.json()["usage"]


def test_imu_sample_rate_changes_the_input(client):
    """The same IMU file read at 50 Hz and at 200 Hz is two different inputs (two encoder runs)."""
    data = media.imu("npy", seed=61, rate=50)
    before = metric(client, "onellm_encoder_runs_total", modality="imu")
    for rate in ("50", "200"):
        response = client.post("/v1/chat", files=[("imu", ("a.npy", data, "application/octet-stream"))],
                               data={"prompt": "Which activity?", "imu_sample_rate": rate, "max_tokens": "1",
                                     "stream": "false"})
        assert response.status_code == 200, response.text
    assert metric(client, "onellm_encoder_runs_total", modality="imu") == before + 2


# --- the openai SDK -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sdk(base_url):
    with openai.OpenAI(base_url=f"{base_url}/v1", api_key="not-needed", max_retries=0, timeout=120) as c:
        yield c


def test_sdk_lists_the_model(sdk, served_model):
    models = sdk.models.list()
    assert [m.id for m in models.data] == [served_model]


@pytest.mark.parametrize("kind", ["image", "audio"])
def test_sdk_streams_with_an_attachment(sdk, served_model, model_dir, kind):
    if kind == "image":
        part = {"type": "image_url", "image_url": {"url": data_url(media.image("jpg", seed=70), "image/jpeg")}}
    else:
        part = {"type": "input_audio", "input_audio": {"data": b64(media.audio("wav", seed=70)), "format": "wav"}}
    stream = sdk.chat.completions.create(
        model=served_model, max_tokens=4, temperature=0, stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": [{"type": "text", "text": "What is this?"}, part]}])
    chunks = list(stream)
    with_choices = [c for c in chunks if c.choices]
    assert with_choices[0].choices[0].delta.role == "assistant"
    assert with_choices[-1].choices[0].finish_reason in ("stop", "length")
    text = "".join(c.choices[0].delta.content or "" for c in with_choices)
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.prompt_tokens == expected_prompt_tokens(model_dir, [("user", "What is this?")], 1)
    assert 1 <= chunks[-1].usage.completion_tokens <= 4
    # the same request without streaming answers the same text
    whole = sdk.chat.completions.create(
        model=served_model, max_tokens=4, temperature=0,
        messages=[{"role": "user", "content": [{"type": "text", "text": "What is this?"}, part]}])
    assert whole.choices[0].message.content == text


def test_sdk_reports_errors_as_api_errors(sdk):
    with pytest.raises(openai.NotFoundError) as raised:
        sdk.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}], max_tokens=1)
    assert raised.value.body["param"] == "model"


# --- remote URLs from an allowed host ---------------------------------------------------------

def test_remote_url_from_an_allowed_host_is_fetched(client, file_server):
    data = media.image("png", seed=80)
    file_server.files["/pictures/cat.png"] = data
    prompt = [{"type": "text", "text": "What is in it?"}]
    remote = completion(client, max_tokens=5, messages=[{"role": "user", "content": [
        *prompt, {"type": "image_url", "image_url": {"url": file_server.url("/pictures/cat.png")}}]}])
    inline = completion(client, max_tokens=5, messages=[{"role": "user", "content": [
        *prompt, {"type": "image_url", "image_url": {"url": data_url(data, "image/png")}}]}])
    assert remote["choices"][0]["message"]["content"] == inline["choices"][0]["message"]["content"]
    assert remote["usage"] == inline["usage"]
    assert file_server.requested.count("/pictures/cat.png") == 1


def test_remote_url_that_is_missing_is_a_422(client, file_server):
    response = client.post("/v1/chat/completions", json={"max_tokens": 1, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": file_server.url("/no/such.png")}}]}]})
    assert_error(response, 422, "messages[0].content[0].image_url.url")


# --- the prefix cache ---------------------------------------------------------------------------

def test_the_same_image_twice_runs_the_encoder_once(client):
    data = media.image("png", seed=90)
    runs = metric(client, "onellm_encoder_runs_total", modality="image")
    hits = metric(client, "onellm_prefix_cache_hits_total", modality="image")
    for _ in range(2):
        response = client.post("/v1/chat", files=[("image", ("same.png", data, "image/png"))],
                               data={"prompt": "Again?", "max_tokens": "1", "stream": "false"})
        assert response.status_code == 200, response.text
    assert metric(client, "onellm_encoder_runs_total", modality="image") == runs + 1
    assert metric(client, "onellm_prefix_cache_hits_total", modality="image") == hits + 1
    # the same bytes through the other endpoint are the same cache entry
    completion(client, max_tokens=1, messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(data, "image/png")}}]}])
    assert metric(client, "onellm_encoder_runs_total", modality="image") == runs + 1
    assert metric(client, "onellm_prefix_cache_hits_total", modality="image") == hits + 2


def test_a_data_url_of_several_mib_carries_exactly_the_uploaded_bytes(client):
    """A large data URL is decoded a piece at a time; the bytes come out as the multipart upload
    of the same file, so the second request finds the first one's prefix in the cache."""
    data = media.image("png", seed=91, width=1200, height=1000)
    assert len(b64(data)) > 3 * BASE64_PIECE
    runs = metric(client, "onellm_encoder_runs_total", modality="image")
    multipart = client.post("/v1/chat", files=[("image", ("big.png", data, "image/png"))],
                            data={"prompt": "What is it?", "max_tokens": "4", "stream": "false"})
    assert multipart.status_code == 200, multipart.text
    openai_style = completion(client, max_tokens=4, messages=[{"role": "user", "content": [
        {"type": "text", "text": "What is it?"}, {"type": "image_url", "image_url": {"url": data_url(data, "image/png")}}]}])
    assert metric(client, "onellm_encoder_runs_total", modality="image") == runs + 1
    assert openai_style["choices"][0]["message"]["content"] == multipart.json()["choices"][0]["message"]["content"]


# --- a client that hangs up ---------------------------------------------------------------------

def test_client_disconnect_mid_stream_leaves_the_server_healthy(client, base_url):
    label = "image"
    dropped = metric(client, "onellm_requests_total", modality=label, status="499")
    with httpx.Client(base_url=base_url, timeout=60) as own:
        with own.stream("POST", "/v1/chat", files=[("image", ("a.png", media.image("png", seed=95), "image/png"))],
                        data={"prompt": "Write a very long story.", "max_tokens": "1500"}) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            seen = 0
            for line in lines:
                if line.startswith("data: {"):
                    seen += 1
                if seen == 3:  # the role chunk and two deltas: the answer has started
                    break
        # leaving the block closes the connection mid-answer
    assert wait_metric(client, "onellm_requests_total", dropped + 1, timeout=30,
                       modality=label, status="499") == dropped + 1
    deadline = time.monotonic() + 10
    while metric(client, "onellm_queue_depth") != 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metric(client, "onellm_queue_depth") == 0
    assert client.get("/health").status_code == 200
    assert client.get("/ready").status_code == 200
    text, _ = parse_sse(client.post("/v1/chat", data={"prompt": "Still there?", "max_tokens": "2"}))


# --- sampling parameters ------------------------------------------------------------------------

@pytest.mark.parametrize("endpoint", ["/v1/chat", "/v1/chat/completions"])
def test_a_stop_string_ends_the_answer_before_it(client, endpoint):
    def ask(**extra):
        if endpoint == "/v1/chat":
            fields = {"prompt": "Count slowly.", "max_tokens": "12", "stream": "false"}
            fields.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in extra.items()})
            response = client.post(endpoint, data=fields)
        else:
            response = client.post(endpoint, json={"messages": [{"role": "user", "content": "Count slowly."}],
                                                   "max_tokens": 12, **extra})
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]

    free = ask()["message"]["content"]
    stop = free.strip()[len(free.strip()) // 2:][:2]  # two characters from the middle of the greedy answer
    assert len(stop) == 2, f"the greedy answer {free!r} is too short for this test"
    stopped = ask(stop=[stop, "never-appears"])
    assert stopped["message"]["content"] == free[: free.index(stop)]
    assert stopped["finish_reason"] == "stop"


def test_four_stops_of_a_kilobyte_that_never_complete_leave_the_answer_whole(client):
    def ask(**extra):
        response = client.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "Count slowly."}], "max_tokens": 40, **extra})
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]

    free = ask()
    answer = free["message"]["content"]
    assert len(answer) > 8, f"the greedy answer {answer!r} is too short for this test"
    # each begins as the answer does, so the whole answer is held back as it comes, then released
    stops = [(answer[:n] + "\u0000" * 1024)[:1024] for n in (1, len(answer) // 2, len(answer))] + ["~" * 1024]
    stopped = ask(stop=stops)
    assert stopped["message"]["content"] == answer
    assert stopped["finish_reason"] == free["finish_reason"]


def test_the_same_seed_samples_the_same_answer(client):
    def sample(seed):
        response = client.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "Say something random."}], "max_tokens": 8,
            "temperature": 1.0, "top_p": 0.9, "seed": seed})
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]["message"]["content"]

    assert sample(1234) == sample(1234)
    assert len({sample(s) for s in range(4)}) > 1  # and sampling does sample


def test_output_tokens_and_time_to_first_token_are_measured(client):
    tokens = metric(client, "onellm_output_tokens_total")
    ttft = metric(client, "onellm_time_to_first_token_seconds_count")
    body = completion(client, max_tokens=3, messages=[{"role": "user", "content": "One more."}])
    assert metric(client, "onellm_output_tokens_total") == tokens + body["usage"]["completion_tokens"]
    assert metric(client, "onellm_time_to_first_token_seconds_count") == ttft + 1


# --- concurrency ----------------------------------------------------------------------------------

def test_concurrent_requests_get_the_answers_they_would_get_alone(base_url):
    """Requests arriving together share the encoder (its batches) and the engine; each must still get
    exactly its own greedy answer. Solo and concurrent requests send the same pixels in different
    bytes, so the prefix cache cannot hand the concurrent ones the solo ones' prefixes."""
    from concurrent.futures import ThreadPoolExecutor

    colours = [(255, 0, 0), (0, 0, 255), (0, 0, 0), (255, 255, 255), (0, 255, 0)]

    def ask(colour, tag: str, stream: bool) -> str:
        with httpx.Client(base_url=base_url, timeout=120) as own:
            response = own.post("/v1/chat", files=[("image", ("a.png", media.solid_png(colour, tag), "image/png"))],
                                data={"prompt": "What is it?", "max_tokens": "6", "stream": str(stream).lower()})
            if stream:
                return parse_sse(response)[0]
            assert response.status_code == 200, response.text
            return response.json()["choices"][0]["message"]["content"]

    alone = [ask(colour, "alone", stream=False) for colour in colours]
    assert len(set(alone)) > 1, "every picture gave the same answer: this comparison would prove nothing"
    with ThreadPoolExecutor(len(colours)) as pool:
        together = list(pool.map(lambda i: ask(colours[i], "together", stream=i % 2 == 0), range(len(colours))))
    assert together == alone
