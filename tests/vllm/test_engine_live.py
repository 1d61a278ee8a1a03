"""VLLMEngine against a real vLLM server serving the LLM converted from the reference fixture."""

import asyncio
import json
import re
import time

import httpx
import pytest
import torch
from safetensors import safe_open
from transformers import AutoTokenizer, LlamaForCausalLM

from server.engines.base import EngineUnavailable, PromptRejected, Sampling, Usage
from server.engines.replicas import ReplicatedVLLMEngine
from server.engines.routing import Router
from server.engines.vllm import SSEParser, VLLMEngine, completion_request, request_json
from server.metrics import Metrics
from vllm_standin import RECORDED_STREAM, StandInVLLM

MODALITIES = ["image", "video", "audio", "point", "rgbd", "rgbn", "fmri", "imu"]


@pytest.fixture(scope="module")
def reference(fixture_dir):
    return json.loads((fixture_dir / "reference.json").read_text())["cases"]


@pytest.fixture(scope="module")
def encoder_weights(vllm_model_dir):
    """The converted folder's embedding table and modality tags (all the LLM inputs need)."""
    with safe_open(vllm_model_dir / "encoder.safetensors", "pt") as weights:
        return {key: weights.get_tensor(key) for key in weights.keys()
                if key == "tok_embeddings.weight" or "_tag." in key}


@pytest.fixture(scope="module")
def llm(vllm_model_dir):
    return LlamaForCausalLM.from_pretrained(vllm_model_dir / "llm", dtype=torch.float32).eval()


def text_embeddings(weights, ids: list[int]) -> torch.Tensor:
    return weights["tok_embeddings.weight"][ids]


def prompt_embeddings(weights, modality: str, prefix: torch.Tensor, ids: list[int]) -> torch.Tensor:
    """ONELLM.md §3: [E(BOS), start_tag, prefix (30 rows), end_tag, E(ids[1:])]."""
    table = weights["tok_embeddings.weight"]
    width = table.shape[1]
    return torch.cat([table[ids[:1]], weights[f"start_tag.{modality}"].reshape(-1, width), prefix,
                      weights[f"end_tag.{modality}"].reshape(-1, width), table[ids[1:]]])


@torch.inference_mode()
def transformers_greedy(llm, embeddings: torch.Tensor, count: int) -> list[int]:
    """Greedy ids, each step recomputed over the whole sequence, stopping at EOS."""
    sequence = embeddings.unsqueeze(0)
    ids = []
    for _ in range(count):
        token = int(llm(inputs_embeds=sequence).logits[0, -1].argmax())
        ids.append(token)
        if token == llm.config.eos_token_id:
            break
        sequence = torch.cat([sequence, llm.get_input_embeddings().weight[[token]].unsqueeze(0)], dim=1)
    return ids


def generate(url: str, embeddings: torch.Tensor, sampling: Sampling,
             cache_salt: str | None = None) -> tuple[str, Usage]:
    async def run():
        engine = VLLMEngine(url)
        usage = Usage()
        try:
            text = "".join([delta async for delta in engine.stream(embeddings, sampling, usage,
                                                                   cache_salt=cache_salt)])
        finally:
            await engine.close()
        return text, usage
    return asyncio.run(run())


def metric(url: str, name: str, **labels: str) -> float:
    """The sum of a Prometheus metric's samples on vLLM's /metrics matching `labels`."""
    total = 0.0
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        match = re.fullmatch(rf"{re.escape(name)}\{{(.*)\}} (\S+)", line)
        if match and all(f'{key}="{value}"' in match.group(1) for key, value in labels.items()):
            total += float(match.group(2))
    return total


def test_text_prompt_matches_transformers(vllm_server, vllm_model_dir, encoder_weights, llm, reference):
    embeddings = text_embeddings(encoder_weights, reference["image"]["prompt_ids"])
    expected_ids = transformers_greedy(llm, embeddings, 24)

    text, usage = generate(vllm_server, embeddings, Sampling(max_tokens=24))

    assert usage.token_ids == expected_ids
    assert usage.completion_tokens == len(expected_ids)
    assert usage.finish_reason == ("stop" if expected_ids[-1] == llm.config.eos_token_id else "length")
    tokenizer = AutoTokenizer.from_pretrained(vllm_model_dir / "llm")
    assert text == tokenizer.decode(expected_ids, skip_special_tokens=True)


@pytest.mark.parametrize("modality", MODALITIES)
def test_reference_prefix_gives_reference_greedy_ids(vllm_server, encoder_weights, reference, fixture_dir, modality):
    """The authors' own UPM output through the converted LLM on vLLM: their greedy ids."""
    case = reference[modality]
    with safe_open(fixture_dir / "reference.safetensors", "pt") as tensors:
        prefix = tensors.get_tensor(f"{modality}.prefix")
    embeddings = prompt_embeddings(encoder_weights, modality, prefix, case["prompt_ids"])

    _, usage = generate(vllm_server, embeddings,
                        Sampling(max_tokens=len(case["greedy_ids"]), stop=(), ignore_eos=True))

    assert usage.token_ids == case["greedy_ids"]
    assert usage.finish_reason == "length"


def test_cached_prompt_blocks_serve_only_requests_of_the_same_cache_salt(vllm_server, encoder_weights):
    """vLLM's prefix cache keeps a prompt's full 32-row KV blocks; a request of another tenant (another
    salt) computes them again, one of the same tenant reuses them."""
    rows = text_embeddings(encoder_weights, [1] + list(range(2000, 2099)))  # 100 rows no other test sends

    def rows_reused(salt: str | None) -> float:
        before = metric(vllm_server, "vllm:prefix_cache_hits_total")
        generate(vllm_server, rows, Sampling(max_tokens=1), salt)
        return metric(vllm_server, "vllm:prefix_cache_hits_total") - before

    assert rows_reused("tenant-a") == 0
    assert rows_reused("tenant-b") == 0
    assert rows_reused(None) == 0
    assert rows_reused("tenant-a") == 96  # its three full blocks
    assert rows_reused(None) == 96


def test_prompt_longer_than_the_context_is_a_400(vllm_server, encoder_weights):
    embeddings = text_embeddings(encoder_weights, [1] + [319] * 2100)
    with pytest.raises(PromptRejected) as error:
        generate(vllm_server, embeddings, Sampling(max_tokens=4))
    # vLLM's own text stays in the log; the client is told in our words, with a code to act on
    assert error.value.status == 400
    assert error.value.code == "context_length_exceeded", error.value.message


def test_a_prompt_vllm_rejects_is_not_retried_on_another_replica(vllm_server, encoder_weights):
    """Over two backends, the real vLLM first: its 400 for a prompt past the context is the
    prompt's fault, so the other backend is not asked and the real one stays healthy."""
    other = StandInVLLM()
    urls = [vllm_server, other.url]
    affinity = next(key for key in (f"chat-{i}" for i in range(1000)) if Router(urls).pick(key) == vllm_server)
    embeddings = text_embeddings(encoder_weights, [1] + [319] * 2100)

    async def run():
        engine = ReplicatedVLLMEngine(urls, Metrics(), probe_interval_s=3600)
        try:
            with pytest.raises(PromptRejected) as error:
                async for _ in engine.stream(embeddings, Sampling(max_tokens=4), None, affinity):
                    pass
        finally:
            await engine.close()
        return engine, error.value

    try:
        engine, error = asyncio.run(run())
    finally:
        other.stop()
    assert error.status == 400 and error.code == "context_length_exceeded"
    assert other.posted == []
    registry = engine.metrics.registry
    assert registry.get_sample_value("onellm_vllm_backend_healthy", {"backend": vllm_server}) == 1
    assert registry.get_sample_value("onellm_vllm_retries_total") == 0


def stream_shape(events: list[str]) -> list:
    """What a client of the stream relies on, without the values: each event's fields (and its
    choices' fields), which fields are null, and the order of the events. Events of one shape in a
    row count once: vLLM sends together the tokens made since its last event, so a busy machine
    gets fewer events for the same tokens."""
    shape = []
    for data in events:
        if data == "[DONE]":
            shape.append(data)
            continue
        event = json.loads(data)
        choices = [(sorted(c), sorted(k for k, v in c.items() if v is None)) for c in event["choices"]]
        this = (sorted(event), choices, sorted(event.get("usage") or {}))
        if not shape or shape[-1] != this:
            shape.append(this)
    return shape


def test_the_standin_vllm_streams_what_the_real_one_does(vllm_server, encoder_weights, reference):
    """tests/vllm_standin.py answers with a stream recorded from this vLLM; asked the same (4 tokens,
    as the recording), the real one's events must have the same fields in the same order, so
    that the stand-in cannot drift from what it stands in for."""
    embeddings = text_embeddings(encoder_weights, reference["image"]["prompt_ids"])
    model = httpx.get(f"{vllm_server}/v1/models", timeout=10).json()["data"][0]["id"]
    body = completion_request(embeddings, Sampling(max_tokens=4, stop=(), ignore_eos=True), model)
    events = []
    parser = SSEParser()
    with httpx.stream("POST", f"{vllm_server}/v1/completions", content=request_json(body), timeout=120,
                      headers={"Content-Type": "application/json"}) as response:
        assert response.status_code == 200
        for chunk in response.iter_bytes():
            events += parser.feed(chunk)
    assert stream_shape(events) == stream_shape(SSEParser().feed(RECORDED_STREAM)), events
    assert len([token for data in events[:-1] for choice in json.loads(data)["choices"]
                for token in choice["token_ids"]]) == 4, events


def test_closing_the_stream_aborts_the_request_in_vllm(vllm_server, encoder_weights, reference):
    embeddings = text_embeddings(encoder_weights, reference["image"]["prompt_ids"])
    # as long as the context allows: seconds of decoding
    sampling = Sampling(max_tokens=2048 - embeddings.shape[0], ignore_eos=True)

    async def two_deltas_then_close():
        engine = VLLMEngine(vllm_server)
        stream = engine.stream(embeddings, sampling)
        deltas = [await anext(stream), await anext(stream)]
        await stream.aclose()
        await engine.close()
        return deltas

    # On a busy CPU vLLM's HTTP front end can relay the first deltas only after its engine
    # has finished the whole request: then there is nothing left to abort and the attempt
    # proves nothing, so it is made again. A client close that never reaches vLLM fails
    # every attempt.
    for _ in range(3):
        finished_before = metric(vllm_server, "vllm:request_success_total")
        generated_before = metric(vllm_server, "vllm:generation_tokens_total")
        assert len(asyncio.run(two_deltas_then_close())) == 2

        deadline = time.monotonic() + 30
        while (running := metric(vllm_server, "vllm:num_requests_running")) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert running == 0
        # vLLM counts no finished request for a client's abort
        if metric(vllm_server, "vllm:request_success_total") == finished_before:
            break
    else:
        pytest.fail("vLLM finished every request instead of aborting it when the client closed the stream")
    assert metric(vllm_server, "vllm:generation_tokens_total") - generated_before < sampling.max_tokens


def test_engine_survives_a_vllm_restart(throwaway_vllm, encoder_weights, reference):
    """A second server, stopped and started again under one engine: no restart of the engine."""
    server = throwaway_vllm
    embeddings = text_embeddings(encoder_weights, reference["image"]["prompt_ids"])
    sampling = Sampling(max_tokens=4, stop=(), ignore_eos=True)

    async def ready_and_ids(engine):
        usage = Usage()
        async for _ in engine.stream(embeddings, sampling, usage):
            pass
        return await engine.ready(), usage.token_ids

    async def while_stopped(engine):
        ready = await engine.ready()
        with pytest.raises(EngineUnavailable, match="cannot connect"):
            async for _ in engine.stream(embeddings, sampling):
                pass
        return ready

    async def scenario():
        engine = VLLMEngine(server.url)
        try:
            before = await ready_and_ids(engine)
            server.stop()
            ready_while_stopped = await while_stopped(engine)
            server.start()
            after = await ready_and_ids(engine)
        finally:
            await engine.close()
        return before, ready_while_stopped, after

    before, ready_while_stopped, after = asyncio.run(scenario())
    assert before[0] is True and len(before[1]) == 4
    assert ready_while_stopped is False
    assert after == before
