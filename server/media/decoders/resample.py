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
    plan = _Plan(total, rate, new_rate)
    t = np.clip((plan.taps[None, :] - plan.remainder[:, None] / plan.phases) * plan.base,
                -ZERO_CROSSINGS, ZERO_CROSSINGS)
    weights = np.sinc(t) * np.cos(t * math.pi / (2 * ZERO_CROSSINGS)) ** 2 * plan.base  # [used, K]
    # zero-pad so that every tap of every output falls inside; input past the last one is not read
    starts = plan.starts()  # [blocks, used]: first taps in `padded`
    rows = signal.reshape(-1, length)[:, : plan.inputs_read]
    padded = np.pad(rows, ((0, 0), (plan.left, plan.inputs_read - rows.shape[1])))
    windows = np.lib.stride_tricks.sliding_window_view(padded, len(plan.taps), axis=1)  # [rows, *, K]
    out = np.empty((rows.shape[0], plan.blocks, plan.used))
    chunk = max(1, _WORK_ELEMENTS // (plan.used * len(plan.taps) * rows.shape[0]))  # blocks gathered at once
    for first in range(0, plan.blocks, chunk):
        part = slice(first, first + chunk)
        out[:, part] = np.einsum("rbpk,pk->rbp", windows[:, starts[part]], weights)
    return out.reshape(rows.shape[0], -1)[:, :total].reshape(*signal.shape[:-1], total)


def input_length_read(length: int, rate: float, new_rate: float) -> int:
    """How many samples at `rate` the first `length` output samples at `new_rate` read: a decoder
    may stop there, as `resample(signal, rate, new_rate, length)` reads no further."""
    if rate == new_rate or length == 0:
        return length
    return _Plan(length, rate, new_rate).inputs_read


class _Plan:
    """Where each of `total` output samples reads its input. Output b·phases + i centres on
    input b·step + i·ratio; it reads the taps around floor(centre)."""

    def __init__(self, total: int, rate: float, new_rate: float):
        ratio = _rational(rate) / _rational(new_rate)  # input samples per output sample
        self.step, self.phases = ratio.numerator, ratio.denominator
        self.base = min(1.0, 1 / float(ratio)) * ROLLOFF  # the cutoff, relative to the lower Nyquist rate
        reach = ZERO_CROSSINGS / self.base  # input samples either side of an output's centre with weight
        self.taps = np.arange(-math.floor(reach), math.floor(reach) + 2)  # [K] offsets from floor(centre)
        self.left = -int(self.taps[0])  # zeros padded before the signal
        self.used = min(self.phases, total)  # more phases than outputs: only the first `total` occur
        self.blocks = -(-total // self.used)
        # exact: no drift over a long signal
        self.centre, self.remainder = np.divmod(np.arange(self.used) * self.step, self.phases)
        last_start = (self.blocks - 1) * self.step + int(self.centre[-1])
        self.inputs_read = last_start + len(self.taps) - self.left

    def starts(self) -> np.ndarray:
        return np.arange(self.blocks)[:, None] * self.step + self.centre[None, :]


def _rational(rate: float) -> Fraction:
    """A sample rate as an exact fraction: whole-number rates stay whole, others (99.5 Hz) keep
    their decimal digits rather than the binary float's."""
    return Fraction(str(rate)) if not float(rate).is_integer() else Fraction(int(rate))
