"""Depth and normal maps as sensors and networks write them → the images the model was trained on.

The authors generated their maps with Omnidata's DPT models through Omnidata's demo script
(docs/depth_and_normal_maps.md has the sources): a depth map was saved as `1 - depth` stretched
over the image's own range and coloured with matplotlib's viridis (near yellow, far dark purple);
a normal map as the network's output in [0, 1], ×255 truncated to 8 bits. Maps that are already
such 8-bit images are used as they are; measured ones are rendered the same way here:
- depth: a 16-bit PNG (any unit, millimetres usually), a float32 TIFF, a .npy or a .npz ([H,W],
  [H,W,1] or [1,H,W], metres usually). Units do not matter: the rendering is stretched over the
  map's own range. Pixels without a measurement (0, negative or not finite) are drawn as far.
- normal: a .npy or .npz [H,W,3] of unit normals in [-1, 1], drawn as (n + 1) / 2.
"""

import io
import zipfile

import numpy as np
from PIL import Image

from server.errors import InputError
from server.media.decoders.arrays import load_array
from server.media.decoders.costs import check_decode_memory

_BAND_ROWS = 256  # rows rendered at once: only the 8-bit result is held at full size
_MAP_KEYS = ("depth", "normal", "arr_0")  # what np.savez names a map, by preference


def map_array(data: bytes, param: str, kind, max_pixels: int, max_decode_mb: float) -> np.ndarray:
    """The float map in a .npy or a .npz (its one array, or the one named depth/normal/arr_0); NaN and
    infinities kept, as depth sensors write them where they measured nothing."""
    if kind.family == "archive":
        data = _npz_member(data, param, max_decode_mb)
    return load_array(data, param, max_values=3 * max_pixels, limit=f"3 × {max_pixels} (max_image_pixels)",
                      max_decode_mb=max_decode_mb, finite=False)


def _npz_member(data: bytes, param: str, max_decode_mb: float) -> bytes:
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        members = {info.filename.removesuffix(".npy"): info for info in archive.infolist()}
    except (zipfile.BadZipFile, ValueError) as error:
        raise InputError(422, f"field '{param}' holds a ZIP that is not a readable .npz ({error})", param) from None
    name = next((key for key in _MAP_KEYS if key in members), None)
    if name is None and len(members) == 1:
        name = next(iter(members))
    if name is None:
        raise InputError(422, f"field '{param}' holds a .npz of {len(members)} arrays ({', '.join(members)}); "
                              "send one array, or name it depth or normal", param)
    # the size it will have once inflated, from the ZIP's directory: a zip bomb is refused unread
    inflated = members[name].file_size
    check_decode_memory(inflated, max_decode_mb, param, f"a .npz array of {inflated} bytes")
    try:
        return archive.read(members[name])
    except (zipfile.BadZipFile, ValueError, EOFError, OSError) as error:
        raise InputError(422, f"field '{param}' holds a damaged .npz ({error})", param) from None


def depth_image(depth: np.ndarray, param: str) -> Image.Image:
    """RGB: viridis of (far - d) / (far - near) over the measured pixels, unmeasured ones drawn as far."""
    if depth.ndim == 3 and 1 in (depth.shape[0], depth.shape[2]):
        depth = depth.reshape(depth.shape[1:] if depth.shape[0] == 1 else depth.shape[:2])
    if depth.ndim != 2 or 0 in depth.shape:
        raise InputError(422, f"field '{param}' depth map has shape {list(depth.shape)}, expected [H,W] "
                              "(or [H,W,1])", param)
    from matplotlib import colormaps  # imported on first use: a gateway without depth maps never pays for it

    viridis = colormaps["viridis"]
    near, far = _measured_range(depth)
    rgb = np.zeros((*depth.shape, 3), np.uint8)
    for top in range(0, len(depth), _BAND_ROWS):
        band = depth[top:top + _BAND_ROWS].astype(np.float64)
        measured = np.isfinite(band) & (band > 0)
        nearness = np.where(measured, (far - band) / (far - near) if far > near else 0.0, 0.0)
        rgb[top:top + _BAND_ROWS] = viridis(nearness, bytes=True)[..., :3]
    return Image.fromarray(rgb, "RGB")


def _measured_range(depth: np.ndarray) -> tuple[float, float]:
    """(nearest, farthest) measured depth, a band of rows at a time; (0, 0) if nothing was measured."""
    near, far = np.inf, -np.inf
    for top in range(0, len(depth), _BAND_ROWS):
        band = depth[top:top + _BAND_ROWS]
        measured = band[np.isfinite(band) & (band > 0)] if band.dtype.kind == "f" else band[band > 0]
        if measured.size:
            near, far = min(near, float(measured.min())), max(far, float(measured.max()))
    return (near, far) if near <= far else (0.0, 0.0)


def normal_image(normals: np.ndarray, param: str) -> Image.Image:
    """RGB: (n + 1) / 2 clipped to [0, 1], ×255 truncated, as torchvision's ToPILImage saved them.
    [3,H,W] (channels first, as a network's output) is taken too."""
    if normals.ndim == 3 and normals.shape[0] == 3 and normals.shape[2] != 3:
        normals = normals.transpose(1, 2, 0)
    if normals.ndim != 3 or normals.shape[2] != 3 or 0 in normals.shape:
        raise InputError(422, f"field '{param}' normal map has shape {list(normals.shape)}, expected [H,W,3] "
                              "of unit normals in [-1, 1]", param)
    rgb = np.zeros(normals.shape, np.uint8)
    for top in range(0, len(normals), _BAND_ROWS):
        band = (normals[top:top + _BAND_ROWS] + 1) / 2
        rgb[top:top + _BAND_ROWS] = (np.clip(band, 0, 1) * 255).astype(np.uint8)
    return Image.fromarray(rgb, "RGB")
