"""Images (and the depth / normal maps of rgbd / rgbn) → CLIP-normalised tensors (ONELLM.md §4)."""

import io
import math
import threading

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from server.errors import InputError
from server.media.decoders.costs import MAX_DECODE_MB, check_cancelled, check_decode_memory
from server.media.decoders.maps import depth_image, map_array, normal_image
from server.media.sniff import check_kind, undecodable

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIZE = 224
MAX_PIXELS = 50_000_000
# The short side is scaled to 224 before cropping: a 1×1,000,000 image would become
# 224×224,000,000. Panoramas stay well inside this.
MAX_ASPECT = 50.0

# Pillow modes with more than 8 bits per sample: `convert("RGB")` clips them at 255.
_WIDE_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
_MAP_LAYOUT = {depth_image: "[H,W] depths", normal_image: "[H,W,3] normals in [-1, 1]"}


def decode_image(data: bytes, param: str = "image", max_pixels: int = MAX_PIXELS, *,
                 max_aspect: float = MAX_ASPECT, max_decode_mb: float = MAX_DECODE_MB) -> Image.Image:
    """Decode an uploaded image to RGB (first frame of animations, EXIF rotation applied).

    413 past `max_pixels` or past `max_decode_mb` of working memory (both from the header,
    before decoding); 422 when the long side is more than `max_aspect` times the short one."""
    img = _open(data, param, max_pixels, max_decode_mb)
    if img.mode != "RGB":
        img = img.convert("RGB")
    check_aspect(img.size, param, max_aspect)
    return img


def _bytes_per_pixel(img: Image.Image) -> int:
    """Working memory per pixel of decoding `img`: Pillow keeps 1 byte a pixel for 1/L/P, 2 for
    16-bit and 4 for the rest (RGB is stored as RGBX); then an upright copy when EXIF rotates
    it, the RGB conversion, and a depth map's RGB rendering."""
    decoded = 1 if img.mode in ("1", "L", "P") else 2 if img.mode.startswith("I;16") else 4
    rotated = decoded if _exif_orientation(img) not in (None, 1) else 0
    converted = 4 if img.mode != "RGB" else 0
    return decoded + rotated + converted + (3 if img.mode in _WIDE_MODES else 0)


def _exif_orientation(img: Image.Image) -> int | None:
    try:
        return img.getexif().get(0x0112)
    except Exception:  # a malformed EXIF block: exif_transpose will not rotate either
        return None


def check_aspect(size: tuple[int, int], param: str, max_aspect: float = MAX_ASPECT) -> None:
    long_side, short_side = max(size), min(size)
    if long_side > max_aspect * short_side:
        raise InputError(422, f"field '{param}' is {size[0]}x{size[1]} pixels, its sides {long_side / short_side:.0f} "
                              f"times apart: past {max_aspect:g} times, scaling the short side to 224 would make an "
                              "image too long to crop; crop or pad it first", param)


def image_tensor(img: Image.Image) -> torch.Tensor:
    """[3,224,224]: short side → 224 bicubic, centre crop, /255, CLIP normalise.

    The same arithmetic as torchvision's Resize(224, BICUBIC) + CenterCrop(224) + ToTensor
    + Normalize on a PIL image (the tests check equality)."""
    if img.mode != "RGB":  # convert() to the same mode is a full-size copy
        img = img.convert("RGB")
    width, height = img.size
    if width <= height:
        size = (SIZE, int(SIZE * height / width))
    else:
        size = (int(SIZE * width / height), SIZE)
    img = img.resize(size, Image.Resampling.BICUBIC)
    left = int(round((size[0] - SIZE) / 2.0))
    top = int(round((size[1] - SIZE) / 2.0))
    img = img.crop((left, top, left + SIZE, top + SIZE))
    pixels = torch.from_numpy(np.asarray(img, dtype=np.float32) / np.float32(255.0))
    return normalize(pixels.permute(2, 0, 1))


def normalize(pixels: torch.Tensor) -> torch.Tensor:
    """CLIP mean/std over the channel axis of [..., 3, H, W] values in 0–1."""
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=torch.float32).view(3, 1, 1)
    return ((pixels - mean) / std).contiguous()


def rgbx_tensor(image: bytes, map_bytes: bytes, map_param: str, *, max_pixels: int = MAX_PIXELS,
                max_decode_mb: float = MAX_DECODE_MB, cancel: threading.Event | None = None) -> torch.Tensor:
    """[2,3,224,224] for rgbd / rgbn: frame 0 the RGB image, frame 1 the depth map (`map_param`
    "depth") or normal map ("normal") drawn as the authors' maps were (maps.py) and resized
    (bicubic) to the image's size first."""
    rgb = decode_image(image, "image", max_pixels, max_decode_mb=max_decode_mb)
    size, image_frame = rgb.size, image_tensor(rgb)
    del rgb  # only its size is needed now: the map is decoded without it alongside
    check_cancelled(cancel)
    depiction = _depiction(map_bytes, map_param, max_pixels, max_decode_mb)
    if depiction.size != size:
        depiction = depiction.resize(size, Image.Resampling.BICUBIC)
    return torch.stack([image_frame, image_tensor(depiction)]).contiguous()


def _depiction(data: bytes, param: str, max_pixels: int, max_decode_mb: float) -> Image.Image:
    """The map as the RGB image the model saw: 8-bit images as they are; 16-bit and float images,
    .npy and .npz arrays drawn by maps.py."""
    draw = normal_image if param == "normal" else depth_image
    expected = f"an image or a .npy/.npz array ({_MAP_LAYOUT[draw]})"
    kind = check_kind(data, param, {"image", "array", "archive"}, expected)
    if kind is not None and kind.family in ("array", "archive"):
        if kind.family == "archive" and kind.name != "NPZ":
            raise InputError(415, f"field '{param}' holds {kind.describe()}, expected {expected}", param)
        values = map_array(data, param, kind, max_pixels, max_decode_mb)
        pixels = math.prod(values.shape[:2]) if values.ndim >= 2 else 0
        if pixels > max_pixels:
            raise InputError(413, f"field '{param}' map has {pixels} pixels, more than the limit of "
                                  f"{max_pixels} (max_image_pixels)", param)
        return draw(values, param)
    img = _open(data, param, max_pixels, max_decode_mb)
    if img.mode not in _WIDE_MODES:
        return img.convert("RGB")
    if draw is normal_image:
        raise InputError(422, f"field '{param}' is a one-channel {img.mode} image, not a normal map: send "
                              "an RGB image or a .npy [H,W,3] of normals in [-1, 1]", param)
    return depth_image(np.asarray(img), param)


def _open(data: bytes, param: str, max_pixels: int, max_decode_mb: float = MAX_DECODE_MB) -> Image.Image:
    """Open, check the size from the header, then decode: a tiny file can declare a huge
    image, so the pixel count and the memory it takes are checked before any pixel is
    decompressed."""
    kind = check_kind(data, param, {"image"}, "an image")
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as error:  # past twice Pillow's own limit
        raise InputError(413, f"field '{param}' image is too large ({error})", param) from None
    except UnidentifiedImageError as error:
        # Pillow did not recognise it at all: not an image format we read.
        what = f"holds {kind.describe()}, a format we cannot read" if kind else \
            "is not an image in a format we can read"
        raise InputError(415, f"field '{param}' {what}", param) from error
    except Exception as error:  # Pillow plugins raise many types on bad headers
        raise undecodable(param, kind, "an image", error) from error
    width, height = img.size
    if width * height > max_pixels:
        raise InputError(413, f"field '{param}' image has {width}x{height} pixels, "
                              f"more than the limit of {max_pixels} (max_image_pixels)", param)
    if width == 0 or height == 0:
        raise InputError(422, f"field '{param}' image is empty ({width}x{height})", param)
    check_decode_memory(width * height * _bytes_per_pixel(img), max_decode_mb, param,
                        f"an image of {width}x{height} ({img.mode})")
    try:
        img.load()
    except Exception as error:  # truncated or corrupt pixel data
        what = kind.describe() if kind else f"an image ({img.format})"
        raise InputError(422, f"field '{param}' holds {what} that could not be decoded "
                              f"({error})", param) from error
    if _exif_orientation(img) in (None, 1):
        return img  # exif_transpose would return a full-size copy
    try:
        return ImageOps.exif_transpose(img)
    except Exception:  # a malformed EXIF block should not cost the picture its upload
        return img
