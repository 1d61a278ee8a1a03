"""Real files of all eight modalities for the load benchmark, made in memory with the libraries
people's tools use (Pillow, PyAV, soundfile, NumPy).

Every file depends on a seed, so a benchmark can send bytes the gateway has never seen (its
prefix cache keys on the bytes) or send the same bytes again on purpose.
"""

import io
from dataclasses import dataclass

import av
import numpy as np
import soundfile as sf
from PIL import Image

# the order requests cycle through, so any run of 8 consecutive requests covers every modality
MIX = ("image", "audio", "video", "point", "rgbd", "rgbn", "fmri", "imu")
IMU_RATE = 100.0  # Hz of the IMU files; sent along so the gateway resamples them
FMRI_VOXELS = 15724


@dataclass(frozen=True)
class Item:
    """One request's attachment: its modality, its files by upload field, and the question."""

    modality: str
    files: dict[str, bytes]
    text: str

    @property
    def options(self) -> dict:
        """The preprocess options the gateway derives from the request."""
        return {"imu_sample_rate": IMU_RATE}


def _picture(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A noisy colour gradient, uint8 [H, W, 3]."""
    x = np.broadcast_to(np.linspace(0, 255, width)[None, :], (height, width))
    y = np.broadcast_to(np.linspace(0, 255, height)[:, None], (height, width))
    base = np.stack([x, y, np.full((height, width), rng.uniform(0, 255))], axis=2)
    return np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)


def png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def npy(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, array, allow_pickle=False)
    return out.getvalue()


def mp4(rng: np.random.Generator, seconds: float = 2.0, fps: int = 10, width: int = 64, height: int = 48) -> bytes:
    """H.264 in MP4: a gradient sliding sideways."""
    picture = _picture(rng, width, height)
    out = io.BytesIO()
    with av.open(out, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(int(seconds * fps)):
            frame = np.ascontiguousarray(np.roll(picture, 3 * i, axis=1))
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return out.getvalue()


def wav(rng: np.random.Generator, seconds: float = 1.0, rate: int = 22050) -> bytes:
    """16-bit stereo WAV of a chord at a rate the gateway must resample to 16 kHz."""
    t = np.arange(int(seconds * rate)) / rate
    freq = rng.uniform(200, 600)
    left = 0.3 * np.sin(2 * np.pi * freq * t) + 0.2 * np.sin(3 * np.pi * freq * t)
    signal = np.stack([left, 0.5 * left], axis=1) + rng.normal(0, 0.01, (len(t), 2))
    out = io.BytesIO()
    sf.write(out, signal.astype(np.float32), rate, format="WAV", subtype="PCM_16")
    return out.getvalue()


def make_item(modality: str, seed: int) -> Item:
    rng = np.random.default_rng(seed)
    if modality == "image":
        return Item(modality, {"image": png(_picture(rng, 64, 48))}, "What is in this image?")
    if modality == "video":
        return Item(modality, {"video": mp4(rng)}, "What happens in this video?")
    if modality == "audio":
        return Item(modality, {"audio": wav(rng)}, "What do you hear?")
    if modality == "point":
        xyz = rng.normal(size=(2000, 3))
        xyz /= np.linalg.norm(xyz, axis=1, keepdims=True)
        cloud = np.concatenate([xyz, rng.uniform(size=(2000, 3))], axis=1).astype(np.float32)
        return Item(modality, {"point": npy(cloud)}, "What is this object?")
    if modality == "rgbd":
        depth = (np.linspace(500, 4000, 64)[None, :] + rng.normal(0, 30, (48, 64))).astype(np.uint16)
        return Item(modality, {"image": png(_picture(rng, 64, 48)), "depth": png(depth)}, "What is in this scene?")
    if modality == "rgbn":
        normals = rng.normal(0, 0.3, (48, 64, 3)) + np.array([0, 0, 1.0])
        normals /= np.linalg.norm(normals, axis=2, keepdims=True)
        normal_map = ((normals + 1) / 2 * 255).astype(np.uint8)
        return Item(modality, {"image": png(_picture(rng, 64, 48)), "normal": png(normal_map)}, "What is in this scene?")
    if modality == "fmri":
        return Item(modality, {"fmri": npy(rng.normal(size=(3, FMRI_VOXELS)).astype(np.float32))},
                    "What was this person looking at?")
    if modality == "imu":
        t = np.arange(int(3 * IMU_RATE)) / IMU_RATE
        accel = np.stack([np.sin(2 * np.pi * t), np.cos(2 * np.pi * t), 9.81 + 0 * t], axis=1)
        gyro = 0.1 * np.stack([np.sin(3 * t), np.cos(5 * t), np.sin(7 * t)], axis=1)
        series = np.concatenate([accel, gyro], axis=1) + rng.normal(0, 0.01, (len(t), 6))
        return Item(modality, {"imu": npy(series.astype(np.float32))}, "What is the wearer doing?")
    raise ValueError(f"unknown modality {modality!r}")


def mixed(count: int, first_seed: int, modalities: tuple[str, ...] = MIX) -> list[Item]:
    """`count` items cycling through `modalities`, each with bytes of its own seed."""
    return [make_item(modalities[i % len(modalities)], first_seed + i) for i in range(count)]
