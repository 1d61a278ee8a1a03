"""Real files of every format the gateway accepts, encoded in memory with the libraries people's
tools use (Pillow, PyAV, soundfile, trimesh, NumPy). Each helper takes a `seed` so a test can
make bytes no other test sent (the prefix cache keys on the bytes)."""

import numpy as np
import trimesh
from PIL import Image

from inputs_files import csv_bytes as csv, image_bytes, npy_bytes as npy, sound_bytes, video_bytes

FMRI_VOXELS = 15724


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def picture(seed: int = 0, width: int = 64, height: int = 48) -> Image.Image:
    """A colour gradient with noise, different for every seed."""
    rng = _rng(seed)
    x = np.linspace(0, 255, width)[None, :, None]
    y = np.linspace(0, 255, height)[:, None, None]
    base = np.concatenate([np.broadcast_to(x, (height, width, 1)), np.broadcast_to(y, (height, width, 1)),
                           np.full((height, width, 1), 128.0)], axis=2)
    noisy = base + rng.normal(0, 20, size=base.shape)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), "RGB")


def image(fmt: str, seed: int = 0, width: int = 64, height: int = 48) -> bytes:
    """JPEG, PNG or WebP bytes."""
    return image_bytes(picture(seed, width, height), {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}[fmt])


def solid_png(colour: tuple[int, int, int], tag: str = "", width: int = 64, height: int = 48) -> bytes:
    """One flat colour as PNG; `tag` goes into a text chunk, so the same pixels can come in different bytes
    (a different prefix-cache key). Flat colours are far apart for a random-weight encoder."""
    from PIL.PngImagePlugin import PngInfo
    info = PngInfo()
    info.add_text("Comment", tag)
    return image_bytes(Image.new("RGB", (width, height), colour), "PNG", pnginfo=info)


def depth_map(seed: int = 0, width: int = 64, height: int = 48) -> bytes:
    """A 16-bit greyscale PNG in millimetres, as depth cameras write them."""
    rng = _rng(seed)
    depth = (np.linspace(500, 4000, width)[None, :] + rng.normal(0, 30, (height, width))).astype(np.uint16)
    return image_bytes(Image.fromarray(depth), "PNG")  # mode I;16


def normal_map(seed: int = 0, width: int = 64, height: int = 48) -> bytes:
    """Unit surface normals rendered as RGB ((n + 1) / 2 * 255), PNG."""
    rng = _rng(seed)
    n = rng.normal(0, 0.3, (height, width, 3)) + np.array([0, 0, 1.0])
    n /= np.linalg.norm(n, axis=2, keepdims=True)
    return image_bytes(Image.fromarray(((n + 1) / 2 * 255).astype(np.uint8), "RGB"), "PNG")


# container -> (PyAV format name, codec)
VIDEO_FORMATS = {"mp4": ("mp4", "libx264"), "webm": ("webm", "libvpx-vp9"), "mov": ("mov", "libx264")}


def video(fmt: str, seed: int = 0, seconds: float = 2.0, fps: int = 10, width: int = 64, height: int = 48) -> bytes:
    """MP4 (H.264), WebM (VP9) or MOV (H.264): a moving gradient."""
    container_format, codec = VIDEO_FORMATS[fmt]
    still = np.asarray(picture(seed, width, height))
    frames = [np.ascontiguousarray(np.roll(still, shift=3 * i, axis=1)) for i in range(int(seconds * fps))]
    return video_bytes(frames, container_format, codec, fps)


# extension -> (soundfile format, subtype)
AUDIO_FORMATS = {"wav": ("WAV", "PCM_16"), "flac": ("FLAC", "PCM_16"), "ogg": ("OGG", "VORBIS")}


def audio(fmt: str, seed: int = 0, seconds: float = 1.0, rate: int = 22050) -> bytes:
    """WAV, FLAC or OGG Vorbis: a stereo chord with a little noise, at a rate the server must resample."""
    rng = _rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    freq = 220 + 20 * seed
    left = 0.3 * np.sin(2 * np.pi * freq * t) + 0.2 * np.sin(2 * np.pi * 1.5 * freq * t)
    signal = np.stack([left, 0.5 * left], axis=1) + rng.normal(0, 0.01, (len(t), 2))
    file_format, subtype = AUDIO_FORMATS[fmt]
    return sound_bytes(signal.astype(np.float32), rate, file_format, subtype)


def point_cloud(seed: int = 0, n: int = 2000) -> np.ndarray:
    """[n, 6] xyz on a noisy sphere + rgb in 0-1."""
    rng = _rng(seed)
    xyz = rng.normal(size=(n, 3))
    xyz /= np.linalg.norm(xyz, axis=1, keepdims=True)
    xyz = xyz * 0.5 + 0.01 * rng.normal(size=(n, 3))
    return np.concatenate([xyz, rng.uniform(size=(n, 3))], axis=1).astype(np.float32)


def mesh(seed: int = 0) -> trimesh.Trimesh:
    """A coloured icosphere, stretched differently for every seed."""
    sphere = trimesh.creation.icosphere(subdivisions=2)
    sphere.apply_scale([1.0, 1.0 + 0.1 * seed, 0.8])
    colours = (_rng(seed).uniform(size=(len(sphere.vertices), 4)) * 255).astype(np.uint8)
    colours[:, 3] = 255
    sphere.visual.vertex_colors = colours
    return sphere


def point(fmt: str, seed: int = 0) -> bytes:
    """.npy [N,6], or a mesh as PLY / OBJ / GLB."""
    if fmt == "npy":
        return npy(point_cloud(seed))
    data = mesh(seed).export(file_type=fmt)
    return data.encode() if isinstance(data, str) else data


def fmri_array(seed: int = 0, repeats: int = 3) -> np.ndarray:
    return _rng(seed).normal(size=(repeats, FMRI_VOXELS)).astype(np.float32)


def fmri(fmt: str, seed: int = 0) -> bytes:
    """.npy [3, 15724] (repeats) or a one-row CSV of 15724 voxels."""
    if fmt == "npy":
        return npy(fmri_array(seed))
    return csv(fmri_array(seed, repeats=1))


def imu_array(seed: int = 0, seconds: float = 3.0, rate: float = 100.0) -> np.ndarray:
    """[T, 6]: accelerometer xyz (m/s^2, gravity on z) and gyroscope xyz (rad/s)."""
    rng = _rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    accel = np.stack([np.sin(2 * np.pi * t), np.cos(2 * np.pi * t), 9.81 + 0 * t], axis=1)
    gyro = 0.1 * np.stack([np.sin(3 * t), np.cos(5 * t), np.sin(7 * t)], axis=1)
    return np.concatenate([accel, gyro], axis=1) + rng.normal(0, 0.01, (len(t), 6))


def imu(fmt: str, seed: int = 0, rate: float = 100.0) -> bytes:
    """.npy [T, 6] or CSV with a header row, sampled at `rate` Hz."""
    array = imu_array(seed, rate=rate)
    if fmt == "npy":
        return npy(array.astype(np.float32))
    return csv(array, header="ax,ay,az,gx,gy,gz")
