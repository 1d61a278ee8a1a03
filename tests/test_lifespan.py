"""What the gateway does to its own process between start-up and shutdown."""

import gc
import logging
import re

from fastapi.testclient import TestClient

from server.entrypoints.app import create_app
from server.config import Settings


def test_what_is_loaded_at_start_up_is_kept_out_of_garbage_collection_until_shutdown(tiny_model):
    assert gc.get_freeze_count() == 0
    with TestClient(create_app(Settings(model=str(tiny_model)))) as client:
        assert client.get("/health").status_code == 200
        # torch, transformers and the model: a full collection would walk every one of them
        assert gc.get_freeze_count() > 100_000
    assert gc.get_freeze_count() == 0


def test_start_up_answers_one_image_question_outside_every_cache_and_metric(tiny_model, caplog):
    """The first request's one-time costs are paid before the gateway is ready, and leave no trace a
    client or an operator could see: no prefix cached, no encoder batch, nothing in /metrics."""
    caplog.set_level(logging.INFO, logger="onellm.gateway")
    with TestClient(create_app(Settings(model=str(tiny_model)))) as client:
        [warmed] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("warmed up in ")]
        assert warmed.endswith(": an image question answered in 2 tokens, as a first request's would be")
        service = client.app.state.service
        assert service.prefixes.cache.entries == {} and service.workers.batcher.batch_sizes == []
        metrics = client.get("/metrics").text
        for family in ("onellm_preprocess_seconds_count", "onellm_encoder_runs_total", "onellm_encoder_batch_seconds_count",
                       "onellm_output_tokens_total", "onellm_time_to_first_token_seconds_count"):
            assert not re.search(rf"^{family}(\{{.*\}})? [1-9]", metrics, re.M), family
