"""The resampler against the authors' own: torchaudio's `functional.resample`, run in
.venv-torchaudio (`make torchaudio-env`), on chirps and noise, up and down, audio and IMU rates."""

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from server.media.decoders.resample import resample, resampled_length

REPO = Path(__file__).resolve().parents[1]
TORCHAUDIO_PYTHON = REPO / ".venv-torchaudio" / "bin" / "python"
AUDIO_RATES = [8000, 22050, 44100, 48000]
# (orig, new): every audio rate to and from the model's 16 kHz, and IMU rates to its 200 Hz
PAIRS = [(rate, 16000) for rate in AUDIO_RATES] + [(16000, rate) for rate in AUDIO_RATES] + \
        [(50, 200), (100, 200), (400, 200), (1000, 200), (97, 200)]


def chirp(rate: int, seconds: float) -> np.ndarray:
    """A sine sweeping from 20 Hz to the Nyquist frequency: every band, the one cut included."""
    t = np.arange(round(rate * seconds)) / rate
    return 0.8 * np.sin(2 * np.pi * (20 * t + (rate / 2 - 20) * t ** 2 / (2 * seconds)))


def noise(rate: int, seconds: float, channels: int) -> np.ndarray:
    return np.random.default_rng(rate).uniform(-1, 1, (channels, round(rate * seconds)))


def signals() -> list[tuple[str, np.ndarray, int, int]]:
    cases = []
    for orig, new in PAIRS:
        seconds = 1.3 if orig >= 8000 else 7.1  # odd lengths: the output length rounds up
        cases.append((f"chirp {orig}->{new}", chirp(orig, seconds), orig, new))
        channels = 6 if new == 200 else 2  # IMU: [6, T]; audio: stereo rows resampled alike
        cases.append((f"noise {orig}->{new}", noise(orig, seconds, channels), orig, new))
    return cases


@pytest.fixture(scope="module")
def torchaudio_results(tmp_path_factory) -> list[np.ndarray]:
    if not TORCHAUDIO_PYTHON.exists():
        message = f"{TORCHAUDIO_PYTHON} is missing: run `make torchaudio-env`"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    folder = tmp_path_factory.mktemp("torchaudio")
    inputs = {}
    for i, (_, signal, orig, new) in enumerate(signals()):
        inputs[f"signal_{i}"], inputs[f"rates_{i}"] = signal, np.array([orig, new])
    np.savez(folder / "in.npz", **inputs)
    subprocess.run([str(TORCHAUDIO_PYTHON), str(REPO / "tests" / "torchaudio_reference.py"),
                    str(folder / "in.npz"), str(folder / "out.npz")], check=True, timeout=300)
    with np.load(folder / "out.npz", allow_pickle=False) as out:
        return [out[f"out_{i}"] for i in range(len(inputs) // 2)]


@pytest.mark.parametrize("index", range(len(signals())), ids=[name for name, *_ in signals()])
def test_resampling_equals_torchaudio(index, torchaudio_results):
    _, signal, orig, new = signals()[index]
    expected = torchaudio_results[index]
    ours = resample(signal, orig, new)
    assert ours.shape == expected.shape
    # float64 on both sides: what is left is the order of the sums
    assert np.abs(ours - expected).max() < 1e-9


def test_only_the_samples_asked_for_are_computed_and_they_are_the_same():
    signal = chirp(44100, 3.0)
    whole = resample(signal, 44100, 16000)
    assert np.array_equal(resample(signal, 44100, 16000, max_length=1000), whole[:1000])


def test_output_length_rounds_up_as_torchaudio_does():
    assert resampled_length(44101, 44100, 16000) == 16001  # 16000.36… → 16001
    assert resampled_length(3, 100, 200) == 6
    assert resampled_length(199, 99.5, 200) == 400  # rates that are not whole numbers stay exact
