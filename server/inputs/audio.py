"""Audio → the [1,128,1024] log-mel tensor of ONELLM.md §4.

The authors resampled to 16 kHz with torchaudio's `Resample` (server/inputs/resample.py) and
computed `torchaudio.compliance.kaldi.fbank(waveform, htk_compat=True,
sample_frequency=16000, use_energy=False, window_type='hanning', num_mel_bins=128,
dither=0.0, frame_shift=10)` on the float waveform in [-1, 1] as torchaudio loads it.
`kaldi_fbank` below computes the same filterbank without torchaudio.
"""

import io

import av
import numpy as np
import soundfile as sf
import torch

from server.errors import InputError
from server.inputs.resample import resample
from server.inputs.sniff import check_kind, undecodable

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
_SOUNDFILE_FORMATS = {"WAV", "FLAC", "OGG", "MP3", "AIFF"}  # the rest go to PyAV


def audio_tensor(data: bytes, param: str = "audio", *,
                 max_duration_s: float = MAX_DURATION_S) -> torch.Tensor:
    """[1,128,1024]: first channel, 16 kHz, mean removed, Kaldi fbank, padded with zeros
    (before normalising) or cut to 1024 frames, normalised, frequency-major."""
    # Only the samples the frames read are resampled. The authors subtract the mean of the whole
    # waveform, but Kaldi removes each frame's own mean before anything else, so which mean is
    # subtracted changes the result only by rounding.
    waveform = decode_audio(data, param, max_duration_s=max_duration_s, max_samples=FBANK_SAMPLES)
    fbank = kaldi_fbank(waveform - waveform.mean())
    padded = np.zeros((FRAMES, MEL_BINS), dtype=np.float32)
    padded[: len(fbank)] = fbank[:FRAMES]
    normalized = (padded - FBANK_MEAN) / (2 * FBANK_STD)
    return torch.from_numpy(np.ascontiguousarray(normalized.T))[None]


def decode_audio(data: bytes, param: str = "audio", *, max_duration_s: float = MAX_DURATION_S,
                 max_samples: int | None = None) -> np.ndarray:
    """The first channel as float32 in [-1, 1] at 16 kHz (its first `max_samples` only, if given)."""
    # Video containers are accepted too: their soundtrack is audio.
    kind = check_kind(data, param, {"audio", "video"}, "audio")
    _check_riff_complete(data, param)
    try:
        samples, rate = _read_soundfile(data, max_duration_s, param)
    except InputError:
        raise
    except Exception as sf_error:  # libsndfile does not read this container (M4A, WebM, …)
        try:
            samples, rate = _read_pyav(data, max_duration_s, param, kind)
        except InputError:
            raise
        except Exception as av_error:
            # Report the failure of the decoder that was meant to read this format.
            error = sf_error if kind is not None and kind.name in _SOUNDFILE_FORMATS else av_error
            raise undecodable(param, kind, "audio", error) from error
    if samples.size == 0:
        raise InputError(422, f"field '{param}' holds audio with no samples", param)
    if not np.isfinite(samples).all():
        raise InputError(422, f"field '{param}' holds audio with NaN or infinite samples", param)
    return resample(samples, rate, SAMPLE_RATE, max_samples).astype(np.float32)


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


def _read_soundfile(data: bytes, max_duration_s: float, param: str) -> tuple[np.ndarray, int]:
    with sf.SoundFile(io.BytesIO(data)) as audio:
        _check_duration(audio.frames / audio.samplerate, max_duration_s, param)
        samples = audio.read(dtype="float32", always_2d=True)
        return samples[:, 0], audio.samplerate


def _read_pyav(data: bytes, max_duration_s: float, param: str, kind) -> tuple[np.ndarray, int]:
    with av.open(io.BytesIO(data)) as container:
        if not container.streams.audio:
            what = kind.describe() if kind else "a file"
            raise InputError(415, f"field '{param}' holds {what} without an audio stream, "
                                  "expected audio", param)
        stream = container.streams.audio[0]
        rate = stream.codec_context.sample_rate
        # Planar float keeps channels apart, so row 0 is the first channel.
        resampler = av.AudioResampler(format="fltp")
        chunks, total = [], 0
        for frame in container.decode(stream):
            for converted in resampler.resample(frame):
                chunk = converted.to_ndarray()[0]
                chunks.append(chunk)
                total += len(chunk)
            _check_duration(total / rate, max_duration_s, param)
        for converted in resampler.resample(None):
            chunks.append(converted.to_ndarray()[0])
    return (np.concatenate(chunks) if chunks else np.zeros(0, np.float32)), rate


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


def _check_duration(seconds: float, max_duration_s: float, param: str) -> None:
    if seconds > max_duration_s:
        raise InputError(413, f"field '{param}' audio lasts {seconds:.0f} s, more than the limit "
                              f"of {max_duration_s:.0f} s", param)
