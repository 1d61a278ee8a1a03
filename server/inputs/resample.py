"""Band-limited resampling as the authors did it for audio and IMU: torchaudio's
`functional.resample` with its defaults (windowed sinc, Hann window, 6 zero crossings,
rolloff 0.99), which the model saw in training, edge ringing included.

torchaudio builds one kernel row per output phase, `new/gcd` rows of `orig/gcd + 2·width`
taps, and convolves with stride `orig/gcd`; for rates with a small gcd (44 099 Hz → 16 kHz)
that kernel has hundreds of millions of taps. Output sample n is the same sum written out:

    y[n] = Σ_j x[j] · s · sinc(t) · cos²(πt / 12),  t = (j/orig − n/new) · base,  |t| ≤ 6

with base = min(orig, new) · 0.99 and s = base / orig; x is zero outside the signal. Only the
~2·6·orig/base taps with |t| < 6 carry weight, so this costs that many multiply-adds per output,
whatever the rates, and works for rates that are not whole numbers.
"""

import math
from fractions import Fraction

import numpy as np

ZERO_CROSSINGS = 6  # torchaudio's lowpass_filter_width
ROLLOFF = 0.99
_WORK_ELEMENTS = 1 << 20  # taps gathered at once (8 MB): bounds a request's memory whatever the rates


def resampled_length(length: int, rate: float, new_rate: float) -> int:
    """ceil(length · new / orig), exactly, as torchaudio rounds it."""
    return math.ceil(Fraction(length) * _rational(new_rate) / _rational(rate))


def resample(signal: np.ndarray, rate: float, new_rate: float, max_length: int | None = None) -> np.ndarray:
    """[..., T] at `rate` → [..., ceil(T·new_rate/rate)] float64 at `new_rate`, or only the first
    `max_length` samples of that (the rest is never computed)."""
    signal = np.asarray(signal, dtype=np.float64)
    length = signal.shape[-1]
    total = resampled_length(length, rate, new_rate)
    if max_length is not None:
        total = min(total, max_length)
    if rate == new_rate or total == 0:
        return signal[..., :total].copy()
    ratio = _rational(rate) / _rational(new_rate)  # input samples per output sample
    step, phases = ratio.numerator, ratio.denominator  # output b·phases + i centres on b·step + i·ratio
    base = min(1.0, 1 / float(ratio)) * ROLLOFF  # the cutoff, relative to the lower Nyquist rate
    reach = ZERO_CROSSINGS / base  # input samples either side of an output's centre with weight
    taps = np.arange(-math.floor(reach), math.floor(reach) + 2)  # [K] offsets from floor(centre)
    used = min(phases, total)  # more phases than outputs: only the first `total` occur
    blocks = -(-total // used)
    centre, remainder = np.divmod(np.arange(used) * step, phases)  # exact: no drift over a long signal
    t = np.clip((taps[None, :] - remainder[:, None] / phases) * base, -ZERO_CROSSINGS, ZERO_CROSSINGS)
    weights = np.sinc(t) * np.cos(t * math.pi / (2 * ZERO_CROSSINGS)) ** 2 * base  # [used, K]
    # zero-pad so that every tap of every output falls inside; input past the last one is not read
    starts = np.arange(blocks)[:, None] * step + centre[None, :]  # [blocks, used]: first taps in `padded`
    left, needed = -taps[0], starts[-1, -1] + len(taps)
    rows = signal.reshape(-1, length)[:, : needed - left]
    padded = np.pad(rows, ((0, 0), (left, needed - left - rows.shape[1])))
    windows = np.lib.stride_tricks.sliding_window_view(padded, len(taps), axis=1)  # [rows, *, K]
    out = np.empty((rows.shape[0], blocks, used))
    chunk = max(1, _WORK_ELEMENTS // (used * len(taps) * rows.shape[0]))  # blocks gathered at once
    for first in range(0, blocks, chunk):
        part = slice(first, first + chunk)
        out[:, part] = np.einsum("rbpk,pk->rbp", windows[:, starts[part]], weights)
    return out.reshape(rows.shape[0], -1)[:, :total].reshape(*signal.shape[:-1], total)


def _rational(rate: float) -> Fraction:
    """A sample rate as an exact fraction: whole-number rates stay whole, others (99.5 Hz) keep
    their decimal digits rather than the binary float's."""
    return Fraction(str(rate)) if not float(rate).is_integer() else Fraction(int(rate))
