"""Point clouds in PCL's PCD format (versions 0.5 to 0.7): DATA ascii, binary and binary_compressed.

The header is text lines (FIELDS, SIZE, TYPE, COUNT, WIDTH, HEIGHT, POINTS, DATA); the points
follow. `binary` stores one record per point (its fields packed in header order); `binary_compressed`
stores a uint32 compressed size, a uint32 size once decompressed, then LZF-compressed data laid out
field by field (every point's x, then every point's y, ...). Colour is the field `rgb` or `rgba`: a
float32 (or uint32) whose bits are 0xAARRGGBB. Points with a non-finite coordinate, which PCL
writes for the pixels of an organised cloud that saw nothing, are dropped.
"""

import io
import threading

import numpy as np

from server.errors import InputError
from server.media.decoders.costs import check_cancelled, check_decode_memory
from server.media.decoders.lzf import lzf_decompress

_TYPES = {("F", 4): "<f4", ("F", 8): "<f8", ("I", 1): "<i1", ("I", 2): "<i2", ("I", 4): "<i4", ("I", 8): "<i8",
          ("U", 1): "<u1", ("U", 2): "<u2", ("U", 4): "<u4", ("U", 8): "<u8"}
_MAX_HEADER_BYTES = 4096
_COLOURS = ("rgb", "rgba")


class PcdError(ValueError):
    """What is wrong with a PCD file, in words for the client."""


def pcd_points(data: bytes, param: str, max_points: int, max_decode_mb: float,
               cancel: threading.Event | None = None) -> np.ndarray:
    """[N,3] xyz, or [N,6] xyz + rgb in 0-1 when the cloud has a colour field."""
    header, body = _header(data)
    dtype = _record_dtype(header)
    count = _point_count(header)
    if count > max_points:
        raise InputError(413, f"field '{param}' PCD file has {count} points, more than the limit of "
                              f"{max_points} (max_points)", param)
    # the records, ASCII values as float64 (twice float32 records), the xyz + rgb result and its copy
    check_decode_memory(count * (3 * dtype.itemsize + 96), max_decode_mb, param, f"a PCD cloud of {count} points")
    encoding = header["DATA"][0].lower()
    if encoding == "ascii":
        records = _ascii_records(body, dtype, count)
    elif encoding == "binary":
        records = _binary_records(body, dtype, count)
    elif encoding == "binary_compressed":
        records = _compressed_records(body, dtype, count, cancel)
    else:
        raise PcdError(f"its DATA is '{header['DATA'][0]}', not ascii, binary or binary_compressed")
    return _points(records)


def _header(data: bytes) -> tuple[dict[str, list[str]], bytes]:
    header: dict[str, list[str]] = {}
    start = 0
    while "DATA" not in header:
        end = data.find(b"\n", start, start + _MAX_HEADER_BYTES)
        if end < 0:
            raise PcdError("its header ends before a DATA line")
        words = data[start:end].decode("ascii", errors="replace").split()
        start = end + 1
        if words and not words[0].startswith("#"):
            header[words[0].upper()] = words[1:]
    missing = [key for key in ("FIELDS", "SIZE", "TYPE", "DATA") if not header.get(key)]
    if missing:
        raise PcdError(f"its header has no {', '.join(missing)} line")
    return header, data[start:]


def _record_dtype(header: dict[str, list[str]]) -> np.dtype:
    fields, sizes, types = header["FIELDS"], header["SIZE"], header["TYPE"]
    counts = header.get("COUNT") or ["1"] * len(fields)
    if not len(fields) == len(sizes) == len(types) == len(counts):
        raise PcdError("its FIELDS, SIZE, TYPE and COUNT lines have different lengths")
    columns = []
    for position, (name, size, kind, count) in enumerate(zip(fields, sizes, types, counts)):
        code = _TYPES.get((kind.upper(), _whole(size, "SIZE")))
        if code is None:
            raise PcdError(f"its field '{name}' has TYPE {kind} and SIZE {size}, which PCD does not define")
        repeat = _whole(count, "COUNT")
        # a field name may repeat (PCL writes '_' for padding): make each column's name unique
        columns.append((f"{position}:{name.lower()}", code, (repeat,) if repeat > 1 else ()))
    dtype = np.dtype(columns)
    names = {name.split(":", 1)[1] for name in dtype.names}
    if not {"x", "y", "z"} <= names:
        raise PcdError(f"its FIELDS are {' '.join(fields)}: no x, y and z")
    return dtype


def _whole(value: str, key: str) -> int:
    if not value.isdigit() or int(value) == 0:
        raise PcdError(f"its {key} line holds '{value}', not a positive whole number")
    return int(value)


def _point_count(header: dict[str, list[str]]) -> int:
    if header.get("POINTS"):
        return _whole(header["POINTS"][0], "POINTS") if header["POINTS"][0] != "0" else 0
    if header.get("WIDTH") and header.get("HEIGHT"):
        return _whole(header["WIDTH"][0], "WIDTH") * _whole(header["HEIGHT"][0], "HEIGHT")
    raise PcdError("its header has neither POINTS nor WIDTH and HEIGHT")


def _ascii_records(body: bytes, dtype: np.dtype, count: int) -> np.ndarray:
    width = sum(int(np.prod(dtype[name].shape or (1,))) for name in dtype.names)
    try:
        values = np.loadtxt(io.BytesIO(body), dtype=np.float64, ndmin=2, max_rows=count, comments=None)
    except ValueError as error:
        raise PcdError(f"its points are not rows of {width} numbers ({error})") from None
    if values.shape != (count, width):
        raise PcdError(f"it declares {count} points of {width} values and holds {values.shape[0]} rows of "
                       f"{values.shape[1]}")
    return _columns(dtype, values)


def _columns(dtype: np.dtype, values: np.ndarray) -> np.ndarray:
    """ASCII values [count, width] into records of `dtype`."""
    records = np.zeros(len(values), dtype)
    column = 0
    for name in dtype.names:
        width = int(np.prod(dtype[name].shape or (1,)))
        field = values[:, column:column + width].reshape(records[name].shape)
        if name.split(":", 1)[1] in _COLOURS and dtype[name].kind == "f":
            field = _colour_bits(field).view(dtype[name].base)
        records[name] = field.astype(dtype[name].base)
        column += width
    return records


def _colour_bits(values: np.ndarray) -> np.ndarray:
    """A packed colour of TYPE F in ASCII: PCL writes its 32 bits as a whole number, other writers
    the float those bits are (below 1e-37 unless alpha is set)."""
    whole = values >= 1
    from_float = np.where(whole, 0, values).astype(np.float32).view(np.uint32)
    return np.where(whole, np.clip(values, 0, 0xFFFFFFFF), 0).astype(np.uint32) | from_float


def _binary_records(body: bytes, dtype: np.dtype, count: int) -> np.ndarray:
    if len(body) < count * dtype.itemsize:
        raise PcdError(f"it declares {count} points of {dtype.itemsize} bytes and holds {len(body)} bytes of data")
    return np.frombuffer(body, dtype, count=count)


def _compressed_records(body: bytes, dtype: np.dtype, count: int, cancel: threading.Event | None) -> np.ndarray:
    if len(body) < 8:
        raise PcdError("its compressed data has no sizes")
    compressed, size = int.from_bytes(body[:4], "little"), int.from_bytes(body[4:8], "little")
    if size != count * dtype.itemsize:
        raise PcdError(f"its compressed data would hold {size} bytes, {count} points need {count * dtype.itemsize}")
    if compressed > len(body) - 8:
        raise PcdError(f"its compressed data is {len(body) - 8} bytes long, its header says {compressed}")
    check_cancelled(cancel)
    raw = lzf_decompress(body[8:8 + compressed], size, cancel)
    records = np.zeros(count, dtype)
    offset = 0
    for name in dtype.names:  # field after field: every point's value of one field together
        nbytes = count * dtype[name].itemsize
        records[name] = np.frombuffer(raw, dtype[name].base, offset=offset,
                                      count=nbytes // dtype[name].base.itemsize).reshape(records[name].shape)
        offset += nbytes
    return records


def _points(records: np.ndarray) -> np.ndarray:
    by_name = {name.split(":", 1)[1]: name for name in reversed(records.dtype.names)}  # the first wins
    xyz = np.stack([records[by_name[axis]].astype(np.float64).reshape(len(records)) for axis in "xyz"], axis=1)
    colour = next((by_name[name] for name in _COLOURS if name in by_name), None)
    finite = np.isfinite(xyz).all(axis=1)
    if colour is None:
        return xyz[finite]
    packed = np.ascontiguousarray(records[colour]).reshape(len(records))
    bits = packed.view(np.uint32) if packed.dtype.itemsize == 4 else packed.astype(np.uint32)
    rgb = np.stack([(bits >> 16) & 0xFF, (bits >> 8) & 0xFF, bits & 0xFF], axis=1) / 255.0
    return np.concatenate([xyz, rgb], axis=1)[finite]
