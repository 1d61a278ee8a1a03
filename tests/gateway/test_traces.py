"""Traces of a chat: gateways of their own (sharing a real Redis) with
`--otlp-endpoint` pointing at an OTLP/HTTP receiver in the test; the spans they export are decoded
from their protobuf and checked against the request that made them."""

import base64
import secrets

import httpx
import pytest

import media
from gateway_helpers import expected_prompt_tokens
from gateway_process import GatewayProcess
from otlp_receiver import OtlpReceiver
from waiting import until

REQUEST_SPAN = "POST /v1/chat/completions"
# what one chat with one new image makes, besides its request span
CHILDREN = ("intake", "admission", "attachment", "prefix_cache.local", "prefix_cache.redis", "decode", "encoder.batch", "prompt_assembly", "engine")


@pytest.fixture(scope="module")
def receiver():
    with OtlpReceiver() as r:
        yield r


def start_traced(model_dir, receiver: OtlpReceiver, redis_url: str, workdir):
    # the batch processor's default 5 s between exports would only make the test wait longer
    server = GatewayProcess(model_dir, workdir, ["--otlp-endpoint", receiver.url, "--cache-url", redis_url],
                            env={"OTEL_BSP_SCHEDULE_DELAY": "50", "OTEL_SERVICE_NAME": "gateway-under-test"})
    server.start()
    yield server
    server.stop()
    assert "Traceback" not in server.log(), server.log()[-6000:]


@pytest.fixture(scope="module")
def traced_gateway(model_dir, receiver, redis_server, tmp_path_factory):
    yield from start_traced(model_dir, receiver, redis_server.url, tmp_path_factory.mktemp("traced"))


@pytest.fixture(scope="module")
def second_traced_gateway(model_dir, receiver, redis_server, tmp_path_factory):
    """Another gateway sharing the first one's Redis."""
    yield from start_traced(model_dir, receiver, redis_server.url, tmp_path_factory.mktemp("traced-2"))


def image_chat(gateway: GatewayProcess, image: bytes, trace_id: str, request_id: str) -> dict:
    parent = secrets.token_hex(8)
    url = "data:image/png;base64," + base64.b64encode(image).decode()
    body = {"model": served(gateway), "max_tokens": 5, "temperature": 0.5,
            "messages": [{"role": "user", "content": [{"type": "text", "text": "what is this?"},
                                                      {"type": "image_url", "image_url": {"url": url}}]}]}
    headers = {"traceparent": f"00-{trace_id}-{parent}-01", "X-Request-ID": request_id}
    response = httpx.post(f"{gateway.url}/v1/chat/completions", json=body, headers=headers, timeout=120)
    assert response.status_code == 200, response.text
    return {"parent": parent, "usage": response.json()["usage"], "body_bytes": len(response.request.content)}


def served(gateway: GatewayProcess) -> str:
    return httpx.get(f"{gateway.url}/v1/models").json()["data"][0]["id"]


def traced(receiver: OtlpReceiver, trace_id: str) -> dict:
    """The trace's spans by name, once all of one chat's have arrived."""
    until(lambda: {REQUEST_SPAN, *CHILDREN} <= {s.name for s in receiver.trace(trace_id)}, 60,
          f"the spans of trace {trace_id}")
    return {s.name: s for s in receiver.trace(trace_id)}


def test_a_chat_is_one_trace_under_the_callers_span_with_its_request_id_on_every_span(traced_gateway, receiver,
                                                                                          model_dir):
    trace_id, request_id = secrets.token_hex(16), "trace-test-1"
    sent = image_chat(traced_gateway, media.image("png", seed=801), trace_id, request_id)
    spans = traced(receiver, trace_id)
    request = spans[REQUEST_SPAN]
    assert request.parent_id == sent["parent"] and request.kind == "SPAN_KIND_SERVER"
    assert request.service == "gateway-under-test"  # OTEL_SERVICE_NAME honoured
    assert {s.attributes.get("onellm.request_id") for s in spans.values()} == {request_id}
    # the tree: the attachment's work under its attachment span, the rest under the request's
    attachment = spans["attachment"]
    for name in ("prefix_cache.local", "decode", "encoder.batch"):
        assert spans[name].parent_id == attachment.span_id, name
    for name in ("intake", "admission", "attachment", "prompt_assembly", "engine"):
        assert spans[name].parent_id == request.span_id, name
    assert spans["prefix_cache.local"].attributes["onellm.cache.hit"] is False
    assert spans["prefix_cache.redis"].attributes["onellm.cache.hit"] is False
    assert spans["prefix_cache.redis"].parent_id == attachment.span_id
    assert spans["encoder.batch"].attributes["onellm.encoder.batch_size"] == 1
    assert spans["decode"].attributes["onellm.modality"] == "image"
    assert spans["intake"].attributes["onellm.body_bytes"] == sent["body_bytes"]
    usage = sent["usage"]
    assert usage["prompt_tokens"] == expected_prompt_tokens(model_dir, [("user", "what is this?")], 1)
    assert request.attributes["gen_ai.operation.name"] == "chat"
    assert request.attributes["gen_ai.request.model"] == served(traced_gateway)
    assert request.attributes["gen_ai.request.max_tokens"] == 5
    assert request.attributes["gen_ai.request.temperature"] == 0.5
    assert request.attributes["gen_ai.usage.input_tokens"] == usage["prompt_tokens"]
    assert request.attributes["gen_ai.usage.output_tokens"] == usage["completion_tokens"]
    assert request.attributes["http.response.status_code"] == 200


def spans_of_a_repeat(first: GatewayProcess, second: GatewayProcess, receiver: OtlpReceiver, seed: int,
                      looked_up: str) -> dict:
    """The spans of an image chat through `second`, by name, after the same image came through `first`."""
    image = media.image("png", seed=seed)
    image_chat(first, image, secrets.token_hex(16), f"trace-test-{seed}-first")
    trace_id = secrets.token_hex(16)
    image_chat(second, image, trace_id, f"trace-test-{seed}-again")
    until(lambda: {REQUEST_SPAN, looked_up, "engine"} <= {s.name for s in receiver.trace(trace_id)}, 60,
          "the repeat's spans")
    return {s.name: s for s in receiver.trace(trace_id)}


def test_the_same_image_again_is_a_local_cache_hit_without_decode_or_encoder(traced_gateway, receiver):
    spans = spans_of_a_repeat(traced_gateway, traced_gateway, receiver, 802, "prefix_cache.local")
    assert spans["prefix_cache.local"].attributes["onellm.cache.hit"] is True
    assert not {"prefix_cache.redis", "decode", "encoder.batch"} & set(spans)


def test_an_image_another_gateway_encoded_is_a_redis_hit_after_a_local_miss(traced_gateway, second_traced_gateway,
                                                                             receiver):
    spans = spans_of_a_repeat(traced_gateway, second_traced_gateway, receiver, 803, "prefix_cache.redis")
    assert spans["prefix_cache.local"].attributes["onellm.cache.hit"] is False
    assert spans["prefix_cache.redis"].attributes["onellm.cache.hit"] is True
    assert not {"decode", "encoder.batch"} & set(spans)
