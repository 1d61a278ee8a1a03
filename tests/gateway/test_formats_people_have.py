"""Files as phones, depth cameras, scanners and motion loggers write them, answered end to end by the
session's real gateway: each gives the same greedy answer as the same data in a format that was
read before (the decoders' tests check the tensors are equal; here the whole path is)."""

import base64

import numpy as np
import pytest
import trimesh

import media
from gateway_helpers import assert_error
from inputs_files import csv_bytes, npy_bytes, pcd_bytes

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
