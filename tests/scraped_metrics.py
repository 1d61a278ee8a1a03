"""Reading a server's Prometheus `/metrics` over HTTP, for the tiers that drive live servers."""

import httpx
from prometheus_client.parser import text_string_to_metric_families


def total(base_url: str, name: str, **labels) -> float:
    """The sum of the samples called `name` at `base_url`/metrics whose labels include `labels`."""
    text = httpx.get(f"{base_url}/metrics", timeout=10).text
    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
               if s.name == name and labels.items() <= s.labels.items())
