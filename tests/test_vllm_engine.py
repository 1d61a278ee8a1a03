"""The vLLM engine without a vLLM: request bodies, the SSE parser, and the engine's behaviour
against the stand-in vLLM on a loopback socket (tests/vllm_standin.py: recorded answers and the
faults it makes for real); httpx.MockTransport only for what the stand-in cannot send or see
(an error event, vLLM's abort, a stream ending cleanly without [DONE], the client closing)."""

import asyncio
import base64
import io
import socket
import threading

import httpx
import pytest
import torch

import server.engines.vllm
from server.engines.base import EngineUnavailable, PromptRejected, Sampling, Usage
from server.engines.vllm import SSEParser, VLLMEngine, completion_request
from vllm_standin import FAIL, HOLD, MODELS, RECORDED_DELTAS, RECORDED_IDS, RECORDED_STREAM, REJECT, StandInVLLM


def decode_embeddings(body: dict) -> torch.Tensor:
    return torch.load(io.BytesIO(base64.b64decode(body["prompt_embeds"])), weights_only=True)


# --- request bodies -------------------------------------------------------------------

def test_request_body_fields():
    sampling = Sampling(max_tokens=17, temperature=0.7, top_p=0.9, stop=("\n\n",), seed=5)
    body = completion_request(torch.zeros(3, 8), sampling, "my-model")
    assert body["model"] == "my-model"
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert body["return_token_ids"] is True
    assert (body["max_tokens"], body["temperature"], body["top_p"], body["seed"]) == (17, 0.7, 0.9, 5)
    assert body["stop"] == ["\n\n", "###"]
    assert body["ignore_eos"] is False
    assert "prompt" not in body


def test_request_body_greedy_defaults():
    body = completion_request(torch.zeros(3, 8), Sampling(), "m")
    assert body["temperature"] == 0.0
    assert body["stop"] == ["###"]
    assert "seed" not in body


def test_turn_separator_always_stops_generation():
    assert completion_request(torch.zeros(1, 4), Sampling(stop=()), "m")["stop"] == ["###"]
    assert completion_request(torch.zeros(1, 4), Sampling(stop=("###", "x")), "m")["stop"] == ["###", "x"]


def test_prompt_embeds_round_trip():
    embeddings = torch.randn(5, 16)
    decoded = decode_embeddings(completion_request(embeddings, Sampling(), "m"))
    assert decoded.dtype == torch.float32
    assert torch.equal(decoded, embeddings)


def test_prompt_embeds_take_the_served_dtype():
    embeddings = torch.randn(5, 16, dtype=torch.float64)
    decoded = decode_embeddings(completion_request(embeddings, Sampling(), "m", dtype=torch.float16))
    assert decoded.dtype == torch.float16
    assert torch.equal(decoded, embeddings.half())


def test_prompt_embeds_are_contiguous_and_own_their_storage():
    # a view of a larger tensor must not ship the whole storage it looks into
    table = torch.randn(1000, 16)
    decoded = decode_embeddings(completion_request(table[[3, 1]].t().t(), Sampling(), "m"))
    assert torch.equal(decoded, table[[3, 1]])
    def size(tensor):
        return len(completion_request(tensor, Sampling(), "m")["prompt_embeds"])
    assert size(table[:2]) == size(table[:2].clone())


def test_embeddings_must_be_two_dimensional():
    with pytest.raises(ValueError, match=r"\[L, D\]"):
        completion_request(torch.zeros(1, 3, 8), Sampling(), "m")


# --- SSE parser -----------------------------------------------------------------------

def parse_in_chunks(data: bytes, size: int) -> list[str]:
    parser = SSEParser()
    events = []
    for start in range(0, len(data), size):
        events += parser.feed(data[start:start + size])
    return events


def test_sse_parser_whole_stream():
    events = SSEParser().feed(RECORDED_STREAM)
    assert len(events) == 6
    assert events[-1] == "[DONE]"


@pytest.mark.parametrize("size", [1, 2, 3, 7, 64, 333])
def test_sse_parser_chunk_boundaries_anywhere(size):
    # size 1 also cuts the two-byte "ñ" in half
    assert parse_in_chunks(RECORDED_STREAM, size) == SSEParser().feed(RECORDED_STREAM)


def test_sse_parser_every_split_point():
    whole = SSEParser().feed(RECORDED_STREAM)
    for cut in range(1, len(RECORDED_STREAM)):
        parser = SSEParser()
        assert parser.feed(RECORDED_STREAM[:cut]) + parser.feed(RECORDED_STREAM[cut:]) == whole


def test_sse_parser_crlf_comments_and_multiline_data():
    stream = b": keep-alive\r\n\r\ndata: {\"a\":\r\ndata: 1}\r\n\r\ndata:[DONE]\r\n\r\n"
    assert parse_in_chunks(stream, 5) == ['{"a":\n1}', "[DONE]"]


def test_sse_parser_holds_an_unfinished_event():
    parser = SSEParser()
    assert parser.feed(b'data: {"x": 1}\n') == []
    assert parser.feed(b"\n") == ['{"x": 1}']


# --- the engine against recorded answers ----------------------------------------------

class ClosingStream(httpx.AsyncByteStream):
    """A response body that records whether the client closed it."""

    def __init__(self, chunks: list[bytes]):
        self.chunks = chunks
        self.closed = False

    async def __aiter__(self):
        for chunk in self.chunks:
            yield chunk

    async def aclose(self):
        self.closed = True


def fake_vllm(completions, requests: list | None = None):
    """A transport answering /v1/models and /health, and /v1/completions with `completions(request)`."""
    def handle(request: httpx.Request) -> httpx.Response:
        if requests is not None:
            requests.append(request)
        if request.url.path == "/v1/models":
            return httpx.Response(200, json=MODELS)
        if request.url.path == "/health":
            return httpx.Response(200)
        return completions(request)
    return httpx.MockTransport(handle)


def collect(engine: VLLMEngine, sampling: Sampling = Sampling(), usage: Usage | None = None) -> list[str]:
    async def run():
        try:
            return [delta async for delta in engine.stream(torch.zeros(3, 8), sampling, usage)]
        finally:
            await engine.close()
    return asyncio.run(run())


def recorded(chunk_size: int = 50):
    chunks = [RECORDED_STREAM[i:i + chunk_size] for i in range(0, len(RECORDED_STREAM), chunk_size)]
    return lambda request: httpx.Response(200, stream=ClosingStream(chunks))


@pytest.fixture
def standin():
    server = StandInVLLM()
    yield server
    server.release.set()
    server.stop()


def test_stream_relays_deltas_and_fills_usage(standin):
    usage = Usage()
    engine = VLLMEngine(standin.url + "/")
    assert collect(engine, usage=usage) == RECORDED_DELTAS
    assert usage.token_ids == RECORDED_IDS
    assert usage.completion_tokens == 4
    assert usage.finish_reason == "length"
    # the served model was discovered from /v1/models and used in the request
    assert [body["model"] for body in standin.posted] == ["/models/tiny/llm"]


def test_the_embeddings_are_serialised_off_the_event_loop(standin, monkeypatch):
    # on a GPU, moving them to the CPU waits for the device: every other stream would stall
    threads = []
    serialise = server.engines.vllm.encode_embeddings

    def recording(*args):
        threads.append(threading.get_ident())
        return serialise(*args)
    monkeypatch.setattr(server.engines.vllm, "encode_embeddings", recording)

    async def run():
        engine = VLLMEngine(standin.url)
        try:
            return [delta async for delta in engine.stream(torch.zeros(3, 8), Sampling())], threading.get_ident()
        finally:
            await engine.close()
    deltas, loop_thread = asyncio.run(run())
    assert deltas == RECORDED_DELTAS
    assert len(threads) == 1 and threads[0] != loop_thread


def test_model_is_discovered_once():
    requests = []
    engine = VLLMEngine("http://vllm:8000", transport=fake_vllm(recorded(), requests))

    async def twice():
        for _ in range(2):
            async for _ in engine.stream(torch.zeros(3, 8), Sampling()):
                pass
        await engine.close()

    asyncio.run(twice())
    assert [r.url.path for r in requests].count("/v1/models") == 1


def test_closing_the_stream_closes_the_upstream_response():
    body = ClosingStream([RECORDED_STREAM[:400], RECORDED_STREAM[400:]])
    engine = VLLMEngine("http://vllm:8000", model="m",
                        transport=fake_vllm(lambda request: httpx.Response(200, stream=body)))

    async def first_delta_then_close():
        stream = engine.stream(torch.zeros(3, 8), Sampling())
        first = await anext(stream)
        await stream.aclose()
        await engine.close()
        return first

    assert asyncio.run(first_delta_then_close()) == "expe"
    assert body.closed


def test_cancelling_the_consumer_closes_the_upstream_response():
    started = asyncio.Event()

    class Stalling(ClosingStream):
        async def __aiter__(self):
            yield RECORDED_STREAM[:400]
            started.set()
            await asyncio.sleep(3600)

    body = Stalling([])
    engine = VLLMEngine("http://vllm:8000", model="m",
                        transport=fake_vllm(lambda request: httpx.Response(200, stream=body)))

    async def consume():
        async for _ in engine.stream(torch.zeros(3, 8), Sampling()):
            pass

    async def cancel_mid_stream():
        task = asyncio.create_task(consume())
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await engine.close()

    asyncio.run(cancel_mid_stream())
    assert body.closed


def test_prompt_too_long_is_the_clients_mistake_told_in_our_words(standin, caplog):
    standin.completions = REJECT
    engine = VLLMEngine(standin.url, model="m")
    with pytest.raises(PromptRejected) as error:
        collect(engine)
    assert error.value.status == 400
    assert error.value.param == "messages"
    assert error.value.code == "context_length_exceeded"
    assert "context window" in error.value.message
    # vLLM's own text, which changes with its versions, is the operators' to read
    assert "maximum context length" not in error.value.message
    assert "maximum context length is 2048 tokens" in caplog.text


def test_other_requests_vllm_refuses_are_told_without_its_text():
    refusal = b'{"error": {"message": "prompt_embeds of /models/x: bad dtype", "param": null, "code": 400}}'
    engine = VLLMEngine("http://vllm:8000", model="m",
                        transport=fake_vllm(lambda request: httpx.Response(400, content=refusal)))
    with pytest.raises(PromptRejected) as error:
        collect(engine)
    assert (error.value.status, error.value.param, error.value.code) == (400, "messages", None)
    assert "/models/x" not in error.value.message and "context window" not in error.value.message


def test_server_errors_mean_unavailable(standin):
    standin.completions = FAIL
    engine = VLLMEngine(standin.url, model="m")
    with pytest.raises(EngineUnavailable, match=r"\(500\): Internal Server Error"):
        collect(engine)


def test_error_event_mid_stream():
    first_event = RECORDED_STREAM[:RECORDED_STREAM.index(b"\n\n") + 2]
    event = b'data: {"error": {"message": "engine died", "type": "InternalServerError", "code": 500}}\n\n'
    engine = VLLMEngine("http://vllm:8000", model="m",
                        transport=fake_vllm(lambda request: httpx.Response(200, content=first_event + event)))
    with pytest.raises(EngineUnavailable, match="engine died"):
        collect(engine)


def test_vllm_giving_up_on_the_request_is_unavailable():
    aborted = RECORDED_STREAM.replace(b'"finish_reason":"length"', b'"finish_reason":"abort"')
    engine = VLLMEngine("http://vllm:8000", model="m",
                        transport=fake_vllm(lambda request: httpx.Response(200, content=aborted)))
    with pytest.raises(EngineUnavailable, match="abort"):
        collect(engine)


def test_stream_cut_before_done_is_unavailable():
    cut = RECORDED_STREAM[:RECORDED_STREAM.index(b"data: [DONE]")]
    engine = VLLMEngine("http://vllm:8000", model="m",
                        transport=fake_vllm(lambda request: httpx.Response(200, content=cut)))
    with pytest.raises(EngineUnavailable, match="before it finished"):
        collect(engine)


def test_timeout_is_unavailable(standin):
    standin.completions = HOLD  # the first text, then nothing until released
    engine = VLLMEngine(standin.url, model="m", timeout=0.5)
    with pytest.raises(EngineUnavailable, match="timed out: ReadTimeout"):
        collect(engine)


def unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_nothing_listening():
    engine = VLLMEngine(f"http://127.0.0.1:{unused_port()}")

    async def probe():
        ready = await engine.ready()
        with pytest.raises(EngineUnavailable, match="cannot connect"):
            async for _ in engine.stream(torch.zeros(3, 8), Sampling()):
                pass
        await engine.close()
        return ready

    assert asyncio.run(probe()) is False


def test_ready_follows_health(standin):
    engine = VLLMEngine(standin.url)

    async def probe():
        answers = [await engine.ready()]
        standin.healthy = False
        answers.append(await engine.ready())
        await engine.close()
        return answers

    assert asyncio.run(probe()) == [True, False]


def test_the_health_probe_is_answered_while_requests_hold_every_connection():
    """100 answers streaming (httpx's whole request pool) from a stand-in vLLM on loopback: the
    probe has a connection of its own, so the busy backend is still seen to be up."""
    standin = StandInVLLM(completions=HOLD)
    engine = VLLMEngine(standin.url, model="m", health_timeout=2.0)
    held = 100

    async def run():
        streams = [engine.stream(torch.zeros(3, 8), Sampling()) for _ in range(held)]
        for stream in streams:  # one after the other: the stand-in's listen backlog is short
            assert await anext(stream) == RECORDED_DELTAS[0]
        assert len(standin.posted) == held
        try:
            return await engine.ready()
        finally:
            standin.release.set()
            await asyncio.gather(*(s.aclose() for s in streams))
            await engine.close()

    try:
        assert asyncio.run(run())
    finally:
        standin.release.set()
        standin.stop()
