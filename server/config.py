"""Gateway settings: every `onellm serve` option can also come from an `ONELLM_*` environment variable."""

import os
from dataclasses import dataclass, field, fields

from server.budget import shares


def _env_list(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


def _limit(default, help_text: str):
    """A setting that `onellm serve` offers as a flag of its own (see serve.add_arguments)."""
    return field(default=default, metadata={"help": help_text, "type": type(default)})


def _share(kind: type, help_text: str):
    """A limit that follows from memory_budget_mb unless it is given (server/budget.py)."""
    return field(default=None, metadata={"help": help_text + " (default: its share of memory_budget_mb)",
                                         "type": kind})


MiB = 1 << 20


@dataclass(frozen=True)
class Settings:
    model: str = "model_repo/tiny"
    vllm_url: str | None = None  # comma-separated vLLM base URLs; None: the embedded in-process engine
    routing: str = "affinity"  # how a request picks among several vLLMs (server/engines/routing.py)
    host: str = "127.0.0.1"
    port: int = 8080
    device: str = "cpu"
    dtype: str | None = None  # None: the dtype the encoder weights are stored in
    default_max_tokens: int = 256
    preprocess_workers: int = max(1, min(8, os.cpu_count() or 1))
    prefix_cache_mb: float | None = _share(float, "memory for the prefixes of recent attachments, so that a "
                                                  "chat resending its files runs the encoder once")
    cache_url: str | None = None  # redis://host:port/db: prefixes shared with other gateways; None: local only
    cache_timeout_ms: float = 100.0  # a Redis slower than this is treated as down until it answers again
    cache_ttl_s: int = 86_400  # how long a prefix stays in Redis (its eviction policy may drop it sooner)
    encoder_max_batch: int = 8  # requests of one modality encoded together ...
    # ... or fewer, once the first has waited this long; under load batches fill while the
    # encoder is busy, so a longer wait only delays a request that comes alone
    encoder_max_wait_ms: float = 1.0
    # uploaded files (POST /v1/files) live here, or in Redis when files_url is set (every gateway then sees them)
    files_dir: str = os.path.join(os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share"),
                                  "onellm-serve", "files")
    files_url: str | None = None
    allowed_url_hosts: tuple[str, ...] = ()  # remote attachment URLs are refused unless their host[:port] is listed
    log_level: str = "info"

    # Memory: what requests may hold, split among the stages that hold it (server/budget.py)
    memory_budget_mb: float = _limit(4096.0, "memory the gateway's requests may hold on top of the model: "
                                             "bodies and fetched files, decoding, caches; each such limit "
                                             "not given is its share of it")
    max_decode_mb: float | None = _share(float, "memory one attachment's decoding may use, estimated from its "
                                                "headers before it starts (413)")

    # Limits: each refusal is a 4xx naming the limit and the field.
    max_request_bytes: int = _limit(96 * MiB, "bytes of one request body, counted while it arrives")
    max_file_bytes: int = _limit(64 * MiB, "bytes of one uploaded file (after base64 decoding)")
    max_image_pixels: int = _limit(50_000_000, "pixels of an image or depth/normal map, read from its header")
    max_video_seconds: float = _limit(3600.0, "duration of a video")
    max_video_frame_pixels: int = _limit(40_000_000, "pixels of one video frame")
    max_video_decoded_frames: int = _limit(30_000, "frames decoded from one video")
    max_audio_seconds: float = _limit(600.0, "duration of an audio file")
    max_points: int = _limit(5_000_000, "points of a point cloud")
    max_imu_samples: int = _limit(1_000_000, "time steps of an IMU series")
    max_fmri_repeats: int = _limit(256, "repeats (rows) of an fMRI upload")
    # What decoding one attachment may cost, decided from its headers before it is decoded
    max_audio_sample_rate: int = _limit(384_000, "sample rate of an audio file in Hz (only the first "
                                                 "~10.3 s of its first channel is decoded)")
    max_video_decoded_pixels: int = _limit(20_000_000_000, "pixels decoded from one video, all frames "
                                                           "together (frames × width × height)")
    max_text_chars: int = _limit(32_768, "characters of all messages' text together")
    max_tokens_limit: int = _limit(2048, "largest max_tokens a request may ask for")
    max_turns: int = _limit(64, "messages in one chat")
    max_attachments: int = _limit(8, "attachments in one request")
    file_ttl_s: int = _limit(7 * 86_400, "lifetime of an uploaded file when the upload sets no expires_after")
    max_file_ttl_s: int = _limit(30 * 86_400, "longest expires_after an upload may ask for")
    max_files_per_key: int = _limit(1000, "files one API key may keep stored at once")
    references_mb: float | None = _share(float, "memory for the media uuids a gateway remembers itself, ~200 "
                                                "bytes each (the shared cache holds them for cache_ttl_s)")
    stored_responses_mb: float | None = _share(float, "memory for the responses a gateway keeps for "
                                                      "previous_response_id itself (the shared cache holds "
                                                      "them for response_ttl_s)")
    response_ttl_s: int = _limit(86_400, "how long a stored response can be continued or read back")

    # Overload
    max_concurrent: int = _limit(16, "chat requests served at once")
    max_queued: int = _limit(64, "chat requests waiting for a slot; more get 429")
    request_timeout_s: float = _limit(600.0, "longest a chat request may take, upload to last token (504)")
    stall_timeout_s: float = _limit(60.0, "longest wait for the engine's next token (503)")
    drain_timeout_s: float = _limit(30.0, "on SIGTERM, how long in-flight requests may finish")

    # The way in: what slow or idle clients may hold. The defaults let a 50 MB video arrive over a
    # 2 Mbit/s link (250 kB/s, 200 s): well above the minimum rate, within request_timeout_s
    header_timeout_s: float = _limit(10.0, "longest wait for a request's headers, from the connection "
                                           "or its first byte (408, or a silent close if none came)")
    body_idle_timeout_s: float = _limit(30.0, "longest gap between two reads of a request body (408), "
                                              "or a response's reader taking nothing (its connection is closed)")
    min_upload_bytes_per_s: int = _limit(10_000, "slowest average rate a body may arrive at, give or "
                                                 "take upload_grace_s (408; 0: no minimum)")
    upload_grace_s: float = _limit(10.0, "how far (s) a body may fall behind min_upload_bytes_per_s: "
                                         "it has grace + bytes/min_upload_bytes_per_s seconds to arrive")
    max_uploads: int = _limit(256, "request bodies being received at once; more get 429")
    max_uploads_per_client: int = _limit(32, "request bodies one client address sends at once; more get 429")
    max_buffered_bytes: int | None = _share(int, "bytes of request bodies and fetched files (stored, remote) "
                                                 "the gateway holds at once, reserved from Content-Length "
                                                 "or the file's size (503)")
    max_connections: int = _limit(1024, "open connections; past it the longest-idle one is closed, "
                                        "or the new one gets 503 if none is idle")
    keep_alive_timeout_s: float = _limit(5.0, "how long an idle kept-alive connection stays open")
    key_max_concurrent: int = _limit(32, "chat requests and file downloads of one API key (or client "
                                         "address) at once, uploading, queued, running or sending; more "
                                         "get 429 (0: no limit)")
    key_requests_per_minute: int = _limit(0, "chat requests one API key (or client address) may start "
                                             "a minute, in bursts of up to that many; more get 429 "
                                             "(0: no limit)")
    # What a request fetches: stored files and remote URLs count against max_buffered_bytes
    url_fetch_timeout_s: float = _limit(10.0, "longest a remote attachment URL may take to download, "
                                              "connection to last byte (422)")
    # peers whose X-Forwarded-For names the client (addresses or CIDRs); nobody else's is believed
    trusted_proxies: tuple[str, ...] = ()

    # Access. Keys are never given on the command line, where `ps` would show them.
    api_keys: tuple[str, ...] = field(default=(), repr=False)
    api_keys_file: str | None = None
    cors_origins: tuple[str, ...] = ()

    @classmethod
    def from_env(cls, environ=os.environ, **overrides) -> "Settings":
        values = {}
        for f in fields(cls):
            raw = environ.get(f"ONELLM_{f.name.upper()}")
            if raw is None:
                continue
            kind = f.metadata.get("type") or (type(f.default) if f.default is not None else str)
            values[f.name] = _env_list(raw) if kind is tuple else kind(raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def __post_init__(self):
        for name, value in shares(self.memory_budget_mb, self.preprocess_workers).items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)

    def vllm_urls(self) -> list[str]:
        return list(_env_list(self.vllm_url or ""))

    def decoder_limits(self) -> dict:
        """The keyword arguments the modalities pass on to the decoders in server/media/decoders."""
        return {"max_pixels": self.max_image_pixels, "max_video_seconds": self.max_video_seconds,
                "max_frame_pixels": self.max_video_frame_pixels,
                "max_decoded_frames": self.max_video_decoded_frames,
                "max_audio_seconds": self.max_audio_seconds, "max_points": self.max_points,
                "max_imu_samples": self.max_imu_samples, "max_fmri_repeats": self.max_fmri_repeats,
                "max_decode_mb": self.max_decode_mb, "max_audio_sample_rate": self.max_audio_sample_rate,
                "max_decoded_pixels": self.max_video_decoded_pixels}
