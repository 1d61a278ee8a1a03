"""Reading a server's Prometheus `/metrics` over HTTP, for the tiers that drive live servers."""

import httpx
from prometheus_client.parser import text_string_to_metric_families


def total(base_url: str, name: str, headers: dict[str, str] | None = None, **labels) -> float:
    """The sum of the samples called `name` at `base_url`/metrics whose labels include `labels`
    (`headers`: what /metrics needs, an API key where keys are configured)."""
    response = httpx.get(f"{base_url}/metrics", headers=headers, timeout=10)
    response.raise_for_status()
    text = response.text
    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
               if s.name == name and labels.items() <= s.labels.items())
