"""Every error path of the gateway, through the real server: the status, an error body with `type`,
`message` and `param`, and `param` naming the field at fault. Nothing may answer 500."""

import base64
import io

import numpy as np
import pytest

import media
from gateway_helpers import ALLOWED_HOST, assert_error, metric, metrics

PNG = media.image("png", seed=500)
WAV = media.audio("wav", seed=500)
MP4 = media.video("mp4", seed=500)
ANY = ...  # the status is checked, the param is whatever the server says


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def png_claiming(width: int, height: int) -> bytes:
    """A valid PNG of 1x1 pixels whose header claims width x height (a decompression bomb in form)."""
    import struct
    import zlib
    data = bytearray(media.image("png", width=1, height=1))
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


def pickled_npy() -> bytes:
    out = io.BytesIO()
    np.save(out, np.array([{"x": 1}], dtype=object), allow_pickle=True)
    return out.getvalue()


def silent_flac(seconds: int, rate: int = 8000) -> bytes:
    """Minutes of silence compress to a few kilobytes in FLAC."""
    import soundfile as sf
    out = io.BytesIO()
    sf.write(out, np.zeros(seconds * rate, np.int16), rate, format="FLAC")
    return out.getvalue()


# --- POST /v1/chat (multipart) ------------------------------------------------------------------

def form(client, files=(), **fields):
    data = {"prompt": "What is it?", "max_tokens": "1", **fields}
    return client.post("/v1/chat", files=list(files), data={k: v for k, v in data.items() if v is not None})


def upload(field, data, name="upload.bin"):
    return (field, (name, data, "application/octet-stream"))


MULTIPART = [
    ("missing-prompt", lambda c: form(c, [upload("image", PNG)], prompt=None), 400, "prompt"),
    ("unknown-upload-field", lambda c: form(c, [upload("picture", PNG)]), 400, "picture"),
    ("unknown-text-field", lambda c: form(c, colour="red"), 400, "colour"),
    ("text-in-a-file-field", lambda c: form(c, image="not a file"), 400, "image"),
    ("depth-without-image", lambda c: form(c, [upload("depth", PNG)]), 400, "depth"),
    ("normal-with-audio-only", lambda c: form(c, [upload("audio", WAV), upload("normal", PNG)]), 400, "normal"),
    ("png-as-audio", lambda c: form(c, [upload("audio", PNG, "sound.wav")]), 415, "audio"),
    ("png-as-video", lambda c: form(c, [upload("video", PNG, "clip.mp4")]), 415, "video"),
    ("wav-as-image", lambda c: form(c, [upload("image", WAV, "cat.jpg")]), 415, "image"),
    ("truncated-mp4", lambda c: form(c, [upload("video", MP4[: len(MP4) // 2], "clip.mp4")]), {415, 422}, "video"),
    ("truncated-wav", lambda c: form(c, [upload("audio", WAV[: len(WAV) // 2], "sound.wav")]), {415, 422}, "audio"),
    ("empty-image", lambda c: form(c, [upload("image", b"")]), 422, "image"),
    ("nan-fmri-npy", lambda c: form(c, [upload("fmri", media.npy(np.full(15724, np.nan, np.float32)))]), 422, "fmri"),
    ("nan-point-npy", lambda c: form(c, [upload("point", media.npy(np.full((100, 6), np.nan)))]), 422, "point"),
    ("pickle-npy", lambda c: form(c, [upload("point", pickled_npy())]), 422, "point"),
    ("fmri-wrong-shape", lambda c: form(c, [upload("fmri", media.npy(np.zeros(100, np.float32)))]), 422, "fmri"),
    ("imu-csv-not-numbers", lambda c: form(c, [upload("imu", b"ax,ay\n1,x\n", "imu.csv")]), 422, "imu"),
    ("image-too-large", lambda c: form(c, [upload("image", png_claiming(20000, 20000))]), 413, "image"),
    ("unknown-model", lambda c: form(c, model="gpt-4o"), 404, "model"),
    ("max-tokens-0", lambda c: form(c, max_tokens="0"), 400, "max_tokens"),
    ("max-tokens-negative", lambda c: form(c, max_tokens="-5"), 400, "max_tokens"),
    ("max-tokens-not-a-number", lambda c: form(c, max_tokens="many"), 400, "max_tokens"),
    ("temperature-too-high", lambda c: form(c, temperature="5"), 400, "temperature"),
    ("temperature-negative", lambda c: form(c, temperature="-1"), 400, "temperature"),
    ("top-p-0", lambda c: form(c, top_p="0"), 400, "top_p"),
    ("imu-sample-rate-0", lambda c: form(c, [upload("imu", media.imu("csv"), "imu.csv")], imu_sample_rate="0"),
     400, "imu_sample_rate"),
    ("seed-beyond-64-bits", lambda c: form(c, seed=str(2**70), temperature="1"), 400, "seed"),
    ("audio-too-long", lambda c: form(c, [upload("audio", silent_flac(601), "long.flac")]), 413, "audio"),
    ("stream-not-a-boolean", lambda c: form(c, stream="maybe"), 400, "stream"),
    ("stop-json-list-of-numbers", lambda c: form(c, stop="[1, 2]"), 400, "stop"),
    ("stop-longer-than-1024", lambda c: form(c, stop="x" * 1025), 400, "stop"),
    ("messages-not-json", lambda c: form(c, messages="[{role: user}", prompt=None), 400, "messages"),
    ("messages-not-a-list", lambda c: form(c, messages='{"role": "user"}', prompt=None), 400, "messages"),
    ("messages-end-with-assistant", lambda c: form(c, messages='[{"role": "assistant", "content": "hi"}]', prompt=None),
     400, "messages"),
    ("json-body", lambda c: c.post("/v1/chat", json={"prompt": "hi"}), 415, None),
    ("text-body", lambda c: c.post("/v1/chat", content=b"prompt=hi", headers={"content-type": "text/plain"}),
     415, None),
    ("multipart-without-boundary", lambda c: c.post("/v1/chat", content=b"garbage",
                                                    headers={"content-type": "multipart/form-data"}), 400, None),
]


# --- POST /v1/chat/completions (JSON) -----------------------------------------------------------

def chat_json(client, *parts, **fields):
    content = [{"type": "text", "text": "What is it?"}, *parts]
    body = {"max_tokens": 1, "messages": [{"role": "user", "content": content}]}
    return client.post("/v1/chat/completions", json={**body, **fields})


def image_url(url):
    return {"type": "image_url", "image_url": {"url": url}}


def audio_part(data):
    return {"type": "input_audio", "input_audio": {"data": data, "format": "wav"}}


def part(kind, data):
    return {"type": kind, kind: {"data": data}}


JSON = [
    ("malformed-json", lambda c: c.post("/v1/chat/completions", content=b'{"messages": [',
                                        headers={"content-type": "application/json"}), 400, None),
    ("json-endpoint-given-a-form", lambda c: c.post("/v1/chat/completions", data={"prompt": "hi"}), 415, None),
    ("json-not-an-object", lambda c: c.post("/v1/chat/completions", json=[1, 2]), 400, None),
    ("missing-messages", lambda c: c.post("/v1/chat/completions", json={"model": "tiny"}), 400, "messages"),
    ("empty-messages", lambda c: c.post("/v1/chat/completions", json={"messages": []}), 400, "messages"),
    ("last-message-from-assistant", lambda c: c.post("/v1/chat/completions", json={
        "messages": [{"role": "assistant", "content": "hi"}]}), 400, "messages"),
    ("bad-base64-image", lambda c: chat_json(c, image_url("data:image/png;base64,@@not base64@@")),
     400, "messages[0].content[1].image_url.url"),
    ("bad-base64-audio", lambda c: chat_json(c, audio_part("%%%")),
     400, "messages[0].content[1].input_audio.data"),
    ("bad-base64-point", lambda c: chat_json(c, part("input_point", "not*base64")),
     400, "messages[0].content[1].input_point.data"),
    ("data-url-not-base64", lambda c: chat_json(c, image_url("data:image/png,rawbytes")),
     400, "messages[0].content[1].image_url.url"),
    ("file-url", lambda c: chat_json(c, image_url("file:///etc/passwd")), 400, "messages[0].content[1].image_url.url"),
    ("unknown-part-type", lambda c: chat_json(c, {"type": "input_smell", "input_smell": {"data": "AAAA"}}),
     400, "messages[0].content[1].type"),
    ("attachment-from-assistant", lambda c: c.post("/v1/chat/completions", json={"max_tokens": 1, "messages": [
        {"role": "assistant", "content": [image_url(f"data:image/png;base64,{b64(PNG)}")]},
        {"role": "user", "content": "and?"}]}), 400, "messages[0].content"),
    ("depth-part-without-image", lambda c: chat_json(c, part("input_depth", b64(PNG))), 400, "messages[0].content"),
    ("png-as-input-audio", lambda c: chat_json(c, audio_part(b64(PNG))),
     415, "messages[0].content[1].input_audio.data"),
    ("nan-input-fmri", lambda c: chat_json(c, part("input_fmri", b64(media.npy(np.full(15724, np.nan, np.float32))))),
     422, "messages[0].content[1].input_fmri.data"),
    ("text-as-input-depth", lambda c: chat_json(c, image_url(f"data:image/png;base64,{b64(PNG)}"),
                                                part("input_depth", b64(b"not an image"))),
     415, "messages[0].content[2].input_depth.data"),
    ("imu-sample-rate-negative", lambda c: chat_json(c, {"type": "input_imu", "input_imu": {
        "data": b64(media.imu("npy")), "sample_rate": -100}}), 400, "messages[0].content[1].input_imu.sample_rate"),
    ("unknown-model", lambda c: chat_json(c, model="gpt-4o"), 404, "model"),
    ("max-tokens-0", lambda c: chat_json(c, max_tokens=0), 400, "max_tokens"),
    ("temperature-too-high", lambda c: chat_json(c, temperature=3.5), 400, "temperature"),
    ("top-p-above-1", lambda c: chat_json(c, top_p=1.5), 400, "top_p"),
    ("seed-beyond-64-bits", lambda c: chat_json(c, seed=2**70, temperature=1), 400, "seed"),
    ("seed-beyond-64-bits-streaming", lambda c: chat_json(c, seed=-(2**64), temperature=1, stream=True), 400, "seed"),
    ("five-stop-strings", lambda c: chat_json(c, stop=["a", "b", "c", "d", "e"]), 400, "stop"),
    ("stop-longer-than-1024", lambda c: chat_json(c, stop=["a", "é" * 1025]), 400, "stop"),
]


@pytest.mark.parametrize("make, status, param", [c[1:] for c in MULTIPART], ids=[c[0] for c in MULTIPART])
def test_multipart_errors(client, make, status, param):
    response = make(client)
    error = assert_error(response, response.status_code if isinstance(status, set) else status, param)
    assert response.status_code in (status if isinstance(status, set) else {status}), error


@pytest.mark.parametrize("make, status, param", [c[1:] for c in JSON], ids=[c[0] for c in JSON])
def test_json_errors(client, make, status, param):
    assert_error(make(client), status, param)


# --- remote URLs --------------------------------------------------------------------------------

def test_remote_url_from_a_host_not_allowed_is_refused(client, file_server):
    file_server.files["/refused.png"] = PNG
    url = file_server.url("/refused.png", host="localhost")  # the same live server, by a name not on the list
    assert "localhost" != ALLOWED_HOST
    error = assert_error(chat_json(client, image_url(url)), 400, "messages[0].content[1].image_url.url")
    assert "localhost" in error["message"]
    assert "/refused.png" not in file_server.requested  # refused before any request went out


@pytest.mark.parametrize("url", ["https://example.com/cat.png", "http://169.254.169.254/latest/meta-data/",
                                 "http://[::1]/x.png"])
def test_remote_urls_elsewhere_are_refused(client, url):
    assert_error(chat_json(client, image_url(url)), 400, "messages[0].content[1].image_url.url")


def test_video_url_from_a_host_not_allowed_is_refused(client):
    response = chat_json(client, {"type": "video_url", "video_url": {"url": "https://example.com/clip.mp4"}})
    assert_error(response, 400, "messages[0].content[1].video_url.url")


# --- other routes ------------------------------------------------------------------------------

def test_ready_health_and_models(client, served_model):
    ready = client.get("/ready")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    assert client.get("/health").status_code == 200
    models = client.get("/v1/models").json()
    assert models["object"] == "list"
    card = models["data"][0]
    assert card["id"] == served_model and card["object"] == "model"
    assert set(card["modalities"]) == {"image", "video", "audio", "point", "rgbd", "rgbn", "fmri", "imu"}


def test_unknown_route_and_method_are_json_errors(client):
    assert_error(client.get("/v1/nothing-here"), 404)
    assert_error(client.get("/v1/chat"), 405)


def test_requests_refused_before_their_chat_is_read_are_counted(client):
    before = metric(client, "onellm_requests_total", modality="unread", status="400")
    assert_error(form(client, [upload("sound", PNG, "sound.wav")], prompt="hi"), 400, "sound")
    assert_error(client.post("/v1/chat/completions", json={"messages": []}), 400, "messages")
    assert metric(client, "onellm_requests_total", modality="unread", status="400") == before + 2


def test_decoding_failures_are_counted_and_nothing_was_a_500(client):
    before = metric(client, "onellm_requests_total", modality="audio", status="415")
    assert_error(form(client, [upload("audio", PNG, "sound.wav")]), 415, "audio")
    assert metric(client, "onellm_requests_total", modality="audio", status="415") == before + 1
    statuses = {dict(labels)["status"] for (name, labels), value in metrics(client).items()
                if name == "onellm_requests_total" and value > 0}
    assert "500" not in statuses
    assert metric(client, "onellm_queue_depth") == 0  # failed requests left the queue
