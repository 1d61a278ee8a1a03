"""OpenTelemetry traces: one trace per request, exported over OTLP/HTTP (protobuf) when an endpoint
is configured: `--otlp-endpoint`, or the standard OTEL_EXPORTER_OTLP_ENDPOINT /
OTEL_EXPORTER_OTLP_TRACES_ENDPOINT variables (OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES,
OTEL_EXPORTER_OTLP_HEADERS, OTEL_TRACES_SAMPLER and the rest are read by the SDK itself).

Off (the default), nothing of the SDK is imported, no exporter thread runs, and every span handed
out here is the API's invalid span, whose methods do nothing: the cost of tracing off is a check
of one global. Every span carries the request id of the request it belongs to (REQUEST_ID_KEY),
copied from its parent as it starts, so worker code need not know which request it serves."""

import os
from collections.abc import Mapping
from contextlib import AbstractContextManager, nullcontext

from opentelemetry import propagate, trace

REQUEST_ID_KEY = "onellm.request_id"
DEFAULT_SERVICE_NAME = "onellm-gateway"
_ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")

_tracer: trace.Tracer | None = None  # None while tracing is off
_provider = None  # the SDK's TracerProvider while tracing is on


def configured(endpoint: str | None) -> bool:
    """Whether traces are to be exported: an endpoint given, by flag or by OTEL_* variable, and
    the SDK not switched off (OTEL_SDK_DISABLED)."""
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    return bool(endpoint or any(os.environ.get(name) for name in _ENDPOINT_VARIABLES))


def start(endpoint: str | None) -> bool:
    """Starts exporting if `configured(endpoint)`; `endpoint` is the collector's base URL (as
    OTEL_EXPORTER_OTLP_ENDPOINT: the signal path /v1/traces is appended). True if tracing is on."""
    global _tracer, _provider
    if not configured(endpoint):
        return False
    # imported only here: a gateway without traces loads none of the SDK
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    # OTEL_SERVICE_NAME (or service.name in OTEL_RESOURCE_ATTRIBUTES) wins over the default
    named = os.environ.get("OTEL_SERVICE_NAME") or "service.name=" in os.environ.get("OTEL_RESOURCE_ATTRIBUTES", "")
    resource = Resource.create({} if named else {SERVICE_NAME: DEFAULT_SERVICE_NAME})
    _provider = TracerProvider(resource=resource)  # the sampler from OTEL_TRACES_SAMPLER, else parent-based always-on
    _provider.add_span_processor(_request_id_processor())
    exporter = OTLPSpanExporter(endpoint=f"{endpoint.rstrip('/')}/v1/traces" if endpoint else None)
    _provider.add_span_processor(BatchSpanProcessor(exporter))
    _tracer = _provider.get_tracer("onellm.gateway")
    return True


def stop() -> None:
    """Exports what is still queued and stops the exporter thread."""
    global _tracer, _provider
    if _provider is not None:
        _provider.shutdown()
    _tracer = _provider = None


def enabled() -> bool:
    return _tracer is not None


def span(name: str, attributes: Mapping | None = None) -> AbstractContextManager[trace.Span]:
    """A child of the current span, current itself inside the `with` (an exception raised through
    it marks it failed)."""
    if _tracer is None:
        return nullcontext(trace.INVALID_SPAN)
    return _tracer.start_as_current_span(name, attributes=attributes)


def request_span(name: str, headers: Mapping[str, str], request_id: str,
                 attributes: Mapping | None = None) -> AbstractContextManager[trace.Span]:
    """The span of one request served, a child of the caller's span when its headers carry one
    (W3C `traceparent`)."""
    if _tracer is None:
        return nullcontext(trace.INVALID_SPAN)
    return _tracer.start_as_current_span(name, context=propagate.extract(headers), kind=trace.SpanKind.SERVER,
                                         attributes={**(attributes or {}), REQUEST_ID_KEY: request_id})


def detached_span(name: str, attributes: Mapping | None = None) -> trace.Span:
    """A child of the current span that is not made current: for work that runs in pieces
    (an answer's stream), made current around each piece with `current`, and ended with `.end()`."""
    if _tracer is None:
        return trace.INVALID_SPAN
    return _tracer.start_span(name, attributes=attributes)


def current(span_: trace.Span) -> AbstractContextManager:
    """`span_` as the current span inside the `with`; entered and left in one task, so the
    context is restored where it was changed."""
    if _tracer is None:
        return nullcontext()
    return trace.use_span(span_, end_on_exit=False, record_exception=False, set_status_on_exception=False)


def current_span() -> trace.Span:
    return trace.get_current_span()


def inject(headers: dict[str, str]) -> dict[str, str]:
    """`headers` with the current span's `traceparent` added, for a request this one sends on."""
    if _tracer is not None:
        propagate.inject(headers)
    return headers


def _request_id_processor():
    from opentelemetry.sdk.trace import SpanProcessor

    class RequestIdFromParent(SpanProcessor):
        """Copies the request id onto every span from its parent, as it starts."""

        def on_start(self, span_, parent_context=None) -> None:
            parent = trace.get_current_span(parent_context)
            request_id = (getattr(parent, "attributes", None) or {}).get(REQUEST_ID_KEY)
            if request_id is not None and span_.attributes.get(REQUEST_ID_KEY) is None:
                span_.set_attribute(REQUEST_ID_KEY, request_id)

    return RequestIdFromParent()


def failed(span_: trace.Span, error: BaseException) -> None:
    span_.record_exception(error)
    span_.set_status(trace.Status(trace.StatusCode.ERROR, type(error).__name__))


def told_request(model: str, sampling: Mapping) -> None:
    """The GenAI request attributes of a chat on the current span, its request's."""
    span_ = trace.get_current_span()
    if not span_.is_recording():
        return
    span_.set_attributes({"gen_ai.operation.name": "chat", "gen_ai.request.model": model})
    for name in ("max_tokens", "temperature", "top_p", "seed"):
        if sampling.get(name) is not None:
            span_.set_attribute(f"gen_ai.request.{name}", sampling[name])


def told_usage(request: trace.Span, output_tokens: int, finish_reason: str | None) -> None:
    """The answer's GenAI usage attributes on its request's span."""
    request.set_attribute("gen_ai.usage.output_tokens", output_tokens)
    if finish_reason:
        request.set_attribute("gen_ai.response.finish_reasons", [finish_reason])
