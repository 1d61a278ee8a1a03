"""The encoder's batches under concurrent load, read from a live gateway's
`onellm_encoder_batch_size` histogram: a gateway of its own that batches up to 4 attachments and
lets the first wait up to 2 s for the others (so that 12 requests sent at once batch together
even on a busy machine, and a batch bigger than 4 would show)."""

import base64
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

import media
from gateway_process import GatewayProcess, flags, serving
from scraped_metrics import total

BATCHING = {"encoder_max_batch": 4, "encoder_max_wait_ms": 2000}
REQUESTS = 12


@pytest.fixture(scope="module")
def batching(model_dir, tmp_path_factory):
    yield from serving(GatewayProcess(model_dir, tmp_path_factory.mktemp("batching"), flags(BATCHING)))


def image_chat(url: str, seed: int) -> httpx.Response:
    data = base64.b64encode(media.image("png", seed=seed)).decode()
    return httpx.post(f"{url}/v1/chat/completions", timeout=120, json={"max_tokens": 1, "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}},
                                     {"type": "text", "text": "What is it?"}]}]})


def batches(url: str) -> dict[str, float]:
    """The image batches' histogram: how many, how many attachments in all, how many of at most 4."""
    name, labels = "onellm_encoder_batch_size", {"modality": "image"}
    return {"count": total(url, f"{name}_count", **labels), "sum": total(url, f"{name}_sum", **labels),
            "le4": total(url, f"{name}_bucket", le="4.0", **labels)}


def test_concurrent_attachments_are_encoded_in_batches_of_at_most_encoder_max_batch(batching):
    before = batches(batching.url)
    with ThreadPoolExecutor(REQUESTS) as pool:  # distinct images: none is a prefix cache hit
        answers = list(pool.map(lambda seed: image_chat(batching.url, seed), range(200, 200 + REQUESTS)))
    assert [a.status_code for a in answers] == [200] * REQUESTS, [a.text for a in answers if a.status_code != 200]
    after = {key: after - before[key] for key, after in batches(batching.url).items()}
    assert after["sum"] == REQUESTS  # each attachment encoded once
    assert after["le4"] == after["count"], after  # no batch over encoder_max_batch
    assert after["count"] < REQUESTS, after  # batched, not one by one
    assert after["count"] >= REQUESTS / BATCHING["encoder_max_batch"]
