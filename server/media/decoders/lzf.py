"""LZF decompression (liblzf's format, which PCL's binary_compressed PCD files use).

The stream is a sequence of runs, each opened by a control byte c:
- c < 32: a literal run, the next c + 1 bytes copied as they are;
- else a back-reference: length L = c >> 5 (when L is 7, the next byte is added to it), then one
  byte b; the L + 2 bytes starting ((c & 31) << 8) + b + 1 bytes back in the output are copied,
  one at a time in effect, so a reference may overlap what it writes (a repeated pattern).
"""

import threading

from server.media.decoders.costs import check_cancelled

_RUNS_BETWEEN_CHECKS = 1 << 16  # control bytes read between looks at the cancellation


def lzf_decompress(data: bytes, size: int, cancel: threading.Event | None = None) -> bytes:
    """The `size` bytes `data` decompresses to; ValueError when it is damaged or decompresses to
    any other size (decompressing stops there: a forged stream cannot make more)."""
    out = bytearray()
    position, runs = 0, 0
    while position < len(data):
        runs += 1
        if runs % _RUNS_BETWEEN_CHECKS == 0:
            check_cancelled(cancel)
        control = data[position]
        position += 1
        if control < 32:
            literal = data[position:position + control + 1]
            if len(literal) != control + 1:
                raise ValueError("LZF data ends inside a literal run")
            out += literal
            position += control + 1
        else:
            position = _copy_reference(data, position, control, out)
        if len(out) > size:
            raise ValueError(f"LZF data decompresses to more than the {size} bytes declared")
    if len(out) != size:
        raise ValueError(f"LZF data decompresses to {len(out)} bytes, {size} were declared")
    return bytes(out)


def _copy_reference(data: bytes, position: int, control: int, out: bytearray) -> int:
    """Append a back-reference's bytes to `out`; the position after its control bytes."""
    length = control >> 5
    if length == 7:
        if position >= len(data):
            raise ValueError("LZF data ends inside a back-reference")
        length += data[position]
        position += 1
    if position >= len(data):
        raise ValueError("LZF data ends inside a back-reference")
    start = len(out) - ((control & 31) << 8) - data[position] - 1
    position += 1
    if start < 0:
        raise ValueError("LZF back-reference points before the start of the data")
    length += 2
    distance = len(out) - start
    if distance >= length:
        out += out[start:start + length]
    else:  # overlapping: the pattern of `distance` bytes repeats
        pattern = out[start:]
        out += (pattern * (length // distance + 1))[:length]
    return position
