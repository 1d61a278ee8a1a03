"""Helpers of the clients tier: small real files of every kind the gateway takes (written the way
people's tools write them), and the environment the server and CLI subprocesses run in."""

import os
import socket
from pathlib import Path

import av
import numpy as np
import soundfile as sf
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
FMRI_VOXELS = 15724


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def clean_env() -> dict[str, str]:
    """This environment without ONELLM_* settings, which would change what the server or the CLI does."""
    return {k: v for k, v in os.environ.items() if not k.startswith("ONELLM_")}


def write_media(folder: Path) -> dict[str, Path]:
    """Writes one file per upload field (plus a second image for pairing) and returns them by field."""
    rng = np.random.default_rng(0)
    files = {
        "image": folder / "cat.png", "video": folder / "clip.mp4", "audio": folder / "tone.wav",
        "point": folder / "cloud.npy", "depth": folder / "room_depth.png", "normal": folder / "room_normal.png",
        "fmri": folder / "scan_fmri.npy", "imu": folder / "walk_imu.csv",
    }
    gradient = np.linspace(0, 255, 96, dtype=np.uint8)
    Image.fromarray(np.stack([np.tile(gradient, (64, 1)), np.full((64, 96), 90, np.uint8),
                              np.tile(gradient[::-1], (64, 1))], axis=-1)).save(files["image"])
    write_mp4(files["video"], [np.full((48, 64, 3), level, np.uint8) for level in range(0, 250, 25)])
    seconds = np.arange(16000) / 16000
    sf.write(files["audio"], 0.3 * np.sin(2 * np.pi * 440 * seconds), 16000, subtype="PCM_16")
    np.save(files["point"], rng.uniform(-1, 1, (2000, 6)).astype(np.float32))
    # a 16-bit depth map in millimetres, as depth cameras save them
    depth = np.tile(np.linspace(500, 4000, 96), (64, 1)).astype(np.uint16)
    Image.fromarray(depth).save(files["depth"])
    Image.fromarray(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)).save(files["normal"])
    np.save(files["fmri"], rng.standard_normal(FMRI_VOXELS).astype(np.float32))
    motion = rng.standard_normal((400, 6))
    files["imu"].write_text("acc_x,acc_y,acc_z,gyro_x,gyro_y,gyro_z\n"
                            + "\n".join(",".join(f"{v:.5f}" for v in row) for row in motion) + "\n")
    return files


def write_mp4(path: Path, frames: list[np.ndarray], fps: int = 5) -> None:
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("h264", rate=fps)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
