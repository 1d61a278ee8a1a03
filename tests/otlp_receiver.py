"""An OpenTelemetry trace receiver on loopback: OTLP/HTTP `POST /v1/traces` with a protobuf
`ExportTraceServiceRequest` (what the OTLP/HTTP exporters of the gateway and of vLLM send), decoded
with opentelemetry-proto into plain span records the tests can look through."""

import gzip
import http.server
import threading
from dataclasses import dataclass

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (ExportTraceServiceRequest,
                                                                       ExportTraceServiceResponse)
from opentelemetry.proto.trace.v1.trace_pb2 import Span as SpanProto


@dataclass
class ReceivedSpan:
    service: str  # the resource's service.name
    name: str
    trace_id: str  # hex, as in a traceparent header
    span_id: str
    parent_id: str  # "" for a root
    kind: str  # "SPAN_KIND_SERVER", ...
    attributes: dict


def _value(any_value):
    which = any_value.WhichOneof("value")
    if which == "array_value":
        return [_value(v) for v in any_value.array_value.values]
    return getattr(any_value, which) if which else None


def _attributes(pairs) -> dict:
    return {pair.key: _value(pair.value) for pair in pairs}


def decode(body: bytes) -> list[ReceivedSpan]:
    request = ExportTraceServiceRequest.FromString(body)
    spans = []
    for resource_spans in request.resource_spans:
        service = _attributes(resource_spans.resource.attributes).get("service.name", "")
        for scope_spans in resource_spans.scope_spans:
            spans += [ReceivedSpan(service, s.name, s.trace_id.hex(), s.span_id.hex(), s.parent_span_id.hex(),
                                   SpanProto.SpanKind.Name(s.kind), _attributes(s.attributes))
                      for s in scope_spans.spans]
    return spans


class OtlpReceiver:
    """`url` is what an exporter's OTLP endpoint is set to (the base; it posts to /v1/traces)."""

    def __init__(self):
        self.spans: list[ReceivedSpan] = []
        self.headers: list[dict[str, str]] = []  # of each export request, names in lower case
        self.lock = threading.Lock()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                if self.path != "/v1/traces":
                    self.send_error(404)
                    return
                spans = decode(body)
                with receiver.lock:
                    receiver.spans += spans
                    receiver.headers.append({k.lower(): v for k, v in self.headers.items()})
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "OtlpReceiver":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def trace(self, trace_id: str) -> list[ReceivedSpan]:
        with self.lock:
            return [s for s in self.spans if s.trace_id == trace_id]

    def named(self, trace_id: str, name: str) -> list[ReceivedSpan]:
        return [s for s in self.trace(trace_id) if s.name == name]
