"""Helpers of the clients tier: one real file of each kind on disk (named as people name them), and
the environment the CLI subprocesses run in."""

import os
from pathlib import Path

import media

REPO = Path(__file__).resolve().parents[2]


def clean_env() -> dict[str, str]:
    """This environment without ONELLM_* settings, which would change what the server or the CLI does."""
    return {k: v for k, v in os.environ.items() if not k.startswith("ONELLM_")}


def write_media(folder: Path) -> dict[str, Path]:
    """Writes one file per upload field and returns them by field."""
    contents = {
        "cat.png": media.image("png"), "clip.mp4": media.video("mp4"), "tone.wav": media.audio("wav"),
        "cloud.npy": media.point("npy"), "room_depth.png": media.depth_map(), "room_normal.png": media.normal_map(),
        "scan_fmri.npy": media.fmri("npy"), "walk_imu.csv": media.imu("csv"),
    }
    paths = {}
    for field, (name, data) in zip(("image", "video", "audio", "point", "depth", "normal", "fmri", "imu"),
                                   contents.items()):
        paths[field] = folder / name
        paths[field].write_bytes(data)
    return paths
