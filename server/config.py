"""Gateway settings: every `onellm serve` option can also come from an `ONELLM_*` environment
variable. The settings are grouped in sections, which `onellm serve --help` shows as groups."""

import os
from dataclasses import dataclass, field, fields

from server.budget import shares

MiB = 1 << 20
# the sections, in the order `onellm serve --help` lists them
SECTIONS = {
    "model": "the model and its encoder",
    "engines": "the LLM engine",
    "server": "the server",
    "memory": "memory",
    "limits": "limits on a request (each refusal is a 4xx naming the limit and the field)",
    "decoding": "what decoding one attachment may cost, decided from its headers before it is decoded (413)",
    "overload": "overload",
    "traffic": "the way in: what slow or idle clients and remote attachments may hold",
    "storage": "caches and stored files, media uuids and responses",
    "batches": "the Batch API: lines run beside online requests, at a lower priority",
    "access": "access",
}


def _list(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


def _setting(default, section: str, help_text: str | None = None, parse=None, choices: tuple[str, ...] = (),
             secret: bool = False):
    """A setting of `section`, read from its ONELLM_* variable with `parse` (by default the type of
    its default). With `help_text` it is also a flag of `onellm serve` (see serve_command.py)."""
    return field(default=default, repr=not secret, metadata={"section": section, "help": help_text,
                                                             "choices": choices, "parse": parse or type(default)})


def _share(parse: type, section: str, help_text: str):
    """A limit that follows from memory_budget_mb unless it is given (server/budget.py)."""
    return _setting(None, section, help_text + " (default: its share of memory_budget_mb)", parse)


@dataclass(frozen=True)
class DecoderLimits:
    """What decoding one attachment may take; each is the setting of the same name. The decoders
    in server/media/decoders refuse an attachment past one with a 413."""

    max_image_pixels: int
    max_video_seconds: float
    max_video_frame_pixels: int
    max_video_decoded_frames: int
    max_video_decoded_pixels: int
    max_audio_seconds: float
    max_audio_sample_rate: int
    max_points: int
    max_imu_samples: int
    max_fmri_repeats: int
    max_decode_mb: float


@dataclass(frozen=True)
class Settings:
    model: str = _setting("model_repo/tiny", "model", "model folder")
    device: str = _setting("cpu", "model", "torch device of the encoder and local engine")
    dtype: str = _setting("auto", "model", "dtype the encoder and the embedded LLM compute in; auto: bfloat16 "
                          "on a CPU with native bfloat16 (AVX512-BF16, AMX), else float32; on a GPU the "
                          "weights' own", choices=("auto", "float32", "float16", "bfloat16"))
    preprocess_workers: int = _setting(max(1, min(8, os.cpu_count() or 1)), "model")
    encoder_max_batch: int = _setting(8, "model", "requests of one modality encoded as one batch")
    # under load batches fill while the encoder is busy, so a longer wait only delays a request that comes alone
    encoder_max_wait_ms: float = _setting(1.0, "model", "longest wait for a batch to fill")
    default_max_tokens: int = _setting(256, "model")

    llm_weights: str = _setting("auto", "engines", "weights of the embedded LLM: `full` (the llm/ folder, in the "
                                "computed dtype) or a file `onellm quantize` wrote (llm-q4_k.gguf, llm-q4_0.gguf, "
                                "llm-q8_0.gguf), served by llama.cpp; auto: on a CPU the folder's quantized file "
                                "(q4_k first) when it has one and llama.cpp is installed, else full",
                                choices=("auto", "full", "q4_k", "q4_0", "q8_0"))
    # each sequence keeps a KV cache of the model's whole context: 512 KiB a position for OneLLM-7B
    llm_sequences: int = _setting(4, "engines", "requests the llama.cpp engine decodes at once (others wait; "
                                  "at least 2: batch lines always leave one to online requests)")
    vllm_url: str | None = _setting(None, "engines", "vLLM OpenAI server(s) to decode on, comma-separated; "
                                    "without it the embedded in-process engine serves", str)
    routing: str = _setting("affinity", "engines", "how each request picks one of several vLLM servers "
                            "(affinity: a chat's turns stay on one server unless it queues or its KV cache is "
                            "nearly full and it is much busier than the others; server/engines/routing.py)")
    replica_load_interval_s: float = _setting(1.0, "engines", "seconds between reads of each vLLM server's "
                                              "/metrics (requests waiting, running, KV cache in use) for "
                                              "routing; 0: route on this gateway's own requests in flight")
    replica_kv_threshold: float = _setting(0.9, "engines", "share of a vLLM server's KV cache in use past "
                                           "which a chat leaves it for a less loaded one, as when requests "
                                           "wait in its queue")

    host: str = _setting("127.0.0.1", "server", "address to listen on")
    port: int = _setting(8080, "server", "port")
    log_level: str = _setting("info", "server", "only debug logs prompts and upload sizes",
                              choices=("debug", "info", "warning", "error"))
    otlp_endpoint: str | None = _setting(None, "server", "OpenTelemetry collector (OTLP/HTTP, e.g. "
                                         "http://collector:4318) to send each chat's trace to; the standard "
                                         "OTEL_* variables are honoured, and OTEL_EXPORTER_OTLP_ENDPOINT turns "
                                         "traces on too. Off by default", str)

    # what requests may hold, split among the stages that hold it (server/budget.py)
    memory_budget_mb: float = _setting(4096.0, "memory", "memory the gateway's requests may hold on top of "
                                       "the model: bodies and fetched files, decoding, caches; each such limit "
                                       "not given is its share of it")

    max_request_bytes: int = _setting(96 * MiB, "limits", "bytes of one request body, counted while it arrives")
    max_file_bytes: int = _setting(64 * MiB, "limits", "bytes of one uploaded file (after base64 decoding)")
    max_text_chars: int = _setting(32_768, "limits", "characters of all messages' text together")
    max_tokens_limit: int = _setting(2048, "limits", "largest max_tokens a request may ask for")
    max_turns: int = _setting(64, "limits", "messages in one chat")
    max_attachments: int = _setting(8, "limits", "attachments in one request")

    max_decode_mb: float | None = _share(float, "decoding", "memory one attachment's decoding may use, "
                                         "estimated from its headers before it starts (413)")
    max_image_pixels: int = _setting(50_000_000, "decoding", "pixels of an image or depth/normal map, read "
                                     "from its header")
    max_video_seconds: float = _setting(3600.0, "decoding", "duration of a video")
    max_video_frame_pixels: int = _setting(40_000_000, "decoding", "pixels of one video frame")
    max_video_decoded_frames: int = _setting(30_000, "decoding", "frames decoded from one video")
    max_video_decoded_pixels: int = _setting(20_000_000_000, "decoding", "pixels decoded from one video, all "
                                             "frames together (frames × width × height)")
    max_audio_seconds: float = _setting(600.0, "decoding", "duration of an audio file")
    max_audio_sample_rate: int = _setting(384_000, "decoding", "sample rate of an audio file in Hz (only the "
                                          "first ~10.3 s of its first channel is decoded)")
    max_points: int = _setting(5_000_000, "decoding", "points of a point cloud")
    max_imu_samples: int = _setting(1_000_000, "decoding", "time steps of an IMU series")
    max_fmri_repeats: int = _setting(256, "decoding", "repeats (rows) of an fMRI upload")

    max_concurrent: int = _setting(16, "overload", "chat requests served at once")
    max_queued: int = _setting(64, "overload", "chat requests waiting for a slot; more get 429")
    request_timeout_s: float = _setting(600.0, "overload", "longest a chat request may take, upload to last "
                                        "token (504)")
    stall_timeout_s: float = _setting(60.0, "overload", "longest wait for the engine's next token (503)")
    drain_timeout_s: float = _setting(30.0, "overload", "on SIGTERM, how long in-flight requests may finish")
    key_max_concurrent: int = _setting(32, "overload", "chat requests and file downloads of one API key (or "
                                       "client address) at once, uploading, queued, running or sending; more "
                                       "get 429 (0: no limit)")
    key_requests_per_minute: int = _setting(0, "overload", "chat requests one API key (or client address) may "
                                            "start a minute, in bursts of up to that many; more get 429 "
                                            "(0: no limit)")
    quota_lease_ttl_s: float = _setting(30.0, "overload", "with a shared Redis (cache_url), how long a request's "
                                        "place under key_max_concurrent outlives its gateway: the gateway "
                                        "renews it every third of this while the request runs, and a dead "
                                        "gateway's places come back after this")

    # The defaults let a 50 MB video arrive over a 2 Mbit/s link (250 kB/s, 200 s): well above
    # the minimum rate, within request_timeout_s
    header_timeout_s: float = _setting(10.0, "traffic", "longest wait for a request's headers, from the "
                                       "connection or its first byte (408, or a silent close if none came)")
    body_idle_timeout_s: float = _setting(30.0, "traffic", "longest gap between two reads of a request body "
                                          "(408), or a response's reader taking nothing (its connection is "
                                          "closed)")
    min_upload_bytes_per_s: int = _setting(10_000, "traffic", "slowest average rate a body may arrive at, give "
                                           "or take upload_grace_s (408; 0: no minimum)")
    upload_grace_s: float = _setting(10.0, "traffic", "how far (s) a body may fall behind "
                                     "min_upload_bytes_per_s: it has grace + bytes/min_upload_bytes_per_s "
                                     "seconds to arrive")
    max_uploads: int = _setting(256, "traffic", "request bodies being received at once; more get 429")
    max_uploads_per_client: int = _setting(32, "traffic", "request bodies one client address sends at once; "
                                           "more get 429")
    max_buffered_bytes: int | None = _share(int, "traffic", "bytes of request bodies and fetched files "
                                            "(stored, remote) the gateway holds at once, reserved from "
                                            "Content-Length or the file's size (503)")
    max_connections: int = _setting(1024, "traffic", "open connections; past it the longest-idle one is "
                                    "closed, or the new one gets 503 if none is idle")
    keep_alive_timeout_s: float = _setting(5.0, "traffic", "how long an idle kept-alive connection stays open")
    # stored files and remote URLs count against max_buffered_bytes
    url_fetch_timeout_s: float = _setting(10.0, "traffic", "longest a remote attachment URL may take to "
                                          "download, connection to last byte (422)")
    allowed_url_hosts: tuple[str, ...] = _setting((), "traffic", "comma-separated hosts whose http(s) "
                                                  "attachment URLs may be fetched: 'host' on its scheme's "
                                                  "default port (80, 443) only, 'host:port' on that port", _list)

    prefix_cache_mb: float | None = _share(float, "storage", "memory for the prefixes of recent attachments, "
                                           "so that a chat resending its files runs the encoder once")
    # a prefix, or prompt rows, cached for one tenant answer another's request faster: the timing
    # alone would tell that tenant that someone sent the same file or the same words
    cache_scope: str = _setting("tenant", "storage", "whose requests reuse an attachment's cached prefix and "
                                "the LLM's cached prompt rows: tenant (those of the API key, or project, that "
                                "made them) or all (every key's: keys of one organisation)",
                                choices=("tenant", "all"))
    cache_url: str | None = _setting(None, "storage", "Redis (redis://host:port/db) where gateways share "
                                     "attachment prefixes; without it each gateway caches only its own", str)
    cache_timeout_ms: float = _setting(100.0, "storage", "connect and reply timeout of that Redis; slower is "
                                       "treated as down until it answers again")
    cache_ttl_s: int = _setting(86_400, "storage", "lifetime of a prefix in that Redis (its eviction policy "
                                "may drop it sooner)")
    files_dir: str = _setting(os.path.join(os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share"),
                                           "onellm-serve", "files"),
                              "storage", "directory of the files uploaded with POST /v1/files")
    files_url: str | None = _setting(None, "storage", "Redis (redis://host:port/db) to keep uploaded files in "
                                     "instead, shared by every gateway", str)
    file_ttl_s: int = _setting(7 * 86_400, "storage", "lifetime of an uploaded file when the upload sets no "
                               "expires_after")
    max_file_ttl_s: int = _setting(30 * 86_400, "storage", "longest expires_after an upload may ask for")
    max_files_per_key: int = _setting(1000, "storage", "files one API key may keep stored at once")
    references_mb: float | None = _share(float, "storage", "memory for the media uuids a gateway remembers "
                                         "itself, ~200 bytes each (the shared cache holds them for cache_ttl_s)")
    stored_responses_mb: float | None = _share(float, "storage", "memory for the responses a gateway keeps "
                                               "for previous_response_id itself (the shared cache holds them "
                                               "for response_ttl_s)")
    response_ttl_s: int = _setting(86_400, "storage", "how long a stored response can be continued or read back")

    batch_max_in_flight: int = _setting(2, "batches", "batch lines served at once on this gateway, all batches "
                                        "together; they take a slot only when no online request waits for one")
    batch_beside_online: int = _setting(0, "batches", "batch lines that may start while online requests are "
                                        "being served; 0: batches use only what online traffic leaves idle")
    batch_completion_window_s: int = _setting(86_400, "batches", "how long the completion window '24h' lasts: a "
                                              "batch not finished by then is expired, its unanswered lines failed")
    batch_lease_ttl_s: float = _setting(30.0, "batches", "with batches in Redis (files_url), how long a batch's "
                                        "gateway may go silent before another takes the batch over")

    # keys are never given on the command line, where `ps` would show them
    api_keys: tuple[str, ...] = _setting((), "access", parse=_list, secret=True)
    api_keys_file: str | None = _setting(None, "access", "file of API keys, one a line; with it or env "
                                         "ONELLM_API_KEYS (comma-separated) every path but /health needs "
                                         "'Authorization: Bearer <key>'", str)
    cors_origins: tuple[str, ...] = _setting((), "access", "comma-separated origins browsers may call from",
                                             _list)
    trusted_proxies: tuple[str, ...] = _setting((), "access", "comma-separated addresses or CIDRs of proxies "
                                                "whose X-Forwarded-For names the client, for the per-address "
                                                "limits and the logs (nobody else's is believed)", _list)

    @classmethod
    def from_env(cls, environ=os.environ, **overrides) -> "Settings":
        values = {}
        for f in fields(cls):
            raw = environ.get(f"ONELLM_{f.name.upper()}")
            if raw is not None:
                try:
                    values[f.name] = f.metadata["parse"](raw)
                except ValueError as error:
                    raise ValueError(f"ONELLM_{f.name.upper()}={raw!r}: {error}") from None
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def __post_init__(self):
        for f in fields(self):
            # a value out of its choices would otherwise be taken for the closest behaviour, silently
            if f.metadata["choices"] and getattr(self, f.name) not in f.metadata["choices"]:
                raise ValueError(f"{f.name} (ONELLM_{f.name.upper()}) {getattr(self, f.name)!r}: "
                                 f"not one of {', '.join(f.metadata['choices'])}")
        for name, value in shares(self.memory_budget_mb, self.preprocess_workers).items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)

    def vllm_urls(self) -> list[str]:
        return list(_list(self.vllm_url or ""))

    def decoder_limits(self) -> DecoderLimits:
        return DecoderLimits(**{f.name: getattr(self, f.name) for f in fields(DecoderLimits)})
