"""The bounds on what a gateway keeps and receives, through the `bounded` gateway (gateways.BOUNDS):
request bodies received at once (`max_uploads`, for all clients together), files stored per key
(`max_files_per_key`), how long a stored response lives (`response_ttl_s`), and the memory for
stored responses, media uuids and prefixes (`stored_responses_mb`, `references_mb`, `prefix_cache_mb`),
each a few records' worth, so that a handful of requests reaches it.
"""

import base64
import socket
import time

import httpx
import pytest

import media
from gateways import BOUNDS
from scraped_metrics import total

DEADLINE_S = 60  # generous: the machine is shared


@pytest.fixture(scope="module")
def client(bounded):
    with httpx.Client(base_url=bounded.url, timeout=DEADLINE_S) as c:
        yield c


def until(condition, what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        assert time.monotonic() < deadline, f"not within {DEADLINE_S} s: {what}"
        time.sleep(0.05)


# --- the way in ------------------------------------------------------------------------------

def upload_started(port: int) -> socket.socket:
    """A chat upload whose headers and first bytes have come, and no more."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE_S)
    sock.sendall("POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n"
                 "Content-Length: 100000\r\n\r\n".encode() + b'{"messages": [')
    return sock


def test_past_max_uploads_from_all_clients_a_new_body_gets_429(bounded, client):
    refused = total(bounded.url, "onellm_refusals_total", limit="max_uploads")
    held = [upload_started(bounded.port) for _ in range(BOUNDS["max_uploads"])]
    try:
        until(lambda: total(bounded.url, "onellm_uploads_in_progress") == BOUNDS["max_uploads"], "uploads held")
        over = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    finally:
        for sock in held:
            sock.close()
    assert over.status_code == 429, over.text
    assert "(max_uploads)" in over.json()["error"]["message"] and over.headers["retry-after"] == "1"
    assert total(bounded.url, "onellm_refusals_total", limit="max_uploads") == refused + 1
    until(lambda: total(bounded.url, "onellm_uploads_in_progress") == 0, "the held uploads ended")
    served = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1})
    assert served.status_code == 200, served.text


# --- what a key stores -----------------------------------------------------------------------

def upload(client, name: str) -> httpx.Response:
    return client.post("/v1/files", files={"file": (name, name.encode())}, data={"purpose": "user_data"})


def test_a_key_stores_max_files_per_key_files(client):
    ids = []
    for i in range(BOUNDS["max_files_per_key"]):
        response = upload(client, f"kept-{i}.txt")
        assert response.status_code == 200, response.text
        ids.append(response.json()["id"])
    over = upload(client, "one-more.txt")
    assert over.status_code == 400, over.text
    assert "(max_files_per_key)" in over.json()["error"]["message"]
    assert client.delete(f"/v1/files/{ids[0]}").status_code == 200
    assert upload(client, "in-its-place.txt").status_code == 200  # a deleted file frees its place


def store_response(client, text: str) -> str:
    response = client.post("/v1/responses", json={"input": text, "max_output_tokens": 1})
    assert response.status_code == 200, response.text
    return response.json()["id"]


def test_a_stored_response_lives_response_ttl_s(client):
    stored = time.monotonic()
    response_id = store_response(client, "Remember this.")
    assert client.get(f"/v1/responses/{response_id}").status_code == 200
    until(lambda: client.get(f"/v1/responses/{response_id}").status_code == 404, "the response expired")
    assert time.monotonic() - stored >= BOUNDS["response_ttl_s"]
    follow_up = client.post("/v1/responses", json={"input": "And?", "previous_response_id": response_id})
    assert follow_up.status_code == 400 and follow_up.json()["error"]["code"] == "previous_response_not_found"


def test_stored_responses_past_stored_responses_mb_push_out_the_oldest(client):
    first = store_response(client, "The first one.")
    stored = time.monotonic()
    later = [store_response(client, f"Another one, number {i}.") for i in range(16)]  # over 8 kB together
    # read back only now: a read makes a response the most recently used
    assert client.get(f"/v1/responses/{later[-1]}").status_code == 200
    assert client.get(f"/v1/responses/{first}").status_code == 404
    # gone for want of room, before its TTL could have ended it
    assert time.monotonic() - stored < BOUNDS["response_ttl_s"], "16 responses took longer than the TTL: room and TTL cannot be told apart"


# --- attachments -----------------------------------------------------------------------------

def image_chat(client, image: bytes, uuid: str | None = None) -> httpx.Response:
    part = {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{base64.b64encode(image).decode()}"}}
    return client.post("/v1/chat/completions", json={"max_tokens": 1, "messages": [
        {"role": "user", "content": [part | ({"uuid": uuid} if uuid else {}), {"type": "text", "text": "What?"}]}]})


def by_uuid(client, uuid: str) -> httpx.Response:
    return client.post("/v1/chat/completions", json={"max_tokens": 1, "messages": [
        {"role": "user", "content": [{"type": "image_url", "uuid": uuid}, {"type": "text", "text": "And?"}]}]})


def test_media_uuids_past_references_mb_push_out_the_oldest(client):
    image = media.image("png", seed=90)  # one image, one prefix: only the uuids grow
    names = [f"photo-{i}" for i in range(40)]
    for name in names:
        assert image_chat(client, image, uuid=name).status_code == 200
    forgotten = by_uuid(client, names[0])
    assert forgotten.status_code == 400 and forgotten.json()["error"]["code"] == "media_not_found", forgotten.text
    assert by_uuid(client, names[-1]).status_code == 200


def test_prefixes_past_prefix_cache_mb_push_out_the_oldest(bounded, client):
    images = [media.image("png", seed=100 + i) for i in range(5)]  # five prefixes: two more than fit
    for image in images:
        assert image_chat(client, image).status_code == 200
    runs, hits = (total(bounded.url, name) for name in ("onellm_encoder_runs_total", "onellm_prefix_cache_hits_total"))
    assert image_chat(client, images[-1]).status_code == 200
    assert total(bounded.url, "onellm_prefix_cache_hits_total") == hits + 1
    assert image_chat(client, images[0]).status_code == 200
    assert total(bounded.url, "onellm_encoder_runs_total") == runs + 1
