"""The production path, gateway -> live vLLM, on the model converted from the reference fixture."""

import asyncio
import base64
import json
import re
import time

import httpx
import pytest

import media
from gateway_process import GatewayProcess
from server.cli import main
from server.engines.base import Sampling
from server.engines.local import LocalEngine
from server.model.onellm import load_model
from server.config import Settings
from server.media.modalities import preprocess
from server.media.modalities.base import Decoding
from test_engine_live import metric

MAX_TOKENS = 8
QUESTION = "What is this?"
UPLOADS = {  # one real file per modality, as clients send them
    "image": {"image": media.image("png")},
    "video": {"video": media.video("mp4")},
    "audio": {"audio": media.audio("wav")},
    "point": {"point": media.point("ply")},
    "rgbd": {"image": media.image("jpg"), "depth": media.depth_map()},
    "rgbn": {"image": media.image("webp"), "normal": media.normal_map()},
    "fmri": {"fmri": media.fmri("npy")},
    "imu": {"imu": media.imu("csv", rate=200.0)},
}


def test_parity_through_vllm_matches_the_reference_greedy_ids(fixture_dir, vllm_model_dir, vllm_server, capsys):
    code = main(["parity", str(fixture_dir), "--model", str(vllm_model_dir), "--vllm-url", vllm_server])
    out = capsys.readouterr().out
    assert code == 0, out
    assert out.count("24/24") == 8, out


@pytest.fixture(scope="module")
def gateway(vllm_model_dir, vllm_server, tmp_path_factory):
    # float32 as `in_process` below: its answers are what the gateway's must equal
    server = GatewayProcess(vllm_model_dir, tmp_path_factory.mktemp("gateway-vllm"),
                            ["--vllm-url", vllm_server, "--dtype", "float32"])
    server.start()
    yield server.url
    server.stop()


@pytest.fixture(scope="module")
def in_process(vllm_model_dir):
    """The same model decoded by transformers in this process: what vLLM's greedy answers must equal."""
    model = load_model(vllm_model_dir, dtype="float32")  # as the gateway: the same prefixes, bit for bit
    engine = LocalEngine(vllm_model_dir / "llm")

    def answer(modality: str, files: dict[str, bytes]) -> str:
        prefix = model.encode(modality, preprocess(modality, files, Decoding(Settings().decoder_limits()))[None])[0]
        embeddings = model.embeddings(model.prompt_ids([("user", QUESTION)]), [(modality, prefix)])

        async def collect():
            return "".join([d async for d in engine.stream(embeddings, Sampling(max_tokens=MAX_TOKENS))])

        return asyncio.run(collect())

    return answer


def sse_text(body: str) -> str:
    events = re.findall(r"^data: (.*)$", body, flags=re.M)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)


@pytest.mark.parametrize("modality", list(UPLOADS))
def test_each_modality_through_the_gateway_streamed_and_not(gateway, in_process, modality):
    files = [(field, (field, data)) for field, data in UPLOADS[modality].items()]
    form = {"prompt": QUESTION, "max_tokens": str(MAX_TOKENS)}
    streamed = httpx.post(f"{gateway}/v1/chat", data=form, files=files, timeout=120)
    assert streamed.status_code == 200, streamed.text
    whole = httpx.post(f"{gateway}/v1/chat", data={**form, "stream": "false"}, files=files, timeout=120)
    assert whole.status_code == 200, whole.text
    body = whole.json()
    text = sse_text(streamed.text)
    assert body["choices"][0]["message"]["content"] == text
    assert body["usage"]["prompt_tokens"] > 32
    assert text == in_process(modality, UPLOADS[modality])


def test_a_client_leaving_mid_stream_ends_the_request_in_vllm(gateway, vllm_server):
    asked = 1500
    # as in test_engine_live: on a busy CPU vLLM may relay the first text only once it has
    # finished the whole answer, leaving nothing to abort; such an attempt is made again
    for _ in range(3):
        finished_before = metric(vllm_server, "vllm:request_success_total")
        generated_before = metric(vllm_server, "vllm:generation_tokens_total")
        # a prompt the model keeps answering (no early EOS), without an attachment
        with httpx.stream("POST", f"{gateway}/v1/chat", timeout=120,
                          data={"prompt": "Write a very long story about a cat.", "max_tokens": str(asked)}) as response:
            assert response.status_code == 200
            contents = 0
            for line in response.iter_lines():
                contents += line.startswith("data: ") and '"content":"' in line and '"content":""' not in line
                if contents >= 2:
                    break
        deadline = time.monotonic() + 60
        while metric(vllm_server, "vllm:num_requests_running") > 0:
            assert time.monotonic() < deadline, "vLLM still runs the request the client left"
            time.sleep(0.2)
        if metric(vllm_server, "vllm:request_success_total") == finished_before:  # aborted, not finished
            break
    else:
        pytest.fail("vLLM finished every request instead of aborting it when the client left the gateway")
    assert metric(vllm_server, "vllm:generation_tokens_total") - generated_before < asked
    assert httpx.get(f"{gateway}/ready", timeout=5).status_code == 200


def test_follow_ups_by_reference_and_by_previous_response_answer_as_resending(gateway):
    """A video sent once, then named by its uuid (chat completions) or carried by the stored
    conversation (Responses API): vLLM gets the same prompt, so greedy answers are the same."""
    openai = pytest.importorskip("openai")
    sdk = openai.OpenAI(base_url=f"{gateway}/v1", api_key="unused")
    clip = "data:video/mp4;base64," + base64.b64encode(media.video("mp4", seed=9)).decode()
    questions = ["What happens?", "And then?", "Why?"]

    def turns(first_part: dict, later_part: dict) -> list[str]:
        """The video in the first turn only: `first_part` when first sent, `later_part` in the history."""
        messages, answers = [], []
        for i, question in enumerate(questions):
            messages.append({"role": "user", "content": [{"type": "text", "text": question}]})
            if i == 0:
                messages[0]["content"].insert(0, first_part)
            reply = sdk.chat.completions.create(messages=messages, max_tokens=MAX_TOKENS, temperature=0,
                                                model="onellm-ref-tiny")
            answers.append(reply.choices[0].message.content)
            messages[0]["content"][0] = later_part
            messages.append({"role": "assistant", "content": answers[-1]})
        return answers

    with_data = {"type": "video_url", "video_url": {"url": clip}}
    resent = turns(with_data, with_data)
    assert turns({**with_data, "uuid": "clip-9"}, {"type": "video_url", "uuid": "clip-9"}) == resent

    response = sdk.responses.create(model="onellm-ref-tiny", max_output_tokens=MAX_TOKENS, input=[{"role": "user", "content": [
        {"type": "input_video", "video_url": clip}, {"type": "input_text", "text": questions[0]}]}])
    chained = [response.output_text]
    for question in questions[1:]:
        response = sdk.responses.create(model="onellm-ref-tiny", max_output_tokens=MAX_TOKENS, input=question,
                                        previous_response_id=response.id)
        chained.append(response.output_text)
    assert chained == resent
