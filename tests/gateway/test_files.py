"""OpenAI's Files API on the session's gateway (no API keys: one open scope), and stored files in chats."""

import base64
import io
import pickle
import zipfile

import numpy as np
import pytest

import media
from gateway_helpers import assert_error

GREEDY = {"max_tokens": 6, "temperature": 0}
FILE_FIELDS = {"id", "object", "bytes", "created_at", "expires_at", "filename", "purpose"}


def upload(client, data: bytes, name: str = "clip.bin", **form):
    return client.post("/v1/files", files={"file": (name, data)}, data={"purpose": "user_data", **form})


def stored(client, data: bytes, name: str = "clip.bin") -> dict:
    response = upload(client, data, name)
    assert response.status_code == 200, response.text
    return response.json()


def blobs(gateway) -> int:
    folder = gateway.files_dir / "blobs"
    return len(list(folder.iterdir())) if folder.exists() else 0


def answer(response) -> str:
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def chat(client, *parts: dict) -> str:
    message = {"role": "user", "content": [*parts, {"type": "text", "text": "What is it?"}]}
    return answer(client.post("/v1/chat/completions", json={"messages": [message], **GREEDY}))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_upload_get_content_list_delete(client):
    data = media.image("png", seed=51)
    created = stored(client, data, "../../etc/cat photo.png")
    assert FILE_FIELDS <= created.keys() and created["object"] == "file" and created["id"].startswith("file-")
    assert created["bytes"] == len(data) and created["filename"] == "cat_photo.png"
    assert created["expires_at"] > created["created_at"]
    assert client.get(f"/v1/files/{created['id']}").json() == created
    assert client.get(f"/v1/files/{created['id']}/content").content == data
    listed = client.get("/v1/files").json()
    assert listed["object"] == "list" and created in listed["data"]
    assert client.delete(f"/v1/files/{created['id']}").json() == {"id": created["id"], "object": "file", "deleted": True}
    for response in (client.get(f"/v1/files/{created['id']}"), client.get(f"/v1/files/{created['id']}/content"),
                     client.delete(f"/v1/files/{created['id']}")):
        assert assert_error(response, 404)["code"] == "file_not_found"
    assert created["id"] not in [f["id"] for f in client.get("/v1/files").json()["data"]]


def test_listing_filters_orders_and_pages(client):
    ids = [stored(client, media.image("png", seed=60 + i))["id"] for i in range(3)]
    vision = client.post("/v1/files", files={"file": ("v.png", media.image("png", seed=63))},
                         data={"purpose": "vision"}).json()
    newest_first = [f["id"] for f in client.get("/v1/files").json()["data"]]
    assert newest_first.index(vision["id"]) < newest_first.index(ids[2]) < newest_first.index(ids[0])
    assert [f["id"] for f in client.get("/v1/files", params={"purpose": "vision"}).json()["data"]] == [vision["id"]]
    page = client.get("/v1/files", params={"limit": 1, "order": "asc", "after": ids[0]}).json()
    assert [f["id"] for f in page["data"]] == [ids[1]] and page["has_more"] and page["last_id"] == ids[1]


def test_the_same_bytes_are_stored_once(client, gateway):
    data = media.video("mp4", seed=52)
    before = blobs(gateway)
    first, second = stored(client, data), stored(client, data)
    assert first["id"] != second["id"] and blobs(gateway) == before + 1
    client.delete(f"/v1/files/{first['id']}")
    assert client.get(f"/v1/files/{second['id']}/content").content == data  # still held for the other upload
    client.delete(f"/v1/files/{second['id']}")
    assert blobs(gateway) == before


def test_expires_after_is_honoured_and_bounded(client):
    created = upload(client, media.image("png", seed=53), **{"expires_after[anchor]": "created_at",
                                                              "expires_after[seconds]": "3600"}).json()
    assert created["expires_at"] == created["created_at"] + 3600
    for seconds in ("59", "99999999", "soon"):
        response = upload(client, media.image("png"), **{"expires_after[anchor]": "created_at",
                                                         "expires_after[seconds]": seconds})
        assert_error(response, 400, "expires_after[seconds]")
    assert_error(upload(client, media.image("png"), **{"expires_after[anchor]": "last_active_at",
                                                       "expires_after[seconds]": "3600"}), 400, "expires_after[anchor]")


def test_bad_uploads_are_refused_before_anything_is_stored(client, gateway):
    objects = io.BytesIO()
    np.save(objects, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("x.npy", b"\x93NUMPY")
    before = blobs(gateway)
    for payload in (pickle.dumps({"x": 1}), archive.getvalue(), b"%PDF-1.7\n..."):
        assert_error(upload(client, payload), 415, "file")
    assert_error(upload(client, objects.getvalue()), 422, "file")
    assert_error(upload(client, b""), 422, "file")
    assert_error(upload(client, media.image("png"), purpose="fine-tune"), 400, "purpose")
    assert_error(client.post("/v1/files", files={"purpose": (None, "user_data")}), 400, "file")
    assert_error(client.post("/v1/files", data={"purpose": "user_data"}), 415)
    assert_error(client.post("/v1/files", json={"purpose": "user_data"}), 415)
    assert_error(client.post("/v1/files", files={"file": ("a", b"x")}, data={"purpose": "user_data", "extra": "1"}),
                 400, "extra")
    assert blobs(gateway) == before


@pytest.mark.parametrize("name, data, inline", [
    ("image", media.image("jpg", seed=54), lambda d: {"type": "image_url", "image_url": {"url": f"data:image/jpeg;base64,{b64(d)}"}}),
    ("video", media.video("mp4", seed=54), lambda d: {"type": "video_url", "video_url": {"url": f"data:video/mp4;base64,{b64(d)}"}}),
    ("audio", media.audio("wav", seed=54), lambda d: {"type": "input_audio", "input_audio": {"data": b64(d), "format": "wav"}}),
    ("point", media.point("ply", seed=54), lambda d: {"type": "input_point", "input_point": {"data": b64(d)}}),
])
def test_a_file_part_is_the_modality_its_bytes_are(client, name, data, inline):
    file_id = stored(client, data)["id"]
    assert chat(client, {"type": "file", "file": {"file_id": file_id}}) == chat(client, inline(data))


@pytest.mark.parametrize("field, data", [("fmri", media.fmri("npy", seed=55)), ("imu", media.imu("npy", seed=55))])
def test_arrays_go_in_the_part_of_their_modality(client, field, data):
    file_id = stored(client, data)["id"]
    by_file = chat(client, {"type": f"input_{field}", f"input_{field}": {"file_id": file_id}})
    assert by_file == chat(client, {"type": f"input_{field}", f"input_{field}": {"data": b64(data)}})
    response = client.post("/v1/chat/completions", json={"messages": [
        {"role": "user", "content": [{"type": "file", "file": {"file_id": file_id}}]}], **GREEDY})
    assert f"input_{field}" in assert_error(response, 400, "messages[0].content[0].file.file_id")["message"]


def test_the_form_endpoint_takes_stored_files(client):
    image, depth = media.image("png", seed=56), media.depth_map(seed=56)
    form = {"prompt": "What is near?", "stream": "false", **{k: str(v) for k, v in GREEDY.items()}}
    inline = client.post("/v1/chat", data=form, files=[("image", ("a.png", image)), ("depth", ("d.png", depth))])
    by_file = client.post("/v1/chat", data={**form, "image_file_id": stored(client, image)["id"],
                                            "depth_file_id": stored(client, depth)["id"]})
    assert answer(by_file) == answer(inline)
    assert by_file.headers["X-Media-UUIDs"] == inline.headers["X-Media-UUIDs"]  # the same bytes, the same uuid


def test_a_file_that_is_gone_is_a_clear_error(client):
    file_id = stored(client, media.image("png", seed=57))["id"]
    client.delete(f"/v1/files/{file_id}")
    response = client.post("/v1/chat/completions", json={"messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"file_id": file_id}}]}], **GREEDY})
    error = assert_error(response, 400, "messages[0].content[0].image_url.file_id")
    assert error["code"] == "file_not_found" and file_id in error["message"]
    form = {"prompt": "Hi", "stream": "false", "video_file_id": "file-0"}
    assert assert_error(client.post("/v1/chat", data=form), 400, "video_file_id")["code"] == "file_not_found"
    bad = client.post("/v1/chat/completions", json={"messages": [
        {"role": "user", "content": [{"type": "file", "file": {"file_id": 7}}]}], **GREEDY})
    assert_error(bad, 400, "messages[0].content[0].file.file_id")


def test_the_openai_sdk_manages_files(base_url):
    openai = pytest.importorskip("openai")
    sdk = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused")
    data = media.audio("wav", seed=58)
    created = sdk.files.create(file=("tone.wav", data), purpose="user_data",
                               expires_after={"anchor": "created_at", "seconds": 7200})
    assert created.bytes == len(data) and created.expires_at == created.created_at + 7200
    assert sdk.files.retrieve(created.id).filename == "tone.wav"
    assert sdk.files.content(created.id).read() == data
    assert created.id in [f.id for f in sdk.files.list()]
    assert sdk.files.delete(created.id).deleted
    with pytest.raises(openai.NotFoundError):
        sdk.files.retrieve(created.id)
