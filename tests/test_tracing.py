"""Tracing off costs nothing (no exporter, no thread of its own) and is on only when an endpoint is
configured, by flag or by the standard OTEL_* variables: one chat through the app, in process."""

import threading

import pytest
from fastapi.testclient import TestClient

from otlp_receiver import OtlpReceiver
from server import tracing
from server.config import Settings
from server.entrypoints.app import create_app
from waiting import until

CHAT = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 2}


def exporter_threads() -> list[str]:
    # the SDK's BatchSpanProcessor exports from a thread of its own, named after it
    return [t.name for t in threading.enumerate() if t.name.startswith("OtelBatch")]


@pytest.fixture
def receiver():
    with OtlpReceiver() as r:
        yield r


@pytest.fixture
def no_otel_environment(monkeypatch):
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_SDK_DISABLED"):
        monkeypatch.delenv(name, raising=False)


def test_without_an_endpoint_no_exporter_runs_and_no_span_is_recorded(tiny_model, no_otel_environment):
    with TestClient(create_app(Settings(model=str(tiny_model)))) as client:
        assert client.post("/v1/chat/completions", json=CHAT).status_code == 200
        assert not tracing.enabled()
        assert exporter_threads() == []
        assert not tracing.current_span().is_recording()


@pytest.mark.parametrize("how", ["flag", "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"])
def test_an_endpoint_by_flag_or_variable_exports_the_chat_and_shutdown_stops_the_exporter(
        tiny_model, receiver, no_otel_environment, monkeypatch, how):
    settings = {"model": str(tiny_model)}
    if how == "flag":
        settings["otlp_endpoint"] = receiver.url
    else:  # the TRACES variable is the signal's full URL, the other the collector's base
        monkeypatch.setenv(how, receiver.url + ("/v1/traces" if "TRACES" in how else ""))
    with TestClient(create_app(Settings(**settings))) as client:
        assert len(exporter_threads()) == 1
        response = client.post("/v1/chat/completions", json=CHAT, headers={"X-Request-ID": f"in-process-{how}"})
        assert response.status_code == 200
    # shutdown exported what was queued, whatever the export interval, and stopped the thread
    spans = [s for s in receiver.spans if s.attributes.get("onellm.request_id") == f"in-process-{how}"]
    assert {"POST /v1/chat/completions", "admission", "prompt_assembly", "engine"} <= {s.name for s in spans}
    until(lambda: exporter_threads() == [], 10, "the exporter thread's end")


def test_otel_sdk_disabled_keeps_tracing_off_even_with_an_endpoint(tiny_model, receiver, no_otel_environment,
                                                                  monkeypatch):
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    with TestClient(create_app(Settings(model=str(tiny_model), otlp_endpoint=receiver.url))) as client:
        assert client.post("/v1/chat/completions", json=CHAT).status_code == 200
        assert exporter_threads() == []
    assert receiver.spans == []


def test_the_sdks_own_variables_apply_the_sampler_and_the_exporters_headers(tiny_model, receiver, no_otel_environment,
                                                                           monkeypatch):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "authorization=Bearer collector-token")
    settings = Settings(model=str(tiny_model), otlp_endpoint=receiver.url)
    with TestClient(create_app(settings)) as client:
        assert client.post("/v1/chat/completions", json=CHAT).status_code == 200
    assert receiver.spans and {h.get("authorization") for h in receiver.headers} == {"Bearer collector-token"}
    exported = len(receiver.spans)
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_off")
    with TestClient(create_app(settings)) as client:
        assert client.post("/v1/chat/completions", json=CHAT).status_code == 200
    assert len(receiver.spans) == exported  # sampled out: nothing more exported
