"""What the gateway does to its own process between start-up and shutdown."""

import gc

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
