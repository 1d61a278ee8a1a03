"""Every limit of the main gateway (conftest.LIMITS), passed by one step: a 4xx that names the
limit and the field. Files are real ones, made here with the libraries people's tools use."""

import base64
import socket

import numpy as np
import pytest
from PIL import Image

import inputs_files as files
from gateways import ENV_KEYS, LIMITS

FMRI_VOXELS = 15724


def assert_refused(response, status: int, param: str | None, *names: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param, error
    for name in names:
        assert name in error["message"], error
    return error


def noise_png(width: int, height: int, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return files.image_bytes(Image.fromarray(pixels), "PNG")


def grey_video(seconds: float, width: int = 64, height: int = 48, fps: int = 10) -> bytes:
    return files.video_bytes(files.level_frames([128] * int(seconds * fps), width, height), fps=fps)


def upload(client, field: str, data: bytes, **form):
    return client.post("/v1/chat", files=[(field, (f"upload.{field}", data))],
                       data={"prompt": "what is it?", "max_tokens": "2", "stream": "false", **form})


def raw_request(port: int, head: bytes, body_parts, timeout: float = 30) -> bytes:
    """Sends the head and then body parts until the server answers; never ends the body.
    Returns what the server sent: proof that it answered while the upload was still going."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head)
        for part in body_parts:
            try:
                sock.sendall(part)
            except (BrokenPipeError, ConnectionResetError):
                break
            sock.settimeout(0.01)
            try:
                answer = sock.recv(65536)
            except TimeoutError:
                continue
            finally:
                sock.settimeout(timeout)
            if answer:
                return answer + rest_until_closed(sock)
        return sock.recv(65536)


def rest_until_closed(sock: socket.socket) -> bytes:
    """What the server sends until it closes the connection; a hang here fails the test with
    a timeout, as a server that keeps draining an unwanted upload should."""
    rest = b""
    while True:
        try:
            data = sock.recv(65536)
        except ConnectionResetError:  # closed with the client's unread bytes in its buffer
            return rest
        if not data:
            return rest
        rest += data


AUTH = f"Authorization: Bearer {ENV_KEYS[0]}\r\n".encode()


# --- bytes, enforced while the body streams in -------------------------------------------------

def test_a_declared_length_over_the_request_limit_is_refused_before_the_body(client):
    response = client.post("/v1/chat/completions", content=b"{" + b" " * LIMITS["max_request_bytes"] + b"}",
                           headers={"content-type": "application/json"})
    assert_refused(response, 413, None, "max_request_bytes")


def test_a_chunked_body_is_cut_off_at_the_request_limit(hardened):
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" + AUTH +
            b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
    chunk = 256 * 1024
    parts = (f"{chunk:x}\r\n".encode() + b" " * chunk + b"\r\n" for _ in range(10_000))  # 2.5 GB, never sent
    answer = raw_request(hardened.port, head, parts)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"max_request_bytes" in answer
    assert b"connection: close" in answer.lower()


def test_a_file_over_the_file_limit_is_refused_while_it_uploads(hardened):
    boundary = b"hardening-boundary"
    head = (b"POST /v1/chat HTTP/1.1\r\nHost: x\r\n" + AUTH +
            b"Content-Type: multipart/form-data; boundary=" + boundary + b"\r\n"
            b"Content-Length: " + str(LIMITS["max_request_bytes"] - 1).encode() + b"\r\n\r\n")
    preamble = (b"--" + boundary + b"\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n"
                b"Content-Type: image/png\r\n\r\n")
    parts = [preamble, *(b"\x00" * 65536 for _ in range(LIMITS["max_request_bytes"] // 65536 - 1))]
    answer = raw_request(hardened.port, head, parts)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b'"param":"image"' in answer and b"max_file_bytes" in answer
    assert b"connection: close" in answer.lower()


def test_a_body_read_to_its_end_keeps_the_connection_open(client):
    response = upload(client, "image", noise_png(32, 32))
    assert response.status_code == 200, response.text
    assert response.headers.get("connection", "keep-alive").lower() != "close"


def test_a_base64_part_over_the_file_limit_names_its_content_part(client):
    data = base64.b64encode(b"\x89PNG\r\n\x1a\n" + bytes(LIMITS["max_file_bytes"])).decode()
    response = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": [
        {"type": "text", "text": "hi"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}}]}]})
    assert_refused(response, 413, "messages[0].content[1].image_url.url", "max_file_bytes")


# --- content limits, from the file's own headers ---------------------------------------------

def flat_png(width: int, height: int) -> bytes:
    return files.image_bytes(Image.new("RGB", (width, height), (90, 120, 30)), "PNG")


def test_an_image_over_the_pixel_limit(client):
    assert_refused(upload(client, "image", flat_png(1100, 1000)), 413, "image", "1000000")


def test_a_decompression_bomb_is_refused_from_its_header(client):
    bomb = files.png_with_declared_size(100_000, 100_000)  # 10^10 pixels declared in 70 bytes
    assert_refused(upload(client, "image", bomb), 413, "image")


def test_a_depth_map_over_the_pixel_limit(client):
    response = client.post("/v1/chat", files=[("image", ("a.png", noise_png(64, 48))),
                                              ("depth", ("d.png", flat_png(1100, 1000)))],
                           data={"prompt": "hi", "max_tokens": "2", "stream": "false"})
    assert_refused(response, 413, "depth")


def test_a_video_over_the_duration_limit(client):
    assert_refused(upload(client, "video", grey_video(6)), 413, "video", "5 s")


def test_video_frames_over_the_frame_size_limit(client):
    assert_refused(upload(client, "video", grey_video(1, width=1000, height=600)), 413, "video", "500000")


def test_audio_over_the_duration_limit(client):
    wav = files.sound_bytes(files.tone(440, 6, 16000), 16000)
    assert_refused(upload(client, "audio", wav), 413, "audio", "5 s")


def test_a_point_cloud_over_the_point_limit(client):
    cloud = np.random.default_rng(0).normal(size=(LIMITS["max_points"] + 1, 3)).astype(np.float32)
    assert_refused(upload(client, "point", files.npy_bytes(cloud)), 413, "point", str(LIMITS["max_points"]))


def test_an_imu_series_over_the_length_limit(client):
    series = np.zeros((LIMITS["max_imu_samples"] + 1, 6), np.float32)
    assert_refused(upload(client, "imu", files.npy_bytes(series)), 413, "imu", str(LIMITS["max_imu_samples"]))


def test_fmri_over_the_repeat_limit(client):
    repeats = np.zeros((LIMITS["max_fmri_repeats"] + 1, FMRI_VOXELS), np.float32)
    assert_refused(upload(client, "fmri", files.npy_bytes(repeats)), 413, "fmri", str(LIMITS["max_fmri_repeats"]))


@pytest.mark.parametrize("field", ["imu", "fmri", "point"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_and_inf_are_refused(client, field, bad):
    shape = {"imu": (400, 6), "fmri": (FMRI_VOXELS,), "point": (100, 3)}[field]
    array = np.ones(shape, np.float32)
    array.flat[7] = bad
    assert_refused(upload(client, field, files.npy_bytes(array)), 422, field)


# --- the chat itself ------------------------------------------------------------------------------

def test_text_over_the_character_limit(client):
    response = client.post("/v1/chat", data={"prompt": "x" * (LIMITS["max_text_chars"] + 1), "max_tokens": "2"})
    assert_refused(response, 413, "prompt", "max_text_chars")
    history = [{"role": "user", "content": "y" * 2100}, {"role": "assistant", "content": "ok"},
               {"role": "user", "content": "z" * 2000}]
    response = client.post("/v1/chat/completions", json={"messages": history, "max_tokens": 2})
    assert_refused(response, 413, "messages", "max_text_chars")


def test_too_many_turns(client):
    turns = [{"role": "user" if i % 2 == 0 else "assistant", "content": "hi"} for i in range(LIMITS["max_turns"] + 1)]
    response = client.post("/v1/chat/completions", json={"messages": turns, "max_tokens": 2})
    assert_refused(response, 400, "messages", "max_turns")


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_max_tokens_over_the_cap(client, field):
    response = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                         field: LIMITS["max_tokens_limit"] + 1})
    assert_refused(response, 400, field, "max_tokens_limit")
    response = client.post("/v1/chat", data={"prompt": "hi", "max_tokens": str(LIMITS["max_tokens_limit"] + 1)})
    assert_refused(response, 400, "max_tokens", "max_tokens_limit")


def test_too_many_attachments(client):
    images = [("image", (f"{i}.png", noise_png(32, 32, seed=i))) for i in range(LIMITS["max_attachments"] + 1)]
    response = client.post("/v1/chat", files=images, data={"prompt": "hi", "max_tokens": "2"})
    assert_refused(response, 400, "messages", "max_attachments")
    many = [("image", (f"{i}.png", b"x")) for i in range(2 * LIMITS["max_attachments"] + 1)]
    response = client.post("/v1/chat", files=many, data={"prompt": "hi"})
    assert_refused(response, 400, "image", "max_attachments")


def test_requests_within_every_limit_are_served(client):
    # a 2.1 MB image: bigger than Starlette keeps in memory, so it is spooled to a temp file
    wav = files.sound_bytes(files.tone(440, 4, 16000), 16000)
    response = client.post("/v1/chat", files=[("image", ("a.png", noise_png(700, 1000))), ("audio", ("a.wav", wav))],
                           data={"prompt": ("the cat sat on the mat. " * 100)[:1500],
                                 "max_tokens": str(LIMITS["max_tokens_limit"]), "stream": "false"})
    assert response.status_code == 200, response.text
