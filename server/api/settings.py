"""Gateway settings: every `onellm serve` option can also come from an `ONELLM_*` environment variable."""

import os
from dataclasses import dataclass, fields


def _env_list(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


@dataclass(frozen=True)
class Settings:
    model: str = "model_repo/tiny"
    vllm_url: str | None = None  # None: the embedded in-process engine
    host: str = "127.0.0.1"
    port: int = 8080
    device: str = "cpu"
    dtype: str | None = None  # None: the dtype the encoder weights are stored in
    default_max_tokens: int = 256
    preprocess_workers: int = max(1, min(8, os.cpu_count() or 1))
    prefix_cache_mb: float = 256.0
    encoder_max_batch: int = 8  # requests of one modality encoded together ...
    encoder_max_wait_ms: float = 5.0  # ... or fewer, once the first has waited this long
    allowed_url_hosts: tuple[str, ...] = ()  # remote attachment URLs are refused unless their host is listed
    log_level: str = "info"

    @classmethod
    def from_env(cls, environ=os.environ, **overrides) -> "Settings":
        values = {}
        for f in fields(cls):
            raw = environ.get(f"ONELLM_{f.name.upper()}")
            if raw is None:
                continue
            kind = type(f.default) if f.default is not None else str
            values[f.name] = _env_list(raw) if kind is tuple else kind(raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)
