"""Depth and normal maps as sensors and networks write them (server/media/decoders/maps.py): float
arrays in metres (.npy, .npz, float32 TIFF) give the input the same depths give as a 16-bit PNG in
millimetres, and normals in [-1, 1] the input of their 8-bit rendering; see
docs/depth_and_normal_maps.md for the rendering the authors' maps had."""

import io

import numpy as np
import pytest
import torch
from matplotlib import colormaps
from PIL import Image

import media
from inputs_files import image_bytes, npy_bytes
from server.errors import InputError
from server.media.decoders.images import CLIP_MEAN, CLIP_STD, rgbx_tensor

PHOTO = media.image("png", seed=900, width=96, height=72)
MEAN, STD = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)
LUT_STEP = 0.1  # one step of viridis' 256 colours, in CLIP-normalised units, with room for the resize


def error_of(call, *args, **kwargs) -> InputError:
    with pytest.raises(InputError) as caught:
        call(*args, **kwargs)
    return caught.value


def millimetres(seed: int = 0, width: int = 64, height: int = 48) -> np.ndarray:
    """A depth camera's frame: a floor receding from 0.5 m to 4 m, a box at 1.2 m, a few holes (0)."""
    rng = np.random.default_rng(seed)
    depth = np.linspace(500, 4000, height)[::-1, None] + rng.normal(0, 20, (height, width))
    depth[10:25, 20:40] = 1200
    depth[rng.random((height, width)) < 0.03] = 0
    return np.round(depth).astype(np.uint16)


def rgbd(depth_file: bytes) -> torch.Tensor:
    return rgbx_tensor(PHOTO, depth_file, "depth")


def assert_within_rounding(ours: torch.Tensor, reference: torch.Tensor) -> None:
    assert (ours - reference).abs().max().item() <= LUT_STEP
    assert (ours - reference).abs().mean().item() < 1e-3


def metres_npz(depth_m: np.ndarray, **extra) -> bytes:
    out = io.BytesIO()
    np.savez_compressed(out, **extra, depth=depth_m)
    return out.getvalue()


def float_tiff(depth_m: np.ndarray) -> bytes:
    return image_bytes(Image.fromarray(depth_m.astype(np.float32), "F"), "TIFF")


@pytest.mark.parametrize("write", [lambda m: npy_bytes(m), lambda m: npy_bytes(m[..., None]), metres_npz, float_tiff],
                         ids=["npy", "npy-HxWx1", "npz", "float32-tiff"])
def test_float_depth_in_metres_equals_the_16_bit_png_in_millimetres(write):
    mm = millimetres()
    metres = np.where(mm > 0, mm / 1000.0, np.nan).astype(np.float32)  # holes as NaN, as float maps mark them
    reference = rgbd(image_bytes(Image.fromarray(mm), "PNG"))
    assert_within_rounding(rgbd(write(metres)), reference)


def test_near_is_drawn_yellow_and_far_dark_purple_as_omnidata_saved_them():
    depth = np.full((48, 64), 3.0, np.float32)
    depth[:, :32] = 0.8
    frame = rgbd(npy_bytes(depth))[1]
    yellow, purple = (torch.tensor(colormaps["viridis"](v, bytes=True)[:3]).view(3, 1, 1) / 255.0 for v in (1.0, 0.0))
    assert torch.allclose(frame[:, :, :90], ((yellow - MEAN) / STD).expand(3, 224, 90), atol=1e-5)
    assert torch.allclose(frame[:, :, 134:], ((purple - MEAN) / STD).expand(3, 224, 90), atol=1e-5)
    # units do not matter: the drawing is stretched over the map's own range
    assert torch.equal(rgbd(npy_bytes(depth * 1000)), rgbd(npy_bytes(depth)))


def unit_normals(seed: int = 0, width: int = 64, height: int = 48) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = rng.normal(0, 0.3, (height, width, 3)) + np.array([0, 0, 1.0])
    return n / np.linalg.norm(n, axis=2, keepdims=True)


def test_float_normals_equal_their_8_bit_rendering():
    n = unit_normals(1)
    png = image_bytes(Image.fromarray(((n + 1) / 2 * 255).astype(np.uint8), "RGB"), "PNG")
    reference = rgbx_tensor(PHOTO, png, "normal")
    assert torch.equal(rgbx_tensor(PHOTO, npy_bytes(n), "normal"), reference)
    assert torch.equal(rgbx_tensor(PHOTO, npy_bytes(n.transpose(2, 0, 1).copy()), "normal"), reference)
    out = io.BytesIO()
    np.savez(out, normal=n)
    assert torch.equal(rgbx_tensor(PHOTO, out.getvalue(), "normal"), reference)


def test_map_errors_name_the_field_and_the_format():
    error = error_of(rgbx_tensor, PHOTO, image_bytes(Image.fromarray(millimetres()), "PNG"), "normal")
    assert (error.status, error.param) == (422, "normal") and "not a normal map" in error.message
    error = error_of(rgbx_tensor, PHOTO, npy_bytes(np.zeros((48, 64))), "normal")
    assert error.status == 422 and "[H,W,3]" in error.message
    error = error_of(rgbx_tensor, PHOTO, npy_bytes(np.ones((4, 48, 64))), "depth")
    assert error.status == 422 and "[H,W]" in error.message
    out = io.BytesIO()
    np.savez(out, left=np.ones((4, 4)), right=np.ones((4, 4)))
    error = error_of(rgbx_tensor, PHOTO, out.getvalue(), "depth")
    assert error.status == 422 and "left, right" in error.message
    assert error_of(rgbx_tensor, PHOTO, npy_bytes(np.ones((100, 100))), "depth", max_pixels=5000).status == 413
    assert error_of(rgbx_tensor, PHOTO, media.audio("wav"), "depth").status == 415
