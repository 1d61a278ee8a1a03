"""Audio → the [1,128,1024] log-mel tensor of ONELLM.md §4.

The authors resampled to 16 kHz with torchaudio's `Resample` (server/media/decoders/resample.py) and
computed `torchaudio.compliance.kaldi.fbank(waveform, htk_compat=True,
sample_frequency=16000, use_energy=False, window_type='hanning', num_mel_bins=128,
dither=0.0, frame_shift=10)` on the float waveform in [-1, 1] as torchaudio loads it.
`kaldi_fbank` below computes the same filterbank without torchaudio.
"""

import io
import math
import threading

import av
import numpy as np
import soundfile as sf
import torch

from server.errors import Cancelled, InputError
from server.media.decoders.costs import MAX_DECODE_MB, check_cancelled, check_decode_memory
from server.media.decoders.resample import input_length_read, resample
from server.media.sniff import check_kind, undecodable

SAMPLE_RATE = 16000
MEL_BINS = 128
FRAMES = 1024  # 10.24 s
WINDOW = 400  # 25 ms at 16 kHz
SHIFT = 160  # 10 ms
FFT_SIZE = 512  # the window rounded up to a power of two
FBANK_SAMPLES = WINDOW + (FRAMES - 1) * SHIFT  # what the 1024 frames read
PREEMPHASIS = 0.97
FBANK_MEAN = -4.2677393
FBANK_STD = 4.5689974
MAX_DURATION_S = 600.0
MAX_SAMPLE_RATE = 384_000.0  # the highest rate studio gear records at
_BLOCK_SAMPLES = 1 << 18  # samples of all channels read at once: 1 MB of float32 whatever the channels
# working memory per source frame kept: float32 as read, float64 in the resampler and its padded copy
_BYTES_PER_KEPT_FRAME = 4 + 8 + 8
_FIXED_BYTES = 16 << 20  # a block of every channel and the resampler's gathered taps (8 MB)
_SOUNDFILE_FORMATS = {"WAV", "FLAC", "OGG", "MP3", "AIFF"}  # the rest go to PyAV


def audio_tensor(data: bytes, param: str = "audio", *, max_duration_s: float = MAX_DURATION_S,
                 max_sample_rate: float = MAX_SAMPLE_RATE, max_decode_mb: float = MAX_DECODE_MB,
                 cancel: threading.Event | None = None) -> torch.Tensor:
    """[1,128,1024]: first channel, 16 kHz, mean removed, Kaldi fbank, padded with zeros
    (before normalising) or cut to 1024 frames, normalised, frequency-major."""
    # Only the samples the frames read are decoded and resampled. The authors subtract the mean
    # of the whole waveform, but Kaldi removes each frame's own mean before anything else, so
    # which mean is subtracted changes the result only by rounding.
    budget = _Budget(param, max_duration_s, max_sample_rate, max_decode_mb, cancel, FBANK_SAMPLES)
    waveform = decode_audio(data, param, budget=budget)
    fbank = kaldi_fbank(waveform - waveform.mean())
    padded = np.zeros((FRAMES, MEL_BINS), dtype=np.float32)
    padded[: len(fbank)] = fbank[:FRAMES]
    normalized = (padded - FBANK_MEAN) / (2 * FBANK_STD)
    return torch.from_numpy(np.ascontiguousarray(normalized.T))[None]


class _Budget:
    """What one decode may read: the source frames that make `max_samples` samples at 16 kHz (all
    of them, up to the duration limit, when None), at a bounded rate and working memory."""

    def __init__(self, param: str, max_duration_s: float = MAX_DURATION_S,
                 max_sample_rate: float = MAX_SAMPLE_RATE, max_decode_mb: float = MAX_DECODE_MB,
                 cancel: threading.Event | None = None, max_samples: int | None = None):
        self.param, self.max_duration_s, self.max_sample_rate = param, max_duration_s, max_sample_rate
        self.max_decode_mb, self.cancel, self.max_samples = max_decode_mb, cancel, max_samples

    def frames_to_keep(self, rate: float, frames: int | None = None) -> int:
        """Source frames of the first channel to decode, checked against the limits first."""
        if not rate > 0:
            raise ValueError(f"sample rate {rate}")
        if rate > self.max_sample_rate:
            raise InputError(413, f"field '{self.param}' audio is sampled at {rate:g} Hz, more than "
                                  f"the limit of {self.max_sample_rate:g} Hz (max_audio_sample_rate)",
                             self.param)
        if self.max_samples is not None:
            keep = input_length_read(self.max_samples, rate, SAMPLE_RATE)
        else:
            keep = math.ceil(self.max_duration_s * rate)
        keep = keep if frames is None else min(keep, frames)
        check_decode_memory(keep * _BYTES_PER_KEPT_FRAME + _FIXED_BYTES, self.max_decode_mb, self.param,
                            f"{keep} samples at {rate:g} Hz to decode")
        return keep

    def check_duration(self, seconds: float) -> None:
        if seconds > self.max_duration_s:
            raise InputError(413, f"field '{self.param}' audio lasts {seconds:.0f} s, more than the "
                                  f"limit of {self.max_duration_s:.0f} s (max_audio_seconds)", self.param)


def decode_audio(data: bytes, param: str = "audio", *, max_duration_s: float = MAX_DURATION_S,
                 max_samples: int | None = None, budget: _Budget | None = None) -> np.ndarray:
    """The first channel as float32 in [-1, 1] at 16 kHz (its first `max_samples` only, if given;
    `budget` sets all the limits at once)."""
    budget = budget or _Budget(param, max_duration_s, max_samples=max_samples)
    # Video containers are accepted too: their soundtrack is audio.
    kind = check_kind(data, param, {"audio", "video"}, "audio")
    _check_riff_complete(data, param)
    try:
        samples, rate = _read_soundfile(data, budget)
    except (InputError, Cancelled):
        raise
    except Exception as sf_error:  # libsndfile does not read this container (M4A, WebM, …)
        try:
            samples, rate = _read_pyav(data, budget, kind)
        except (InputError, Cancelled):
            raise
        except Exception as av_error:
            # Report the failure of the decoder that was meant to read this format.
            error = sf_error if kind is not None and kind.name in _SOUNDFILE_FORMATS else av_error
            raise undecodable(param, kind, "audio", error) from error
    if samples.size == 0:
        raise InputError(422, f"field '{param}' holds audio with no samples", param)
    if not np.isfinite(samples).all():
        raise InputError(422, f"field '{param}' holds audio with NaN or infinite samples", param)
    return resample(samples, rate, SAMPLE_RATE, budget.max_samples).astype(np.float32)


def kaldi_fbank(waveform: np.ndarray, num_bins: int = MEL_BINS) -> np.ndarray:
    """[frames, num_bins] Kaldi log-mel filterbank of a 16 kHz waveform, as torchaudio's
    `compliance.kaldi.fbank` computes it (the options in the module docstring).

    Written out here rather than taken from kaldi-native-fbank: at 128 bins over a
    512-point FFT, mel bin 3 (≈48–93 Hz) covers no FFT bin. Kaldi and kaldi-native-fbank
    refuse such a bank; torchaudio keeps the empty filter, whose output is log(ε), and the
    released weights were trained on that. Only the first 1024 frames are computed."""
    frames = _frames(waveform[:FBANK_SAMPLES].astype(np.float64))
    frames = frames - frames.mean(axis=1, keepdims=True)  # remove_dc_offset
    # Pre-emphasis, Kaldi style: the first sample is emphasised against itself.
    previous = np.concatenate([frames[:, :1], frames[:, :-1]], axis=1)
    frames = (frames - PREEMPHASIS * previous) * np.hanning(WINDOW)
    power = np.abs(np.fft.rfft(frames, n=FFT_SIZE, axis=1)) ** 2
    energies = power @ _mel_banks(num_bins).T
    return np.log(np.maximum(energies, np.finfo(np.float32).eps)).astype(np.float32)


def _frames(waveform: np.ndarray) -> np.ndarray:
    """[n, 400] windows every 160 samples, only whole windows (Kaldi's snip_edges)."""
    if len(waveform) < WINDOW:
        return np.zeros((0, WINDOW))
    return np.lib.stride_tricks.sliding_window_view(waveform, WINDOW)[::SHIFT]


def _mel_banks(num_bins: int) -> np.ndarray:
    """[num_bins, 257] triangular filters, equally spaced on Kaldi's mel scale from 20 Hz
    to Nyquist; the Nyquist FFT bin gets no weight, as in Kaldi."""
    low, high = _mel(20.0), _mel(SAMPLE_RATE / 2)
    delta = (high - low) / (num_bins + 1)
    left = low + delta * np.arange(num_bins)[:, None]
    mel = _mel(np.arange(FFT_SIZE // 2) * SAMPLE_RATE / FFT_SIZE)[None, :]
    up = (mel - left) / delta
    down = (left + 2 * delta - mel) / delta
    weights = np.maximum(0.0, np.minimum(up, down))
    return np.pad(weights, ((0, 0), (0, 1)))


def _mel(hz):
    return 1127.0 * np.log(1.0 + np.asarray(hz, dtype=np.float64) / 700.0)


def _read_soundfile(data: bytes, budget: _Budget) -> tuple[np.ndarray, int]:
    """The first channel of the frames to keep, read in blocks of a bounded number of samples
    (all channels interleaved), so that neither a long file nor many channels cost more."""
    with sf.SoundFile(io.BytesIO(data)) as audio:
        budget.check_duration(audio.frames / audio.samplerate)
        kept = np.empty(budget.frames_to_keep(audio.samplerate, audio.frames), np.float32)
        block = max(1, _BLOCK_SAMPLES // audio.channels)
        filled = 0
        while filled < len(kept):
            check_cancelled(budget.cancel)
            chunk = audio.read(min(block, len(kept) - filled), dtype="float32", always_2d=True)
            if len(chunk) == 0:
                break
            kept[filled:filled + len(chunk)] = chunk[:, 0]
            filled += len(chunk)
        return kept[:filled], audio.samplerate


def _read_pyav(data: bytes, budget: _Budget, kind) -> tuple[np.ndarray, int]:
    """Decodes frame by frame and stops once the frames to keep are in."""
    with av.open(io.BytesIO(data)) as container:
        if not container.streams.audio:
            what = kind.describe() if kind else "a file"
            raise InputError(415, f"field '{budget.param}' holds {what} without an audio stream, "
                                  "expected audio", budget.param)
        stream = container.streams.audio[0]
        rate = stream.codec_context.sample_rate
        if container.duration:
            budget.check_duration(container.duration / av.time_base)
        keep = budget.frames_to_keep(rate)
        # Planar float keeps channels apart, so row 0 is the first channel.
        resampler = av.AudioResampler(format="fltp")
        chunks, total = [], 0
        for frame in container.decode(stream):
            check_cancelled(budget.cancel)
            for converted in resampler.resample(frame):
                chunks.append(converted.to_ndarray()[0].copy())  # a copy: the view keeps every channel
                total += len(chunks[-1])
            budget.check_duration(total / rate)
            if total >= keep:
                break
        else:
            chunks.extend(converted.to_ndarray()[0].copy() for converted in resampler.resample(None))
    samples = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
    return samples[:keep], rate


def _check_riff_complete(data: bytes, param: str) -> None:
    """libsndfile plays a WAV cut short without complaint; a half-uploaded file should be
    reported, not heard as half the audio. The RIFF header states the file's length."""
    if data[:4] != b"RIFF" or len(data) < 8:
        return
    declared = int.from_bytes(data[4:8], "little")
    # 0 and 0xFFFFFFFF: streaming writers that did not know the length.
    if declared not in (0, 0xFFFFFFFF) and declared + 8 > len(data):
        raise InputError(422, f"field '{param}' holds a truncated WAV file ({len(data)} bytes of "
                              f"{declared + 8})", param)
