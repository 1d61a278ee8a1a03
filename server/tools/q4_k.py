"""llama.cpp's Q4_K blocks from float weights, which the `gguf` package reads but does not write.

A row is cut into super-blocks of 256 weights, each into 8 sub-blocks of 32. A weight is
`d * scale[j] * q - dmin * min[j]`: q has 4 bits, the sub-block's scale and min 6 bits each, and the
super-block's d and dmin are float16. One block is 144 bytes, 4.5 bits a weight as in Q4_0, whose
float16 scale per 32 weights pays for 6-bit scales and mins here: a sub-block's 16 levels span its
own range instead of one symmetric about zero.

Each sub-block's scale and min are the best of five level spacings around its range, each refit by
least squares to the levels its weights took; llama.cpp's own quantizer searches more spacings, so
its files can be slightly closer to the float weights than these.
"""

import numpy as np

SUPER = 256  # weights per block
SUB = 32  # weights per sub-block: 8 a block
BLOCK_BYTES = 2 + 2 + 12 + SUPER // 2
# levels spaced range / (15 + widen): wider than the range (widen < 0) or clipping its ends (> 0)
RANGE_TRIES = (-1.0, -0.5, 0.0, 0.5, 1.0)


def quantize(rows: np.ndarray) -> np.ndarray:
    """uint8 [..., cols // 256 * 144] of float rows [..., cols], cols a multiple of 256."""
    *lead, cols = rows.shape
    if cols % SUPER:
        raise ValueError(f"Q4_K rows need a multiple of {SUPER} weights, not {cols}")
    x = rows.reshape(-1, SUPER // SUB, SUB).astype(np.float32, copy=True)  # [B, 8, 32], ours to overwrite
    scale, low = sub_block_fit(x)  # [B, 8] each; low <= 0
    d = (scale.max(axis=1) / 63).astype(np.float16)  # [B]
    dmin = (-low.min(axis=1) / 63).astype(np.float16)
    scales6 = six_bits(scale, d)  # [B, 8]
    mins6 = six_bits(-low, dmin)
    step = d.astype(np.float32)[:, None] * scales6  # [B, 8]
    offset = dmin.astype(np.float32)[:, None] * mins6
    x += offset[..., None]
    q = levels(x, np.where(step > 0, step, np.inf), out=x).astype(np.uint8)  # [B, 8, 32]; 0 where no step
    blocks = np.concatenate([d.view(np.uint8).reshape(-1, 2), dmin.view(np.uint8).reshape(-1, 2),
                             pack_scales(scales6, mins6), pack_levels(q)], axis=1)  # [B, 144]
    return blocks.reshape(*lead, cols // SUPER * BLOCK_BYTES)


def sub_block_fit(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per sub-block of x [B, 8, 32]: a step and an offset (<= 0) with x ≈ step * q + offset, the
    best of a few level spacings around the sub-block's range, each refit by least squares."""
    n = x.shape[2]
    low = np.minimum(x.min(axis=2), 0)  # [B, 8]
    span = x.max(axis=2) - low
    sx, sxx = x.sum(axis=2, dtype=np.float64), np.square(x).sum(axis=2, dtype=np.float64)
    shifted = x - low[..., None]
    q = np.empty_like(x)  # one buffer for every try's levels: a fresh array each time costs more than the math
    errors, steps, offsets = [], [], []  # per try, [B, 8] each
    for widen in RANGE_TRIES:
        spacing = span / (15 + widen)
        levels(shifted, np.where(spacing > 0, spacing, 1), out=q)
        # summed in float32 (exact for the levels' sums), combined in float64: the error below is a
        # small difference of large terms
        sq = q.sum(axis=2).astype(np.float64)
        sqq, sqx = (np.einsum("bsi,bsi->bs", q, other).astype(np.float64) for other in (q, x))
        det = n * sqq - sq * sq
        fitted = det > 0  # levels rise with x, so a fitted step is never negative
        step = np.where(fitted, (n * sqx - sq * sx) / np.where(fitted, det, 1), spacing)
        # the format can only subtract a min: the offset stays at or below zero
        offset = np.minimum(np.where(fitted, (sx - step * sq) / n, low), 0)
        # sum of (step q + offset - x)^2, from the sums above
        errors.append(step * step * sqq + 2 * step * offset * sq - 2 * step * sqx
                      + n * offset * offset - 2 * offset * sx + sxx)
        steps.append(step)
        offsets.append(offset)
    best = np.argmin(errors, axis=0)[None]  # [1, B, 8]: the first of equal errors
    return (np.take_along_axis(np.array(steps, np.float32), best, 0)[0],
            np.take_along_axis(np.array(offsets, np.float32), best, 0)[0])


def levels(shifted: np.ndarray, spacing: np.ndarray, out: np.ndarray) -> np.ndarray:
    """out [B, 8, 32] = shifted / spacing [B, 8] rounded to the 16 levels 0..15, in place."""
    np.divide(shifted, spacing[..., None], out=out)
    np.rint(out, out=out)
    return np.clip(out, 0, 15, out=out)


def six_bits(values: np.ndarray, unit: np.ndarray) -> np.ndarray:
    """values [B, 8] >= 0 in whole multiples of unit [B] (float16), 0..63."""
    u = unit.astype(np.float32)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        n = np.where(u > 0, np.rint(values / u), 0)
    return np.clip(n, 0, 63).astype(np.uint8)


def pack_scales(scales: np.ndarray, mins: np.ndarray) -> np.ndarray:
    """The 12 bytes of 8 six-bit scales and mins [B, 8]: sub-blocks 0-3 whole in bytes 0-7, the low
    4 bits of 4-7 in bytes 8-11 and their top 2 bits in the spare top bits of bytes 0-7."""
    s, m = scales.astype(np.uint8), mins.astype(np.uint8)
    return np.concatenate([s[:, :4] | (s[:, 4:] >> 4) << 6,
                           m[:, :4] | (m[:, 4:] >> 4) << 6,
                           (s[:, 4:] & 15) | (m[:, 4:] & 15) << 4], axis=1)


def pack_levels(q: np.ndarray) -> np.ndarray:
    """128 bytes of levels [B, 8, 32]: sub-blocks 2k and 2k+1 share 32 bytes, low and high nibble."""
    pairs = q.reshape(-1, 4, 2, SUB)
    return (pairs[:, :, 0] | pairs[:, :, 1] << 4).reshape(-1, SUPER // 2)
