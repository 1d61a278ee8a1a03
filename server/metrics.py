"""Prometheus metrics of one gateway (its own registry, so several apps can live in one process)."""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
STAGE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
LAG_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        # modality: the registry's name of the one modality a chat's attachments have, "mixed" for
        # several, "text" for none, "unread" for a request refused before its chat was read
        self.requests = Counter("onellm_requests", "Chat requests by modality and HTTP status",
                                ["modality", "status"], registry=self.registry)
        self.ttft = Histogram("onellm_time_to_first_token_seconds", "Time from request to the first text delta",
                              buckets=LATENCY_BUCKETS, registry=self.registry)
        self.tokens_out = Counter("onellm_output_tokens", "Generated tokens", registry=self.registry)
        self.in_flight = Gauge("onellm_queue_depth", "Chat requests admitted and not finished", registry=self.registry)
        self.encoder_runs = Counter("onellm_encoder_runs", "Attachments run through the encoder",
                                    ["modality"], registry=self.registry)
        self.prefix_cache_hits = Counter("onellm_prefix_cache_hits", "Attachments served from the prefix cache",
                                         ["modality"], registry=self.registry)
        self.media_references = Counter("onellm_media_references", "Attachments sent by uuid, by outcome: served, "
                                        "or not_found (the client has to send the data again)", ["outcome"],
                                        registry=self.registry)
        self.prefix_shared_runs = Counter("onellm_prefix_shared_runs", "Attachments that waited for the run "
                                          "already making the same bytes' prefix", ["modality"], registry=self.registry)
        self.decodes_running = Gauge("onellm_decodes_running", "Attachments being decoded now, in the decoding pool",
                                     registry=self.registry)
        self.decodes_cancelled = Counter("onellm_decodes_cancelled", "Decodes stopped part-way because no request "
                                         "waited for them any more (another attachment refused, the client gone)",
                                         ["modality"], registry=self.registry)
        # where the time before the first token goes: with TTFT they split it into decoding, the
        # encoder, and the rest (queues, prompt assembly, the engine)
        self.preprocess_seconds = Histogram("onellm_preprocess_seconds", "Decoding one attachment into model input",
                                            ["modality"], buckets=STAGE_BUCKETS, registry=self.registry)
        self.event_loop_lag = Histogram("onellm_event_loop_lag_seconds", "How late the event loop woke a "
                                        "ticker that sleeps 5 ms: the delay work on the loop adds to every "
                                        "stream", buckets=LAG_BUCKETS, registry=self.registry)
        self.encoder_seconds = Histogram("onellm_encoder_batch_seconds", "One encoder batch on an encoder thread, "
                                         "not counting a batch lines' run's pauses for online requests",
                                         ["modality"], buckets=STAGE_BUCKETS, registry=self.registry)
        self.encoder_batch_size = Histogram("onellm_encoder_batch_size", "Attachments per encoder batch",
                                            ["modality"], buckets=BATCH_BUCKETS, registry=self.registry)
        self.rejected = Counter("onellm_rejected_requests", "Chat requests refused as overload (429) or cut "
                                "by the request timeout (504)", ["reason"], registry=self.registry)
        self.admission_waiting = Gauge("onellm_admission_waiting", "Chat requests waiting for a slot",
                                       registry=self.registry)
        # the Batch API (server/core/batches.py): its lines wait for slots below online requests
        self.batch_lines_waiting = Gauge("onellm_batch_lines_waiting", "Batch lines waiting for a slot, behind "
                                         "every online request waiting", registry=self.registry)
        self.batch_lines_in_flight = Gauge("onellm_batch_lines_in_flight", "Batch lines sent and not answered yet, "
                                           "waiting for a slot or being served", registry=self.registry)
        self.batch_lines = Counter("onellm_batch_lines", "Batch lines answered, by outcome: completed (status 200) "
                                   "or failed (any other answer)", ["outcome"], registry=self.registry)
        self.batches = Gauge("onellm_batches", "Batches in this gateway's store, by state (with "
                             "a shared Redis store, every gateway's)", ["state"],
                             registry=self.registry)
        # the vLLM backends, labelled by URL (server/engines/replicas.py)
        self.backend_requests = Counter("onellm_vllm_backend_requests", "Requests sent to a vLLM backend, "
                                        "retries included", ["backend"], registry=self.registry)
        self.backend_failures = Counter("onellm_vllm_backend_failures", "Requests a vLLM backend failed "
                                        "(unreachable, errors, cut streams)", ["backend"], registry=self.registry)
        self.backend_in_flight = Gauge("onellm_vllm_backend_in_flight", "Requests streaming from a vLLM backend",
                                       ["backend"], registry=self.registry)
        self.backend_healthy = Gauge("onellm_vllm_backend_healthy", "1 while a vLLM backend takes requests",
                                     ["backend"], registry=self.registry)
        self.backend_reported_load = Gauge("onellm_vllm_backend_reported_load", "A vLLM backend's load as its "
                                           "/metrics last said: requests waiting and running, share of KV cache "
                                           "in use (kv_cache_usage); NaN while unknown", ["backend", "measure"],
                                           registry=self.registry)
        self.backend_load_scrape_failures = Counter("onellm_vllm_backend_load_scrape_failures", "Reads of a vLLM "
                                                    "backend's /metrics that failed", ["backend"],
                                                    registry=self.registry)
        self.vllm_retries = Counter("onellm_vllm_retries", "Requests sent again to another vLLM backend after "
                                    "one failed before any text", registry=self.registry)
        # the way in (server/traffic/intake.py, connections.py, quotas.py)
        self.uploads_in_progress = Gauge("onellm_uploads_in_progress", "Request bodies being received",
                                         registry=self.registry)
        self.request_timeouts = Counter("onellm_request_timeouts", "Requests ended with 408 on the way in, by "
                                        "cause: headers, body_idle, body_rate", ["cause"], registry=self.registry)
        # key: the API key's id (never the key), or "" for callers known only by their address
        self.refusals = Counter("onellm_refusals", "Requests refused by a limit (429/503), by limit and key",
                                ["limit", "key"], registry=self.registry)

    def add_shared_cache(self) -> None:
        """The shared prefix cache's metrics, only on gateways that have one: an `up` of 0 on one
        that was never given Redis would read as an outage."""
        self.shared_cache_up = Gauge("onellm_shared_cache_up", "1 while the shared prefix cache (Redis) answers",
                                     registry=self.registry)
        self.shared_cache_errors = Counter("onellm_shared_cache_errors", "Shared prefix cache operations that failed, "
                                           "or values read back that were not a prefix", ["operation"],
                                           registry=self.registry)
        self.shared_cache_hits = Counter("onellm_shared_cache_hits", "Attachments served from the shared prefix cache",
                                         ["modality"], registry=self.registry)

    def add_shared_quotas(self) -> None:
        """The cluster-wide quotas' metrics, only on gateways that count quotas in Redis."""
        self.shared_quotas_up = Gauge("onellm_shared_quotas_up", "1 while per-key quotas are counted across the "
                                      "gateways (in the shared Redis), 0 while each gateway counts its own",
                                      registry=self.registry)
        self.shared_quota_fallbacks = Counter("onellm_shared_quota_fallbacks", "Requests whose per-key quotas this "
                                              "gateway decided alone because the shared Redis did not answer",
                                              registry=self.registry)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
