"""One trace across the tiers: a gateway with `--otlp-endpoint` in front of the session's vLLM,
which was started with `--otlp-traces-endpoint`; both export to the same OTLP/HTTP receiver in the
test, and vLLM's span of the request joins the gateway's trace under its engine span (the
`traceparent` the gateway sends with the completion)."""

import base64
import secrets

import httpx
import pytest

import media
from gateway_process import GatewayProcess
from waiting import until


@pytest.fixture(scope="module")
def traced_gateway(vllm_model_dir, vllm_server, trace_receiver, tmp_path_factory):
    server = GatewayProcess(vllm_model_dir, tmp_path_factory.mktemp("gateway-traced"),
                            ["--vllm-url", vllm_server, "--otlp-endpoint", trace_receiver.url],
                            env={"OTEL_BSP_SCHEDULE_DELAY": "50"})
    server.start()
    yield server
    server.stop()
    assert "Traceback" not in server.log(), server.log()[-6000:]


def test_an_image_chat_through_vllm_is_one_trace_with_the_gateways_and_vllms_spans(traced_gateway,
                                                                                     trace_receiver):
    trace_id, request_id = secrets.token_hex(16), "live-trace-1"
    url = "data:image/png;base64," + base64.b64encode(media.image("png", seed=901)).decode()
    model = httpx.get(f"{traced_gateway.url}/v1/models").json()["data"][0]["id"]
    body = {"model": model, "max_tokens": 4, "temperature": 0,
            "messages": [{"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                                      {"type": "image_url", "image_url": {"url": url}}]}]}
    headers = {"traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01", "X-Request-ID": request_id}
    response = httpx.post(f"{traced_gateway.url}/v1/chat/completions", json=body, headers=headers, timeout=300)
    assert response.status_code == 200, response.text
    usage = response.json()["usage"]

    wanted = {"POST /v1/chat/completions", "admission", "attachment", "decode", "encoder.batch", "prompt_assembly",
              "engine", "llm_request"}
    until(lambda: wanted <= {s.name for s in trace_receiver.trace(trace_id)}, 120, "the gateway's and vLLM's spans")
    spans = {s.name: s for s in trace_receiver.trace(trace_id)}
    vllm = spans.pop("llm_request")
    assert vllm.service != spans["engine"].service  # exported by vLLM itself, not by the gateway
    assert vllm.parent_id == spans["engine"].span_id  # the traceparent the gateway sent with the completion
    assert vllm.attributes["gen_ai.usage.prompt_tokens"] == usage["prompt_tokens"]
    assert {s.attributes.get("onellm.request_id") for s in spans.values()} == {request_id}
    request = spans["POST /v1/chat/completions"]
    assert request.attributes["gen_ai.request.model"] == model
    assert request.attributes["gen_ai.usage.input_tokens"] == usage["prompt_tokens"]
    assert request.attributes["gen_ai.usage.output_tokens"] == usage["completion_tokens"]
    assert spans["engine"].attributes["onellm.engine"] == "vllm"
