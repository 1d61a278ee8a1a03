"""CPU time of decoding audio uploads into the model's [1,128,1024] input, per file (a benchmark,
not a test): read, first channel, resample to 16 kHz, Kaldi fbank.

    uv run python bench/audio_decode.py ../shared/fixtures/preprocess-ref/inputs

Every audio file of the folder (WAV, FLAC, OGG, MP3) is decoded once to warm up, then `--runs`
times; the median CPU time is printed with the file's rate and length. BLAS gets one thread:
CPU time counts every thread's, and idle BLAS threads spin while they wait for a core.
"""

import os

for variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(variable, "1")  # before NumPy loads its BLAS

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import soundfile as sf  # noqa: E402

from server.media.decoders.audio import audio_tensor  # noqa: E402

SUFFIXES = {".wav", ".flac", ".ogg", ".mp3"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    print("| file | rate (Hz) | seconds | decode, median CPU (ms) |")
    print("|---|---:|---:|---:|")
    for path in sorted(p for p in args.folder.iterdir() if p.suffix.lower() in SUFFIXES):
        data = path.read_bytes()
        info = sf.info(path)
        audio_tensor(data)
        times = []
        for _ in range(args.runs):
            start = time.process_time()
            audio_tensor(data)
            times.append((time.process_time() - start) * 1e3)
        print(f"| {path.name} | {info.samplerate} | {info.duration:.1f} | {statistics.median(times):.1f} |")


if __name__ == "__main__":
    main()
