"""What outlives what, on a gateway of its own: files that expire, files that survive a restart,
and a reference whose prefix the cache no longer holds. Its prefix cache holds one tiny-model prefix
(30 x 128 float32 = 15 KiB: it computes in float32, asked for, since bfloat16's would fit twice) and
files it is not told otherwise about live two seconds."""

import base64
import hashlib
import time

import httpx
import pytest

import media
from gateway_process import GatewayProcess, flags

GREEDY = {"max_tokens": 4, "temperature": 0}
SHORT_TTL_S = 2


@pytest.fixture(scope="module")
def gateway(tiny_model, tmp_path_factory):
    server = GatewayProcess(tiny_model, tmp_path_factory.mktemp("lifetime"),
                            flags({"file_ttl_s": SHORT_TTL_S, "dtype": "float32"}), env={"ONELLM_PREFIX_CACHE_MB": "0.02"})
    server.start()
    yield server
    assert server.stop() == 0
    assert "Traceback" not in server.log(), server.log()[-5000:]


def upload(gateway, data: bytes, **form) -> dict:
    response = httpx.post(f"{gateway.url}/v1/files", files={"file": ("f.png", data)},
                          data={"purpose": "vision", **form})
    assert response.status_code == 200, response.text
    return response.json()


def image_chat(gateway, part: dict) -> httpx.Response:
    return httpx.post(f"{gateway.url}/v1/chat/completions", timeout=60, json={"messages": [
        {"role": "user", "content": [part, {"type": "text", "text": "What is it?"}]}], **GREEDY})


def inline(data: bytes) -> dict:
    return {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(data).decode()}}


def test_a_file_expires_with_the_server_default(gateway):
    created = upload(gateway, media.image("png", seed=81))
    assert created["expires_at"] - created["created_at"] == SHORT_TTL_S
    assert httpx.get(f"{gateway.url}/v1/files/{created['id']}").status_code == 200
    time.sleep(SHORT_TTL_S + 1.1)  # expires_at is whole seconds
    assert httpx.get(f"{gateway.url}/v1/files/{created['id']}").status_code == 404
    assert created["id"] not in [f["id"] for f in httpx.get(f"{gateway.url}/v1/files").json()["data"]]
    refused = image_chat(gateway, {"type": "image_url", "image_url": {"file_id": created["id"]}})
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "file_not_found"
    # its bytes were kept under their sha256, and nothing else names them
    assert not (gateway.files_dir / "blobs" / hashlib.sha256(media.image("png", seed=81)).hexdigest()).exists()


def test_a_reference_whose_prefix_was_evicted_asks_for_the_data(gateway):
    first, second = media.image("png", seed=82), media.image("png", seed=83)
    uuid = image_chat(gateway, inline(first)).headers["X-Media-UUIDs"]
    assert image_chat(gateway, {"type": "image_url", "uuid": uuid}).status_code == 200
    assert image_chat(gateway, inline(second)).status_code == 200  # takes the cache's one place
    gone = image_chat(gateway, {"type": "image_url", "uuid": uuid})
    assert gone.status_code == 400 and gone.json()["error"]["code"] == "media_not_found"
    assert image_chat(gateway, inline(first)).status_code == 200  # sending the data again mends it
    assert image_chat(gateway, {"type": "image_url", "uuid": uuid}).status_code == 200


def test_files_survive_a_restart(gateway):
    data = media.image("png", seed=84)
    kept = upload(gateway, data, **{"expires_after[anchor]": "created_at", "expires_after[seconds]": "3600"})
    before = image_chat(gateway, {"type": "image_url", "image_url": {"file_id": kept["id"]}})
    assert gateway.stop() == 0
    gateway.start()
    assert httpx.get(f"{gateway.url}/v1/files/{kept['id']}").json() == kept
    assert httpx.get(f"{gateway.url}/v1/files/{kept['id']}/content").content == data
    after = image_chat(gateway, {"type": "image_url", "image_url": {"file_id": kept["id"]}})
    assert after.json()["choices"] == before.json()["choices"]
