"""API keys, CORS, request ids and what the log may hold, on the main gateway (keys from
ONELLM_API_KEYS and from --api-keys-file, CORS open to one origin); which keys share a tenant,
on the projects gateway (keys that share a name, keys that share a project)."""

import base64
import itertools
import re
import socket
import time
import uuid

import httpx
import pytest

import media
from gateways import ENV_KEYS, FILE_KEY, ORIGIN, PROJECT_KEYS
from scraped_metrics import total
from server.traffic.access import key_id, load_api_keys

WRONG_KEYS = ["env-key-0f3a9", "env-key-0f3a9c0", "ENV-KEY-0F3A9C", "wrong-key-a7e2f1"]


def assert_401(response: httpx.Response) -> dict:
    assert response.status_code == 401, response.text
    assert response.headers["www-authenticate"] == "Bearer"
    return response.json()


@pytest.mark.parametrize("path", ["/v1/models", "/metrics", "/openapi.json", "/docs"])
def test_every_path_but_the_probes_and_the_page_needs_a_key(hardened, path):
    assert_401(httpx.get(hardened.url + path))


def test_the_probes_and_the_page_stay_open(hardened):
    """Kubernetes and HAProxy check /health and /ready without a key."""
    assert httpx.get(f"{hardened.url}/health").status_code == 200
    assert httpx.get(f"{hardened.url}/ready").status_code == 200
    page = httpx.get(f"{hardened.url}/")
    assert page.status_code == 200 and 'id="api-key"' in page.text


@pytest.mark.browser
def test_the_page_asks_for_the_key_and_then_answers(hardened, browser):
    page = browser.new_page()
    try:
        page.goto(hardened.url + "/")
        page.wait_for_selector("text=a valid API key is required")  # /v1/models refused, shown plainly
        page.click("summary")
        page.fill("#api-key", ENV_KEYS[0])
        page.dispatch_event("#api-key", "change")
        page.wait_for_selector("#model:has-text('image')")
        page.fill("#max-tokens", "3")
        page.fill("#prompt", "Hello")
        page.click("#send")
        page.locator(".message.assistant .text").filter(has_text=re.compile(r"\S")).wait_for(timeout=60_000)
        assert ENV_KEYS[0] not in hardened.log()
    finally:
        page.close()


@pytest.mark.parametrize("key", [*ENV_KEYS, FILE_KEY])
def test_keys_from_the_environment_and_the_file_are_accepted(hardened, key):
    response = httpx.post(f"{hardened.url}/v1/chat", data={"prompt": "hi", "max_tokens": "2"},
                          headers={"Authorization": f"Bearer {key}"}, timeout=60)
    assert response.status_code == 200, response.text


def test_every_wrong_credential_gets_the_same_answer(hardened):
    attempts = [{}, {"Authorization": ""}, {"Authorization": "Bearer"}, {"Authorization": "Bearer  x"},
                {"Authorization": f"Basic {ENV_KEYS[0]}"}, {"Authorization": ENV_KEYS[0]},
                {"X-API-Key": ENV_KEYS[0]}, *({"Authorization": f"Bearer {k}"} for k in WRONG_KEYS)]
    bodies = [assert_401(httpx.post(f"{hardened.url}/v1/chat", data={"prompt": "hi"}, headers=h)) for h in attempts]
    assert all(b == bodies[0] for b in bodies), "the 401 must not tell which part was wrong"
    assert bodies[0]["error"]["type"] == "authentication_error"


def test_keys_are_never_logged(hardened, client):
    client.get("/v1/models")  # at least one request with a right key has been served
    log = hardened.log()
    for key in [*ENV_KEYS, FILE_KEY, *WRONG_KEYS]:
        assert key not in log
    assert "Bearer" not in log


def test_cors_allows_only_the_configured_origin(hardened):
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
    allowed = httpx.options(f"{hardened.url}/v1/chat/completions", headers={"Origin": ORIGIN, **preflight})
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == ORIGIN
    other = httpx.options(f"{hardened.url}/v1/chat/completions",
                          headers={"Origin": "https://evil.example", **preflight})
    assert "access-control-allow-origin" not in other.headers
    # a refused key still carries CORS headers, so the page can read why
    denied = httpx.get(f"{hardened.url}/v1/models", headers={"Origin": ORIGIN})
    assert denied.status_code == 401 and denied.headers["access-control-allow-origin"] == ORIGIN
    # a page may read the uuids of what it sent, and delete its stored files and responses
    assert "x-media-uuids" in denied.headers["access-control-expose-headers"].lower()
    delete = httpx.options(f"{hardened.url}/v1/files/file-x", headers={
        "Origin": ORIGIN, "Access-Control-Request-Method": "DELETE", "Access-Control-Request-Headers": "authorization"})
    assert delete.status_code == 200 and "DELETE" in delete.headers["access-control-allow-methods"]


def test_cors_is_closed_by_default(tiny_model):
    from fastapi.testclient import TestClient

    from server.entrypoints.app import create_app
    from server.config import Settings

    with TestClient(create_app(Settings(model=str(tiny_model)))) as app:
        response = app.options("/v1/chat/completions",
                               headers={"Origin": ORIGIN, "Access-Control-Request-Method": "POST"})
        assert "access-control-allow-origin" not in response.headers
        assert "access-control-allow-origin" not in app.get("/health", headers={"Origin": ORIGIN}).headers


# --- request ids ------------------------------------------------------------------------------

def test_a_sane_request_id_is_kept_and_logged(hardened, client):
    response = client.get("/v1/models", headers={"X-Request-ID": "trace-4f1e.77:a"})
    assert response.headers["x-request-id"] == "trace-4f1e.77:a"
    lines = [line for line in hardened.log().splitlines() if "trace-4f1e.77:a" in line]
    assert lines and all("[trace-4f1e.77:a]" in line for line in lines)


@pytest.mark.parametrize("given", ["has spaces in it", "x" * 129, "quote\"d", "per%cent", "ünïcode"])
def test_an_insane_request_id_is_replaced(client, given):
    response = client.get("/v1/models", headers={"X-Request-ID": given.encode("utf-8")})
    assert re.fullmatch(r"[0-9a-f]{32}", response.headers["x-request-id"])


def test_every_response_has_a_request_id(hardened, client):
    responses = [httpx.get(f"{hardened.url}/health"),  # open path
                 httpx.get(f"{hardened.url}/v1/models"),  # no key
                 client.post("/v1/chat", data={"prompt": "hi", "max_tokens": "999"}),  # past max_tokens_limit
                 client.post("/v1/chat", data={"prompt": "hi", "max_tokens": "2"})]  # a streamed answer
    assert [r.status_code for r in responses] == [200, 401, 400, 200], [r.text for r in responses]
    assert len({r.headers["x-request-id"] for r in responses}) == 4


def test_every_log_line_of_a_request_carries_its_id(hardened, client):
    probe = uuid.uuid4().hex
    response = client.get("/v1/models", params={"probe": probe}, headers={"X-Request-ID": "access-5c2d"})
    assert response.status_code == 200
    # uvicorn writes the access line as the response starts, before the client can read it
    lines = [line for line in hardened.log().splitlines() if probe in line]
    assert len(lines) == 1 and "uvicorn.access" in lines[0] and "[access-5c2d]" in lines[0], lines
    for line in hardened.log().splitlines():
        if "uvicorn.access" in line:  # every request's, this one's and the earlier tests'
            assert not re.search(r"\[-\]", line), line


def test_prompts_and_uploads_stay_out_of_the_log_below_debug(hardened, client):
    secret = "my-secret-diagnosis-84c1"
    upload = b"\x89PNG\r\n\x1a\n" + secret.encode() * 10
    statuses = [
        client.post("/v1/chat", files=[("image", ("scan.png", upload))], data={"prompt": f"is it {secret}?"}),
        client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": secret}], "max_tokens": 2}),
        client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": 7}], "max_tokens": 2}),
    ]
    # each got as far as its path goes: the upload to its decoder, the prompt to an answer, the bad part to its 400
    assert [r.status_code for r in statuses] == [422, 200, 400], [r.text for r in statuses]
    assert secret not in hardened.log()
    assert "scan.png" not in hardened.log()


def key_client(gateway, name: str) -> httpx.Client:
    return httpx.Client(base_url=gateway.url, timeout=120, headers={"Authorization": f"Bearer {PROJECT_KEYS[name]}"})


def stored_by(gateway, name: str) -> str:
    with key_client(gateway, name) as client:
        response = client.post("/v1/files", files={"file": ("a.png", media.image("png", seed=2501))},
                               data={"purpose": "vision"})
        assert response.status_code == 200, response.text
        return response.json()["id"]


def test_keys_that_share_only_a_name_see_none_of_each_others_files(projects):
    file_id = stored_by(projects, "team-1")
    with key_client(projects, "team-2") as other:
        assert other.get(f"/v1/files/{file_id}").status_code == 404
        assert other.get(f"/v1/files/{file_id}/content").status_code == 404
        assert other.delete(f"/v1/files/{file_id}").status_code == 404
    with key_client(projects, "team-1") as owner:
        assert owner.get(f"/v1/files/{file_id}").status_code == 200


def test_keys_of_one_project_share_its_files_and_stored_responses(projects):
    file_id = stored_by(projects, "old")
    with key_client(projects, "old") as old, key_client(projects, "new") as new:
        assert new.get(f"/v1/files/{file_id}/content").status_code == 200
        response = old.post("/v1/responses", json={"input": "Hi", "max_output_tokens": 2})
        assert response.status_code == 200, response.text
        assert new.get(f"/v1/responses/{response.json()['id']}").status_code == 200
        assert new.delete(f"/v1/files/{file_id}").status_code == 200
        assert old.get(f"/v1/files/{file_id}").status_code == 404


def test_a_tenant_is_never_answered_from_the_prefix_another_tenant_made(projects):
    """A prefix cached for team-1 would answer team-2's question about the same picture sooner,
    telling team-2 that someone sent it: team-2's request runs the encoder again. The keys of
    acme's project share theirs."""
    picture = "data:image/png;base64," + base64.b64encode(media.image("png", seed=2601)).decode()
    metrics_key = {"Authorization": f"Bearer {PROJECT_KEYS['old']}"}

    def encoder_runs_for(name: str) -> float:
        before = total(projects.url, "onellm_encoder_runs_total", metrics_key, modality="image")
        with key_client(projects, name) as client:
            content = [{"type": "image_url", "image_url": {"url": picture}}, {"type": "text", "text": "What is it?"}]
            response = client.post("/v1/chat/completions",
                                   json={"max_tokens": 1, "messages": [{"role": "user", "content": content}]})
            assert response.status_code == 200, response.text
        return total(projects.url, "onellm_encoder_runs_total", metrics_key, modality="image") - before

    assert [encoder_runs_for(name) for name in ("team-1", "team-2", "old", "new", "team-1")] == [1, 1, 1, 0, 0]


def test_keys_that_share_only_a_name_have_quotas_of_their_own(projects):
    """team-1 may have one request at once, team-2 the default: while team-1's one chat is still
    uploading, its second request is refused and team-2's is served."""
    with socket.create_connection(("127.0.0.1", projects.port)) as held:
        held.sendall(f"POST /v1/chat HTTP/1.1\r\nHost: gateway\r\nAuthorization: Bearer {PROJECT_KEYS['team-1']}\r\n"
                     f"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 1000\r\n\r\n".encode())
        with key_client(projects, "old") as watcher:  # the held chat counts once its body is arriving
            deadline = time.monotonic() + 30
            while "onellm_uploads_in_progress 1.0" not in watcher.get("/metrics").text:
                assert time.monotonic() < deadline, "the held chat never started uploading"
                time.sleep(0.05)
        with key_client(projects, "team-1") as team_1, key_client(projects, "team-2") as team_2:
            refused = team_1.get("/v1/files/file-none/content")
            assert refused.status_code == 429 and "key_max_concurrent" in refused.text, refused.text
            assert team_2.get("/v1/files/file-none/content").status_code == 404


def test_the_start_up_log_says_which_keys_share_a_project_and_which_only_a_name(projects):
    log = projects.log()
    assert "API keys acme-old, acme-new share project 'acme'" in log
    assert "2 API keys are named 'team' but share no project" in log
    assert all(secret not in log for secret in PROJECT_KEYS.values())


def test_keys_whose_short_ids_collide_are_still_tenants_apart():
    """The id in metrics is 32 bits of the key's hash; a tenant is all of it."""
    seen = {}
    for n in itertools.count():
        secret = f"sk-{n}"
        if (short := key_id(secret)) in seen:
            break
        seen[short] = secret
    first, second = load_api_keys((seen[short], secret), None)
    assert first.id == second.id
    assert first.tenant != second.tenant
