"""IMU tables as motion-logging apps export them: a header row naming the columns (a timestamp,
accelerometer and gyroscope axes under their usual spellings, in any order, among other sensors'
columns), and the sample rate read off the timestamps.

Names are compared lower-cased, with a unit in brackets and every character but letters and
digits dropped: "Acceleration x (m/s^2)", "accel_x", "acc.X" and "ax" all become an accelerometer
x axis. Columns named for derived quantities ("linear_acc_x", "gravity_x", "user_acc_x") are not
the raw accelerometer the model saw and are not taken for it.
"""

import re

import numpy as np

from server.errors import InputError

CHANNELS = ("accelerometer x", "accelerometer y", "accelerometer z",
            "gyroscope x", "gyroscope y", "gyroscope z")
_ACCEL = re.compile(r"^(a|acc|accel|accl|accelerometer|acceleration)([xyz])$")
_GYRO = re.compile(r"^(g|w|gyr|gyro|gyroscope|angularvelocity|rotationrate|omega)([xyz])$")
_TIME = re.compile(r"^(t|ts|time|times|timestamp|timestamps|secondselapsed|elapsed|elapsedtime)"
                   r"(s|sec|secs|ms|us|ns)?$")
# Timestamp units tried, each with the rates it is taken for: the unit that puts the rate between
# 10^0.5 and 10^3.5 Hz wins. Every IMU we know of logs within that span (phones 5-500 Hz, the
# authors' Ego4D IMU 200 Hz); the spans of the units do not overlap, so one unit always fits.
_UNITS = ((1.0, "s"), (1e-3, "ms"), (1e-6, "µs"), (1e-9, "ns"))
_LOWEST_RATE, _HIGHEST_RATE = 10 ** 0.5, 10 ** 3.5
MAX_RATE = 10_000.0  # what a request's imu_sample_rate may say
IRREGULARITY = 0.5  # a step may differ from the median step by this fraction of it


class Columns:
    """Where the six channels (accelerometer xyz, gyroscope xyz) and the timestamps are."""

    def __init__(self, channels: list[int], time: int | None):
        self.channels, self.time = channels, time


def normalised(name: str) -> str:
    name = re.sub(r"[\(\[\{].*?[\)\]\}]", "", name.strip().strip("\"'").lower())
    return re.sub(r"[^a-z0-9]", "", name)


def imu_columns(names: list[str], param: str) -> Columns | None:
    """The columns of a header row, or None when it names none of the channels (the table is then
    read by position). 422 naming what is missing when some channels are named and others not."""
    found: dict[int, int] = {}
    time = None
    for column, name in enumerate(names):
        key = normalised(name)
        channel = _channel(key)
        if channel is not None:
            if channel in found:
                raise InputError(422, f"field '{param}' CSV header names the {CHANNELS[channel]} axis twice "
                                      f"(columns {found[channel] + 1} and {column + 1})", param)
            found[channel] = column
        elif time is None and _TIME.match(key):
            time = column
    if not found:
        return None
    missing = [CHANNELS[c] for c in range(len(CHANNELS)) if c not in found]
    if missing:
        raise InputError(422, f"field '{param}' CSV header has no column for {', '.join(missing)} (it names "
                              f"{', '.join(names)}; expected names like accel_x or ax, gyro_x or gx)", param)
    return Columns([found[c] for c in range(len(CHANNELS))], time)


def _channel(key: str) -> int | None:
    for offset, pattern in ((0, _ACCEL), (3, _GYRO)):
        match = pattern.match(key)
        if match:
            return offset + "xyz".index(match.group(2))
    return None


def rate_from_timestamps(times: np.ndarray, param: str) -> float:
    """Samples a second from a timestamp column in s, ms, µs or ns (decided from the median step);
    the mean rate over the series, to 6 significant figures. 422 when the timestamps do not
    increase, or when a step differs from the median step by more than IRREGULARITY of it."""
    if len(times) < 2:
        raise InputError(422, f"field '{param}' has a single timestamped sample: no rate can be read off "
                              "its timestamps (give imu_sample_rate)", param)
    steps = np.diff(times)
    if not (steps > 0).all():
        row = int(np.argmax(steps <= 0)) + 2
        raise InputError(422, f"field '{param}' timestamps do not increase at data row {row}", param)
    median = float(np.median(steps))
    off = np.abs(steps - median) > IRREGULARITY * median
    unit, name = _unit(median)
    if off.any():
        row = int(np.argmax(off)) + 2
        raise InputError(422, f"field '{param}' timestamps are irregular: the step to data row {row} is "
                              f"{steps[row - 2]:.6g} {name}, the median step {median:.6g} {name} (more than "
                              f"{IRREGULARITY:.0%} apart); resample the series to a fixed rate and give "
                              "imu_sample_rate", param)
    rate = float(f"{(len(times) - 1) / (float(times[-1] - times[0]) * unit):.6g}")
    if not 0 < rate <= MAX_RATE:
        raise InputError(422, f"field '{param}' timestamps give {rate:g} samples a second, outside "
                              f"(0, {MAX_RATE:g}] Hz", param)
    return rate


def _unit(step: float) -> tuple[float, str]:
    for unit, name in _UNITS:
        if _LOWEST_RATE <= 1 / (step * unit) < _HIGHEST_RATE:
            return unit, name
    return _UNITS[0] if step < 1 else _UNITS[-1]  # faster than any unit allows in seconds, slower in ns
