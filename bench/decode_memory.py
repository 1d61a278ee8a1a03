"""Peak memory of decoding each modality's worst upload the default limits allow (a benchmark,
not a test): one attachment through its modality's preprocess with the gateway's default decoder
limits (`Settings().decoder_limits()`), each in a fresh process, measured as the growth of that
process's peak RSS (VmHWM, reset just before the decode: tests/peak_memory.py).

    uv run python bench/decode_memory.py [--only audio_flac ...] [--folder /tmp/decode-memory]

The inputs are made once into --folder (the 40 MP video takes minutes to encode) and reused.
Run it against another checkout's server/ with PYTHONPATH=<checkout> to compare before/after.
"""

import argparse
import io
import subprocess
import sys
import time
from pathlib import Path

import av
import numpy as np
import soundfile as sf
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from inputs_files import silence_flac  # noqa: E402
from peak_memory import peak_growth  # noqa: E402

MiB = 1 << 20


def stereo_wav(size: int = 64 * MiB - 1024, rate: int = 48_000) -> bytes:
    frames = size // 4
    t = np.arange(frames) / rate
    tone = (0.3 * np.sin(2 * np.pi * 440 * t) * 32767).astype(np.int16)
    out = io.BytesIO()
    sf.write(out, np.stack([tone, tone], 1), rate, format="WAV", subtype="PCM_16")
    return out.getvalue()


def gradient_video(width: int = 8000, height: int = 5000, frames: int = 12) -> bytes:
    """40 MP H.264 frames (the max_video_frame_pixels default), 2 fps, a keyframe every 4."""
    out = io.BytesIO()
    y, x = np.mgrid[0:height, 0:width]
    with av.open(out, "w", format="mp4") as container:
        stream = container.add_stream("h264", rate=2)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.gop_size = 4
        for k in range(frames):
            rgb = np.stack([x * 255 // width, y * 255 // height, np.full_like(x, 20 * k)], -1).astype(np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        container.mux(stream.encode())
    return out.getvalue()


def png(mode: str, side: int = 7071) -> bytes:
    """~50 MP (the max_image_pixels default), a gradient: a small file, a full decode."""
    ramp = np.linspace(0, 255 if mode == "RGB" else 65535, side)
    values = (ramp[None, :] + ramp[:, None]) / 2
    if mode == "RGB":
        img = Image.fromarray(np.repeat(values.astype(np.uint8)[..., None], 3, axis=2))
    else:
        img = Image.fromarray(values.astype(np.uint16))
    out = io.BytesIO()
    img.save(out, format="PNG")
    return out.getvalue()


def csv(rows: int, columns: int) -> bytes:
    values = np.random.default_rng(0).normal(size=(rows, columns))
    out = io.StringIO()
    np.savetxt(out, values, delimiter=",", fmt="%.6f")
    return out.getvalue().encode()


def npy(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, array)
    return out.getvalue()


# name -> (modality, {field: file maker})
CASES = {
    "audio_flac": ("audio", {"audio": lambda: silence_flac(590)}),  # the row: 8 channels, 192 kHz
    "audio_wav": ("audio", {"audio": stereo_wav}),
    "video_40mp": ("video", {"video": gradient_video}),
    "image_50mp": ("image", {"image": lambda: png("RGB")}),
    "rgbd_50mp": ("rgbd", {"image": lambda: png("RGB"), "depth": lambda: png("I;16")}),
    "imu_csv": ("imu", {"imu": lambda: csv(1_000_000, 6)}),
    "imu_csv_refused": ("imu", {"imu": lambda: csv(1_050_000, 6)}),
    "fmri_csv": ("fmri", {"fmri": lambda: csv(256, 15724)}),
    "imu_npy": ("imu", {"imu": lambda: npy(np.zeros((1_000_000, 6), np.float32))}),
    "point_npy": ("point", {"point": lambda: npy(np.random.default_rng(0).normal(size=(5_000_000, 3))
                                                 .astype(np.float32))}),
}


def measure(name: str, folder: Path) -> None:
    """In this process: decode the case's files once, print bytes in, peak growth, answer."""
    from server.config import Settings
    from server.errors import InputError
    from server.media.modalities import preprocess
    from server.media.modalities.base import Decoding

    modality, makers = CASES[name]
    files = {field: (folder / f"{name}.{field}").read_bytes() for field in makers}
    limits = Settings().decoder_limits()
    start = time.monotonic()
    with peak_growth() as growth:
        try:
            answer = "x".join(map(str, preprocess(modality, files, Decoding(limits)).shape))
        except InputError as error:
            answer = f"{error.status}: {error.message[:70]}"
    seconds = time.monotonic() - start
    size = sum(map(len, files.values()))
    print(f"| {name} | {size / MiB:.1f} | {growth.added / MiB:.0f} | {seconds:.1f} | {answer} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", choices=sorted(CASES), help="cases to measure (default: all)")
    parser.add_argument("--folder", type=Path, default=Path("/tmp/decode-memory"))
    parser.add_argument("--case", help=argparse.SUPPRESS)  # the child process's one case
    args = parser.parse_args()
    if args.case:
        return measure(args.case, args.folder)
    args.folder.mkdir(parents=True, exist_ok=True)
    print("| case | MB in | peak RSS added (MB) | seconds | answer |\n|---|---:|---:|---:|---|", flush=True)
    for name in args.only or CASES:
        for field, make in CASES[name][1].items():
            path = args.folder / f"{name}.{field}"
            if not path.exists():
                path.write_bytes(make())
        subprocess.run([sys.executable, __file__, "--case", name, "--folder", str(args.folder)], check=True)


if __name__ == "__main__":
    main()
