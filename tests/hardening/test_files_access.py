"""Stored files and media uuids belong to the API key that sent them: another key sees a 404 for a
file (as for an id that never was, so ids cannot be probed) and an unknown uuid for an attachment."""

import base64

import httpx
import pytest

import media
from gateways import ENV_KEYS, FILE_KEY, LIMITS

GREEDY = {"max_tokens": 4, "temperature": 0}


@pytest.fixture(scope="module")
def owner(hardened):
    with httpx.Client(base_url=hardened.url, timeout=120, headers={"Authorization": f"Bearer {ENV_KEYS[0]}"}) as c:
        yield c


@pytest.fixture(scope="module")
def other(hardened):
    with httpx.Client(base_url=hardened.url, timeout=120, headers={"Authorization": f"Bearer {FILE_KEY}"}) as c:
        yield c


def upload(client, data: bytes) -> httpx.Response:
    return client.post("/v1/files", files={"file": ("a.png", data)}, data={"purpose": "vision"})


def image_chat(client, part: dict) -> httpx.Response:
    return client.post("/v1/chat/completions", json={"messages": [
        {"role": "user", "content": [part, {"type": "text", "text": "What is it?"}]}], **GREEDY})


def test_files_need_a_key(hardened):
    assert httpx.post(f"{hardened.url}/v1/files", files={"file": ("a", b"x")}).status_code == 401
    assert httpx.get(f"{hardened.url}/v1/files").status_code == 401


def test_another_keys_file_is_not_found(owner, other):
    created = upload(owner, media.image("png", seed=71)).json()
    never = "file-" + "0" * 24
    for file_id in (created["id"], never):
        for response in (other.get(f"/v1/files/{file_id}"), other.get(f"/v1/files/{file_id}/content"),
                         other.delete(f"/v1/files/{file_id}")):
            assert response.status_code == 404 and response.json()["error"]["code"] == "file_not_found"
    assert created["id"] not in [f["id"] for f in other.get("/v1/files").json()["data"]]
    refused = image_chat(other, {"type": "image_url", "image_url": {"file_id": created["id"]}})
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "file_not_found"
    # the owner's file is untouched by the other key's delete
    assert owner.get(f"/v1/files/{created['id']}").status_code == 200
    assert image_chat(owner, {"type": "image_url", "image_url": {"file_id": created["id"]}}).status_code == 200


def test_another_keys_uuid_is_unknown(owner, other):
    data = media.image("png", seed=72)
    part = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(data).decode()},
            "uuid": "shared-name"}
    uuid = image_chat(owner, part).headers["X-Media-UUIDs"]
    for name in (uuid, "shared-name"):
        refused = image_chat(other, {"type": "image_url", "uuid": name})
        assert refused.status_code == 400 and refused.json()["error"]["code"] == "media_not_found"
        assert image_chat(owner, {"type": "image_url", "uuid": name}).status_code == 200
    # the same name is the other key's own once it sends bytes under it
    mine = media.image("png", seed=73)
    own = {**part, "image_url": {"url": "data:image/png;base64," + base64.b64encode(mine).decode()}}
    assert image_chat(other, own).headers["X-Media-UUIDs"] != uuid
    assert image_chat(other, {"type": "image_url", "uuid": "shared-name"}).json()["usage"]["media"] != [uuid]


def test_uploads_keep_the_inline_limits(owner):
    too_big = upload(owner, b"\x89PNG\r\n\x1a\n" + bytes(LIMITS["max_file_bytes"]))
    assert too_big.status_code == 413 and "max_file_bytes" in too_big.json()["error"]["message"]
    huge = upload(owner, media.image("png", width=1200, height=1000))  # past max_image_pixels, from its header
    assert huge.status_code == 413 and huge.json()["error"]["param"] == "file"
