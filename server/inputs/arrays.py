"""Numeric arrays people upload (.npy or CSV) → fMRI and IMU tensors (ONELLM.md §4)."""

import io
import math
import tokenize

import numpy as np
import torch

from server.errors import InputError
from server.inputs.resample import resample
from server.inputs.sniff import check_kind, undecodable

FMRI_VOXELS = 15724
IMU_RATE = 200.0
IMU_SAMPLES = 400  # 2 s at 200 Hz
IMU_CHANNELS = 6
MAX_FMRI_REPEATS = 256
MAX_IMU_SAMPLES = 1_000_000

_EXPECTED = "a .npy or CSV array"
_DELIMITERS = (",", ";", "\t")


def load_array(data: bytes, param: str) -> np.ndarray:
    """A finite float64 array from a .npy file (no pickles, numeric dtypes only) or CSV
    text (comma/semicolon/tab/space separated, optional header row, '#' comments).

    A CSV with a single column is returned 1-D."""
    kind = check_kind(data, param, {"array", "text"}, _EXPECTED)
    array = _load_npy(data, param) if kind is not None and kind.family == "array" \
        else _load_csv(data, param, kind)
    if not np.isfinite(array).all():
        raise InputError(422, f"field '{param}' contains NaN or infinite values", param)
    return array


def fmri_tensor(data: bytes, param: str = "fmri", *,
                max_repeats: int = MAX_FMRI_REPEATS) -> torch.Tensor:
    """[1,15724]: the voxel vector, averaged over repeats when given as [R,15724]."""
    array = load_array(data, param)
    if array.ndim == 1:
        array = array[None]
    if array.ndim != 2 or array.shape[1] != FMRI_VOXELS or array.shape[0] == 0:
        raise InputError(422, f"field '{param}' has shape {list(array.shape)}, expected "
                              f"[{FMRI_VOXELS}] or [R,{FMRI_VOXELS}] with R ≥ 1", param)
    if array.shape[0] > max_repeats:
        raise InputError(413, f"field '{param}' has {array.shape[0]} repeats, more than the limit "
                              f"of {max_repeats}", param)
    return _tensor(array.mean(axis=0, keepdims=True))


def imu_tensor(data: bytes, sample_rate: float = IMU_RATE, param: str = "imu", *,
               max_samples: int = MAX_IMU_SAMPLES) -> torch.Tensor:
    """[6,400]: accelerometer xyz + gyroscope xyz resampled to 200 Hz as the authors did
    (server/inputs/resample.py), the first 2 s, zero-padded at the end when shorter.

    Accepts [T,6] or [6,T]; a [6,6] array is read as [T,6] (one row per time step, as
    CSV files are written)."""
    try:
        rate = float(sample_rate)
    except (TypeError, ValueError):
        rate = math.nan
    if not (math.isfinite(rate) and rate > 0):
        raise InputError(422, f"IMU sample rate must be a positive number of Hz, got {sample_rate!r}",
                         param)
    array = load_array(data, param)
    if array.ndim == 2 and array.shape[1] == IMU_CHANNELS:
        series = array.T
    elif array.ndim == 2 and array.shape[0] == IMU_CHANNELS:
        series = array
    else:
        raise InputError(422, f"field '{param}' has shape {list(array.shape)}, expected "
                              f"[T,{IMU_CHANNELS}] or [{IMU_CHANNELS},T]", param)
    if series.shape[1] == 0:
        raise InputError(422, f"field '{param}' has no samples", param)
    if series.shape[1] > max_samples:
        raise InputError(413, f"field '{param}' has {series.shape[1]} samples, more than the limit "
                              f"of {max_samples}", param)
    series = resample(series, rate, IMU_RATE, IMU_SAMPLES)
    out = np.zeros((IMU_CHANNELS, IMU_SAMPLES))
    out[:, : series.shape[1]] = series
    return _tensor(out)


def _tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


def _load_npy(data: bytes, param: str) -> np.ndarray:
    # Read and check the header ourselves first: np.load would allocate whatever shape
    # the header claims before noticing the data is short.
    stream = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(stream)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                       (2, 0): np.lib.format.read_array_header_2_0}.get(version)
        if read_header is None:
            raise ValueError(f".npy format version {version} is not supported")
        shape, _, dtype = read_header(stream, max_header_size=10_000)
    # a damaged header's dict literal can also fail NumPy's tokenizer or parser
    except (ValueError, SyntaxError, tokenize.TokenError) as error:
        raise InputError(422, f"field '{param}' holds a .npy file with a bad header ({error})",
                         param) from error
    if dtype.hasobject or dtype.fields is not None or dtype.kind not in "biuf":
        raise InputError(422, f"field '{param}' holds a .npy array of dtype {dtype}; only "
                              "numeric (bool, integer, float) arrays are accepted", param)
    expected = math.prod(shape) * dtype.itemsize
    available = len(data) - stream.tell()
    if available < expected:
        raise InputError(422, f"field '{param}' holds a truncated .npy file (shape {list(shape)} "
                              f"needs {expected} bytes of data, got {available})", param)
    try:
        return np.load(io.BytesIO(data), allow_pickle=False).astype(np.float64)
    except ValueError as error:
        raise InputError(422, f"field '{param}' holds a .npy file that could not be read ({error})",
                         param) from error


def _load_csv(data: bytes, param: str, kind) -> np.ndarray:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise undecodable(param, kind, _EXPECTED, error) from error
    lines = [line.strip() for line in text.splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    if not lines:
        raise InputError(422, f"field '{param}' holds text with no numbers, expected {_EXPECTED}",
                         param)
    delimiter = next((d for d in _DELIMITERS if d in lines[0]), None)
    rows = [line.split(delimiter) for line in lines]
    if not _is_numeric_row(rows[0]):
        rows = rows[1:]  # a header row
    width = len(rows[0]) if rows else 0
    for number, row in enumerate(rows):
        if len(row) != width:
            raise InputError(422, f"field '{param}' CSV row {number + 1} has {len(row)} values, "
                                  f"the first has {width}", param)
        if not _is_numeric_row(row):
            raise InputError(422, f"field '{param}' CSV row {number + 1} is not all numbers", param)
    array = np.array(rows, dtype=np.float64).reshape(len(rows), width)
    return array[:, 0] if width == 1 else array


def _is_numeric_row(row: list[str]) -> bool:
    try:
        for value in row:
            float(value)
    except ValueError:
        return False
    return True
