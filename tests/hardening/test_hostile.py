"""Hostile uploads through the main gateway: untrusted bytes stay data (no pickle runs, no file
named inside an upload is opened) and leave nothing behind (temp files, descriptors)."""

import io
import os
import pickle
import socket
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

import inputs_files as files
from gateways import ENV_KEYS, LIMITS


class _Planted:
    """Unpickling this would run `touch <marker>`."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def pickled_payloads(marker: str) -> dict[str, bytes]:
    bomb = pickle.dumps(_Planted(marker))
    objects = io.BytesIO()
    np.save(objects, np.array([_Planted(marker)], dtype=object), allow_pickle=True)
    npz = io.BytesIO()
    with zipfile.ZipFile(npz, "w") as archive:
        archive.writestr("arr_0.npy", objects.getvalue())
    return {"pickle": bomb, "object .npy": objects.getvalue(), ".npz of pickles": npz.getvalue()}


@pytest.mark.parametrize("field", ["imu", "fmri", "point", "audio", "image", "video"])
def test_pickles_are_refused_and_never_run(client, tmp_path, field):
    marker = tmp_path / "pickle-ran"
    for name, payload in pickled_payloads(str(marker)).items():
        response = client.post("/v1/chat", files=[(field, ("x.npy", payload))], data={"prompt": "hi"})
        assert response.status_code in (415, 422), (name, response.text)
        assert response.json()["error"]["param"] == field
    assert not marker.exists()


@pytest.mark.parametrize("field", ["video", "audio"])
def test_playlists_naming_local_files_are_not_followed(client, tmp_path, field):
    target = tmp_path / "clip.mp4"
    target.write_bytes(files.video_bytes(files.level_frames([50, 100, 150])))
    # a NUL byte defeats text sniffing, so FFmpeg gets to probe these itself
    playlists = [f"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:1,\nfile://{target}\n#EXT-X-ENDLIST\n\0".encode(),
                 f"ffconcat version 1.0\nfile {target}\n\0".encode()]
    for playlist in playlists:
        response = client.post("/v1/chat", files=[(field, ("x.m3u8", playlist))], data={"prompt": "hi"})
        assert response.status_code in (415, 422), response.text


def test_a_mesh_naming_a_material_file_does_not_read_it(tmp_path):
    from server.media.decoders.points import point_tensor

    material = tmp_path / "red.mtl"
    material.write_text("newmtl red\nKd 1 0 0\n")
    obj = f"mtllib {material}\nusemtl red\nv 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 3\n".encode()
    points = point_tensor(obj)
    assert points[:, 3:].abs().max() == 0  # red had the material file been read


def _tmp_fds(server) -> list[str]:
    return [link for link in server.open_fds() if link.startswith(str(server.tmpdir))]


def _tree(folder) -> set[str]:
    return {str(path) for path in folder.rglob("*")}


def _abandoned_upload(port: int, size: int) -> None:
    """A multipart upload that stops half way and hangs up."""
    boundary = b"abandoned"
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"POST /v1/chat HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + ENV_KEYS[0].encode() + b"\r\n"
                     b"Content-Type: multipart/form-data; boundary=" + boundary + b"\r\n"
                     b"Content-Length: " + str(size).encode() + b"\r\n\r\n--" + boundary +
                     b"\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n\r\n")
        sock.sendall(b"\x00" * (size // 2))


def test_no_temp_file_or_descriptor_outlives_a_burst_of_big_uploads(hardened, client):
    big = files.image_bytes(Image.fromarray(np.random.default_rng(1).integers(0, 256, (1000, 700, 3), np.uint8)), "PNG")
    assert 1 << 20 < len(big) < LIMITS["max_file_bytes"]  # spooled to disk, then served
    before = _tree(hardened.tmpdir)  # what the server made at start-up (torch's compile cache folder)
    garbage = os.urandom(2_000_000)  # spooled to disk, then refused by the decoder
    too_big = os.urandom(LIMITS["max_file_bytes"] + 1000)  # refused while it uploads

    def send(kind: int) -> int:
        if kind == 3:
            _abandoned_upload(hardened.port, 3_000_000)
            return 0
        data = [big, garbage, too_big][kind]
        return client.post("/v1/chat", files=[("image", ("a.png", data))],
                           data={"prompt": "hi", "max_tokens": "2", "stream": "false"}).status_code

    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(send, [i % 4 for i in range(16)]))
    assert sorted(set(statuses)) == [0, 200, 413, 415], statuses
    deadline = time.monotonic() + 10  # the server notices the hang-ups a moment after they happen
    while _tmp_fds(hardened) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _tmp_fds(hardened) == []
    assert _tree(hardened.tmpdir) == before
