"""Files as phones, depth cameras, scanners and motion loggers write them, answered end to end by the
session's real gateway: each gives the same greedy answer as the same data in a format that was
read before (the decoders' tests check the tensors are equal; here the whole path is)."""

import base64

import numpy as np
import pytest
import trimesh
from PIL import Image

import media
from gateway_helpers import assert_error
from inputs_files import csv_bytes, image_bytes, npy_bytes, pcd_bytes

PROMPT = "Describe it in detail."


def greedy(client, files: list, **form) -> str:
    response = client.post("/v1/chat", files=files, data={"prompt": PROMPT, "max_tokens": "32", "temperature": "0",
                                                          "stream": "false", **form})
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def upload(field: str, name: str, data: bytes) -> tuple:
    return (field, (name, data, "application/octet-stream"))


def imu_logger_csv(series: np.ndarray, times_ms: np.ndarray) -> bytes:
    """A sensor-logger export: a timestamp in ms, gyroscope before accelerometer, a magnetometer."""
    columns = np.concatenate([times_ms[:, None], series[:, 3:], series[:, :3], series[:, :1] * 0 + 40.0], axis=1)
    return csv_bytes(columns, header="timestamp,gyro_x,gyro_y,gyro_z,accel_x,accel_y,accel_z,mag_x")


def test_timestamped_imu_csv_is_read_at_its_own_rate(client):
    series = media.imu_array(seed=700, rate=100.0)
    logged = imu_logger_csv(series, np.arange(len(series)) * 10.0)
    as_npy = greedy(client, [upload("imu", "imu.npy", npy_bytes(series.T))], imu_sample_rate="100")
    assert greedy(client, [upload("imu", "log.csv", logged)]) == as_npy
    part = {"type": "input_imu", "input_imu": {"data": base64.b64encode(logged).decode()}}
    response = client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": [{"type": "text", "text": PROMPT}, part]}],
        "max_tokens": 32, "temperature": 0})
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == as_npy


def test_irregular_imu_timestamps_are_a_clear_422(client):
    series = media.imu_array(seed=701, rate=100.0)
    times = np.arange(len(series)) * 10.0
    times[100:] += 25.0
    response = client.post("/v1/chat", files=[upload("imu", "log.csv", imu_logger_csv(series, times))],
                           data={"prompt": PROMPT, "max_tokens": "1"})
    error = assert_error(response, 422, "imu")
    assert "irregular" in error["message"] and "imu_sample_rate" in error["message"]


def scan(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(3000, 3)).astype(np.float32), rng.integers(0, 256, (3000, 3), dtype=np.uint8)


@pytest.mark.parametrize("encoding", ["ascii", "binary", "binary_compressed"])
def test_pcd_answers_as_the_same_points_in_ply(client, encoding):
    xyz, rgb8 = scan(710)
    colours = np.concatenate([rgb8, np.full((len(rgb8), 1), 255, np.uint8)], axis=1)
    ply = trimesh.PointCloud(xyz, colors=colours).export(file_type="ply")
    as_ply = greedy(client, [upload("point", "scan.ply", ply)])
    assert greedy(client, [upload("point", "scan.pcd", pcd_bytes(xyz, rgb8, encoding))]) == as_ply


def test_a_damaged_pcd_is_named_as_pcd(client):
    pcd = pcd_bytes(*scan(711), "ascii")
    response = client.post("/v1/chat", files=[upload("point", "scan.pcd", pcd[: len(pcd) // 2])],
                           data={"prompt": PROMPT, "max_tokens": "1"})
    error = assert_error(response, 422, "point")
    assert "point cloud (PCD)" in error["message"] and "CSV" not in error["message"]


def test_depth_in_metres_answers_as_the_16_bit_png_in_millimetres(client):
    photo = media.image("jpg", seed=720)
    mm = (np.linspace(500, 4000, 48)[:, None] + np.random.default_rng(720).normal(0, 30, (48, 64))).astype(np.uint16)
    as_png = greedy(client, [upload("image", "room.jpg", photo),
                             upload("depth", "depth.png", image_bytes(Image.fromarray(mm), "PNG"))])
    metres = npy_bytes((mm / 1000.0).astype(np.float32))
    assert greedy(client, [upload("image", "room.jpg", photo), upload("depth", "depth.npy", metres)]) == as_png
    parts = [{"type": "image_url", "image_url": {"url": "data:image/jpeg;base64," + base64.b64encode(photo).decode()}},
             {"type": "input_depth", "input_depth": {"data": base64.b64encode(metres).decode()}}]
    response = client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": [{"type": "text", "text": PROMPT}, *parts]}],
        "max_tokens": 32, "temperature": 0})
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == as_png


def test_float_normals_answer_as_their_8_bit_rendering(client):
    photo = media.image("jpg", seed=721)
    n = np.random.default_rng(721).normal(0, 0.3, (48, 64, 3)) + np.array([0, 0, 1.0])
    n /= np.linalg.norm(n, axis=2, keepdims=True)
    png = image_bytes(Image.fromarray(((n + 1) / 2 * 255).astype(np.uint8), "RGB"), "PNG")
    as_png = greedy(client, [upload("image", "room.jpg", photo), upload("normal", "normal.png", png)])
    assert greedy(client, [upload("image", "room.jpg", photo), upload("normal", "normal.npy", npy_bytes(n))]) == as_png


def test_a_one_channel_16_bit_normal_map_is_a_clear_422(client):
    depth_like = image_bytes(Image.fromarray(np.full((48, 64), 1000, np.uint16)), "PNG")
    response = client.post("/v1/chat", files=[upload("image", "room.jpg", media.image("jpg", seed=722)),
                                              upload("normal", "normal.png", depth_like)],
                           data={"prompt": PROMPT, "max_tokens": "1"})
    assert "not a normal map" in assert_error(response, 422, "normal")["message"]


def test_each_upload_field_says_what_it_accepts_in_the_openapi_document(client):
    body = client.get("/openapi.json").json()["paths"]["/v1/chat"]["post"]["requestBody"]
    fields = body["content"]["multipart/form-data"]["schema"]["properties"]
    expected = {"image": "AVIF", "video": "HEVC", "audio": "FLAC", "point": "PCD", "depth": ".npz",
                "normal": "[-1, 1]", "fmri": "15724", "imu": "timestamps"}
    for name, word in expected.items():
        assert fields[name]["format"] == "binary" and word in fields[name]["description"], (name, fields[name])
    assert "timestamp" in fields["imu_sample_rate"]["description"]
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    parts = schemas["ChatMessage"]["properties"]["content"]["description"]
    assert all(f"{name}: {field['description']}" in parts for name, field in fields.items() if name in expected)


def test_a_stored_pcd_is_a_point_cloud_by_file_id_and_as_a_file_part(client):
    pcd = pcd_bytes(*scan(712), "binary_compressed")
    stored = client.post("/v1/files", files={"file": ("scan.pcd", pcd)}, data={"purpose": "user_data"})
    assert stored.status_code == 200, stored.text
    file_id = stored.json()["id"]
    inline = greedy(client, [upload("point", "scan.pcd", pcd)])
    assert greedy(client, [], point_file_id=file_id) == inline
    response = client.post("/v1/chat/completions", json={"max_tokens": 32, "temperature": 0, "messages": [
        {"role": "user", "content": [{"type": "text", "text": PROMPT}, {"type": "file", "file": {"file_id": file_id}}]}]})
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == inline
