"""IMU CSVs as motion-logging apps export them (server/media/decoders/imu_columns.py): named columns in
any order among other sensors' columns, and the rate read off a timestamp column, each checked
against the tensor of the same samples sent as a [6, T] .npy with their rate."""

import numpy as np
import pytest
import torch

import media
from inputs_files import csv_bytes, npy_bytes
from server.errors import InputError
from server.media.decoders.arrays import imu_tensor

RATE = 100.0
NAMES = ["accel_x", "accel_y", "accel_z", "gyro_x", "gyro_y", "gyro_z"]


def error_of(call, *args, **kwargs) -> InputError:
    with pytest.raises(InputError) as caught:
        call(*args, **kwargs)
    return caught.value


def samples(seed: int = 0) -> np.ndarray:
    return media.imu_array(seed, seconds=3.0, rate=RATE)  # [T, 6]


def table(series: np.ndarray, names: list[str], times: np.ndarray | None = None, time_name: str = "timestamp",
          extra: dict[str, np.ndarray] | None = None, order: list[int] | None = None) -> bytes:
    """A CSV with a header row: the timestamp first, the six channels in `order`, other columns after."""
    columns = ([(time_name, times)] if times is not None else [])
    columns += [(names[c], series[:, c]) for c in (order or range(6))]
    columns += list((extra or {}).items())
    return csv_bytes(np.stack([values for _, values in columns], axis=1), header=",".join(n for n, _ in columns))


def reference(series: np.ndarray, rate: float = RATE) -> torch.Tensor:
    return imu_tensor(npy_bytes(series.T), sample_rate=rate)


@pytest.mark.parametrize("scale, start", [(1.0, 0.0), (1e3, 0.0), (1e6, 0.0), (1e9, 1.7e18), (1e3, 1.7e12)],
                         ids=["seconds", "milliseconds", "microseconds", "epoch-nanoseconds", "epoch-milliseconds"])
def test_timestamped_csv_at_100_hz_equals_the_npy_read_at_100_hz(scale, start):
    series = samples()
    times = start + np.arange(len(series)) * scale / RATE
    expected = reference(series)
    assert torch.equal(imu_tensor(table(series, NAMES, times)), expected)
    # and the rate is what made it so: read at the default 200 Hz it is another input
    assert not torch.equal(imu_tensor(npy_bytes(series.T)), expected)


@pytest.mark.parametrize("names", [
    ["ax", "ay", "az", "gx", "gy", "gz"],
    ["acc_x", "acc_y", "acc_z", "wx", "wy", "wz"],
    ["accelerometer_x", "accelerometer_y", "accelerometer_z", "gyroscope_x", "gyroscope_y", "gyroscope_z"],
    ["Acceleration x (m/s^2)", "Acceleration y (m/s^2)", "Acceleration z (m/s^2)",
     "Gyroscope x (rad/s)", "Gyroscope y (rad/s)", "Gyroscope z (rad/s)"],
    ["ACC.X", "ACC.Y", "ACC.Z", "GYR.X", "GYR.Y", "GYR.Z"],
])
def test_usual_names_in_any_order_among_other_columns(names):
    series = samples(1)
    times = np.arange(len(series)) * 10.0  # ms
    noise = np.random.default_rng(2).normal(size=len(series))
    data = table(series, names, times, extra={"mag_x": noise, "linear_acc_x": noise, "battery": noise},
                 order=[4, 0, 5, 2, 1, 3])
    assert torch.equal(imu_tensor(data), reference(series))


def test_the_request_rate_wins_over_the_timestamps():
    series = samples(3)
    data = table(series, NAMES, np.arange(len(series)) * 10.0)
    assert torch.equal(imu_tensor(data, sample_rate=50), reference(series, 50))


def test_named_columns_without_timestamps_are_read_at_200_hz():
    series = samples(4)
    assert torch.equal(imu_tensor(table(series, NAMES)), reference(series, 200.0))


def test_jittered_timestamps_give_their_mean_rate():
    series = samples(5)
    jitter = np.random.default_rng(6).uniform(-2.0, 2.0, len(series))  # ms, on a 10 ms step
    times = np.arange(len(series)) * 10.0 + jitter
    rate = float(f"{(len(series) - 1) / ((times[-1] - times[0]) / 1000):.6g}")
    assert torch.equal(imu_tensor(table(series, NAMES, times)), reference(series, rate))


def test_irregular_or_unordered_timestamps_are_refused_naming_the_row():
    series = samples(7)
    times = np.arange(len(series)) * 10.0
    gap = times.copy()
    gap[50:] += 10.0  # one sample lost: a 20 ms step after row 50
    error = error_of(imu_tensor, table(series, NAMES, gap))
    assert error.status == 422 and "irregular" in error.message and "data row 51" in error.message
    backwards = times.copy()
    backwards[[20, 21]] = backwards[[21, 20]]
    error = error_of(imu_tensor, table(series, NAMES, backwards))
    assert error.status == 422 and "do not increase at data row 22" in error.message
    # a rate given with the request: the timestamps are not read
    assert imu_tensor(table(series, NAMES, gap), sample_rate=RATE).shape == (6, 400)


def test_a_header_naming_some_channels_but_not_others_is_refused_naming_them():
    series = samples(8)
    names = ["ax", "ay", "az", "temperature", "pressure", "humidity"]
    error = error_of(imu_tensor, table(series, names, np.arange(len(series)) * 10.0))
    assert error.status == 422
    assert "gyroscope x, gyroscope y, gyroscope z" in error.message and "temperature" in error.message
    twice = ["ax", "ay", "az", "gx", "gy", "acc_x"]
    assert "accelerometer x axis twice" in error_of(imu_tensor, table(series, twice)).message


def test_an_unnamed_seven_column_table_says_what_is_accepted():
    error = error_of(imu_tensor, csv_bytes(np.zeros((50, 7))))
    assert error.status == 422 and "header names its columns" in error.message
