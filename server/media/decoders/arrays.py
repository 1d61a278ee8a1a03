"""Numeric arrays people upload (.npy or CSV) → fMRI and IMU tensors (ONELLM.md §4)."""

import io
import itertools
import math
import threading
import tokenize
from collections.abc import Iterator

import numpy as np
import torch

from server.errors import InputError
from server.media.decoders.imu_columns import imu_columns, rate_from_timestamps
from server.media.decoders.costs import MAX_DECODE_MB, check_cancelled, check_decode_memory
from server.media.decoders.resample import resample
from server.media.sniff import check_kind, undecodable

FMRI_VOXELS = 15724
IMU_RATE = 200.0
IMU_SAMPLES = 400  # 2 s at 200 Hz
IMU_CHANNELS = 6
MAX_FMRI_REPEATS = 256
MAX_IMU_SAMPLES = 1_000_000

_EXPECTED = "a .npy or CSV array"
_DELIMITERS = (",", ";", "\t")
_HEADER_BYTES = 65_536  # a header row is looked for in the first this many bytes
_CSV_BLOCK_ROWS = 65_536  # rows parsed at once into the preallocated result


def load_array(data: bytes, param: str, *, max_values: int | None = None, limit: str = "",
               max_decode_mb: float = MAX_DECODE_MB, cancel: threading.Event | None = None,
               finite: bool = True) -> np.ndarray:
    """A finite float64 array from a .npy file (no pickles, numeric dtypes only) or CSV
    text (comma/semicolon/tab/space separated, optional header row, '#' comments).

    Its size is known before it is parsed (the .npy header's shape; the CSV's data rows × the
    first row's columns) and refused past `max_values` (413 naming `limit`, the setting) or past
    max_decode_mb at 8 bytes a value. A CSV with a single column is returned 1-D. NaN and
    infinities are refused (422) unless `finite` is False."""
    kind = check_kind(data, param, {"array", "text"}, _EXPECTED)
    size = _Size(param, max_values, limit, max_decode_mb, len(data) if kind is None or kind.family != "array" else 0)
    array = _load_npy(data, param, size) if kind is not None and kind.family == "array" \
        else _load_csv(data, param, kind, size, cancel)
    if finite and not np.isfinite(array).all():
        raise InputError(422, f"field '{param}' contains NaN or infinite values", param)
    return array


class _Size:
    """The checks on an array's value count, made before it is parsed."""

    def __init__(self, param: str, max_values: int | None, limit: str, max_decode_mb: float, text_bytes: int):
        self.param, self.max_values, self.limit = param, max_values, limit
        self.max_decode_mb, self.text_bytes = max_decode_mb, text_bytes

    def exceeded(self, values: int) -> bool:
        return self.max_values is not None and values > self.max_values

    def check(self, values: int) -> None:
        if self.exceeded(values):
            raise InputError(413, f"field '{self.param}' holds {values} values, more than the limit of "
                                  f"{self.limit}", self.param)
        # float64 values, the CSV's text decoded, and the finiteness mask
        check_decode_memory(values * 9 + self.text_bytes, self.max_decode_mb, self.param,
                            f"an array of {values} values")


def fmri_tensor(data: bytes, param: str = "fmri", *, max_repeats: int = MAX_FMRI_REPEATS,
                max_decode_mb: float = MAX_DECODE_MB, cancel: threading.Event | None = None) -> torch.Tensor:
    """[1,15724]: the voxel vector, averaged over repeats when given as [R,15724]."""
    array = load_array(data, param, max_values=max_repeats * FMRI_VOXELS,
                       limit=f"{max_repeats} × {FMRI_VOXELS} (max_fmri_repeats)",
                       max_decode_mb=max_decode_mb, cancel=cancel)
    if array.ndim == 1:
        array = array[None]
    if array.ndim != 2 or array.shape[1] != FMRI_VOXELS or array.shape[0] == 0:
        raise InputError(422, f"field '{param}' has shape {list(array.shape)}, expected "
                              f"[{FMRI_VOXELS}] or [R,{FMRI_VOXELS}] with R ≥ 1", param)
    if array.shape[0] > max_repeats:
        raise InputError(413, f"field '{param}' has {array.shape[0]} repeats, more than the limit "
                              f"of {max_repeats} (max_fmri_repeats)", param)
    return _tensor(array.mean(axis=0, keepdims=True))


def imu_tensor(data: bytes, sample_rate: float | None = None, param: str = "imu", *,
               max_samples: int = MAX_IMU_SAMPLES, max_decode_mb: float = MAX_DECODE_MB,
               cancel: threading.Event | None = None) -> torch.Tensor:
    """[6,400]: accelerometer xyz + gyroscope xyz resampled to 200 Hz as the authors did
    (server/media/decoders/resample.py), the first 2 s, zero-padded at the end when shorter.

    Accepts [T,6] or [6,T]; a [6,6] array is read as [T,6] (one row per time step, as
    CSV files are written). A CSV whose header names its columns (imu_columns.py) is read by
    name, any other columns ignored. The rate: `sample_rate` when given, else read off the
    CSV's timestamp column, else 200 Hz."""
    rate = _positive_rate(sample_rate, param) if sample_rate is not None else None
    names = csv_header(data)
    array = load_array(data, param, max_values=max(IMU_CHANNELS, len(names or ())) * max_samples,
                       limit=f"{IMU_CHANNELS} × {max_samples} (max_imu_samples)",
                       max_decode_mb=max_decode_mb, cancel=cancel)
    columns = imu_columns(names, param) if names else None
    if columns is not None and array.ndim == 2 and array.shape[1] == len(names):
        series = array[:, columns.channels].T
        if rate is None and columns.time is not None:
            rate = rate_from_timestamps(array[:, columns.time], param)
    else:
        series = _by_position(array, param)
    if series.shape[1] == 0:
        raise InputError(422, f"field '{param}' has no samples", param)
    if series.shape[1] > max_samples:
        raise InputError(413, f"field '{param}' has {series.shape[1]} samples, more than the limit "
                              f"of {max_samples} (max_imu_samples)", param)
    series = resample(series, IMU_RATE if rate is None else rate, IMU_RATE, IMU_SAMPLES)
    out = np.zeros((IMU_CHANNELS, IMU_SAMPLES))
    out[:, : series.shape[1]] = series
    return _tensor(out)


def _positive_rate(sample_rate, param: str) -> float:
    try:
        rate = float(sample_rate)
    except (TypeError, ValueError):
        rate = math.nan
    if not (math.isfinite(rate) and rate > 0):
        raise InputError(422, f"IMU sample rate must be a positive number of Hz, got {sample_rate!r}",
                         param)
    return rate


def _by_position(array: np.ndarray, param: str) -> np.ndarray:
    if array.ndim == 2 and array.shape[1] == IMU_CHANNELS:
        return array.T
    if array.ndim == 2 and array.shape[0] == IMU_CHANNELS:
        return array
    raise InputError(422, f"field '{param}' has shape {list(array.shape)}, expected [T,{IMU_CHANNELS}] or "
                          f"[{IMU_CHANNELS},T], or a CSV whose header names its columns (timestamp, accel_x, "
                          "..., gyro_z)", param)


def _tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


def csv_header(data: bytes) -> list[str] | None:
    """The names in a CSV's header row (its first line that is not blank or a '#' comment, when
    that line is not all numbers), or None: no header, or not text."""
    if data.startswith(b"\x93NUMPY"):
        return None
    first = next(_data_lines(data[:_HEADER_BYTES].decode("utf-8-sig", errors="replace")), None)
    if first is None:
        return None
    row = first.split(next((d for d in _DELIMITERS if d in first), None))
    return None if _is_numeric_row(row) else [name.strip() for name in row]


def _load_npy(data: bytes, param: str, size: _Size) -> np.ndarray:
    # Read and check the header ourselves first: np.load would allocate whatever shape
    # the header claims before noticing the data is short.
    stream = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(stream)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                       (2, 0): np.lib.format.read_array_header_2_0}.get(version)
        if read_header is None:
            raise ValueError(f".npy format version {version} is not supported")
        shape, fortran_order, dtype = read_header(stream, max_header_size=10_000)
    # a damaged header's dict literal can also fail NumPy's tokenizer or parser
    except (ValueError, SyntaxError, tokenize.TokenError) as error:
        raise InputError(422, f"field '{param}' holds a .npy file with a bad header ({error})",
                         param) from error
    if dtype.hasobject or dtype.fields is not None or dtype.kind not in "biuf":
        raise InputError(422, f"field '{param}' holds a .npy array of dtype {dtype}; only "
                              "numeric (bool, integer, float) arrays are accepted", param)
    count = math.prod(shape)
    expected = count * dtype.itemsize
    available = len(data) - stream.tell()
    if available < expected:
        raise InputError(422, f"field '{param}' holds a truncated .npy file (shape {list(shape)} "
                              f"needs {expected} bytes of data, got {available})", param)
    size.check(count)
    # read in place from the upload's bytes: the float64 result is the only copy
    values = np.frombuffer(data, dtype=dtype, count=count, offset=stream.tell())
    return values.reshape(shape, order="F" if fortran_order else "C").astype(np.float64)


def _load_csv(data: bytes, param: str, kind, size: _Size, cancel: threading.Event | None) -> np.ndarray:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise undecodable(param, kind, _EXPECTED, error) from error
    first = next(_data_lines(text), None)
    if first is None:
        raise InputError(422, f"field '{param}' holds text with no numbers, expected {_EXPECTED}",
                         param)
    delimiter = next((d for d in _DELIMITERS if d in first), None)
    header = int(not _is_numeric_row(first.split(delimiter)))
    first_row = next(_data_lines(text, skip=header), "")
    width = len(first_row.split(delimiter)) if first_row else 0
    rows = text.count(_line_end(text)) + 1  # at least the data rows: a bound known at once
    if size.exceeded(rows * width):  # comment lines may have counted: count the rows themselves
        rows = sum(1 for _ in _data_lines(text, skip=header))
    size.check(rows * width)
    array = np.empty((rows, width))
    lines, filled = _data_lines(text, skip=header), 0
    while block := list(itertools.islice(lines, _CSV_BLOCK_ROWS)):
        check_cancelled(cancel)
        array[filled:filled + len(block)] = _parse_rows(block, filled, width, delimiter, param)
        filled += len(block)
    array = array[:filled]
    return array[:, 0] if width == 1 else array


def _line_end(text: str) -> str:
    return "\n" if "\n" in text or "\r" not in text else "\r"  # "\r" alone: classic Mac OS files


def _data_lines(text: str, skip: int = 0) -> Iterator[str]:
    """The CSV's lines that hold something other than a comment, stripped, one at a time (no list
    of all lines, which costs ~60 bytes a line)."""
    end_of_line = _line_end(text)
    start = 0
    while start < len(text):
        end = text.find(end_of_line, start)
        end = len(text) if end < 0 else end
        line = text[start:end].strip()
        start = end + 1
        if line and not line.startswith("#"):
            if skip:
                skip -= 1
                continue
            yield line


def _parse_rows(block: list[str], start: int, width: int, delimiter: str | None, param: str) -> np.ndarray:
    """[len(block), width] float64 by NumPy's C parser; a row it cannot read is found and named."""
    try:
        parsed = np.loadtxt(block, delimiter=delimiter, comments=None, ndmin=2, dtype=np.float64)
    except ValueError as error:
        parsed = error
    if isinstance(parsed, np.ndarray) and parsed.shape == (len(block), width):
        return parsed
    for number, line in enumerate(block, start + 1):
        row = line.split(delimiter)
        if len(row) != width:
            raise InputError(422, f"field '{param}' CSV row {number} has {len(row)} values, "
                                  f"the first has {width}", param)
        if not _is_numeric_row(row):
            raise InputError(422, f"field '{param}' CSV row {number} is not all numbers", param)
    raise InputError(422, f"field '{param}' CSV rows {start + 1} to {start + len(block)} hold a value "
                          f"that is not a number ({parsed})", param)
def _is_numeric_row(row: list[str]) -> bool:
    try:
        for value in row:
            float(value)
    except ValueError:
        return False
    return True
