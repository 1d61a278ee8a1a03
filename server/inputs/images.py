"""Images (and the depth / normal maps of rgbd / rgbn) → CLIP-normalised tensors (ONELLM.md §4)."""

import io

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from server.errors import InputError
from server.inputs.sniff import check_kind, undecodable

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIZE = 224
MAX_PIXELS = 50_000_000
# The short side is scaled to 224 before cropping: a 1×1,000,000 image would become
# 224×224,000,000. Panoramas stay well inside this.
MAX_ASPECT = 50.0

# Pillow modes with more than 8 bits per sample: `convert("RGB")` clips them at 255.
_WIDE_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


def decode_image(data: bytes, param: str = "image", max_pixels: int = MAX_PIXELS, *,
                 max_aspect: float = MAX_ASPECT) -> Image.Image:
    """Decode an uploaded image to RGB (first frame of animations, EXIF rotation applied).

    413 past `max_pixels` (checked from the header, before decoding); 422 when the long
    side is more than `max_aspect` times the short one."""
    img = _open(data, param, max_pixels).convert("RGB")
    check_aspect(img.size, param, max_aspect)
    return img


def check_aspect(size: tuple[int, int], param: str, max_aspect: float = MAX_ASPECT) -> None:
    long_side, short_side = max(size), min(size)
    if long_side > max_aspect * short_side:
        raise InputError(422, f"field '{param}' is {size[0]}x{size[1]}: sides more than "
                              f"{max_aspect:g} times apart cannot be scaled to 224", param)


def image_tensor(img: Image.Image) -> torch.Tensor:
    """[3,224,224]: short side → 224 bicubic, centre crop, /255, CLIP normalise.

    The same arithmetic as torchvision's Resize(224, BICUBIC) + CenterCrop(224) + ToTensor
    + Normalize on a PIL image (the tests check equality)."""
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


def rgbx_tensor(image: bytes, map_bytes: bytes, map_param: str, *,
                max_pixels: int = MAX_PIXELS) -> torch.Tensor:
    """[2,3,224,224] for rgbd / rgbn: frame 0 the RGB image, frame 1 the depth/normal map
    converted to RGB and resized (bicubic) to the image's size first."""
    rgb = decode_image(image, "image", max_pixels)
    depiction = _map_to_rgb(_open(map_bytes, map_param, max_pixels))
    if depiction.size != rgb.size:
        depiction = depiction.resize(rgb.size, Image.Resampling.BICUBIC)
    return torch.stack([image_tensor(rgb), image_tensor(depiction)]).contiguous()


def _map_to_rgb(img: Image.Image) -> Image.Image:
    # 16-bit and float depth maps (millimetres, metres) would saturate to white under
    # Pillow's conversion; stretch them over 0–255 as a depth rendering would.
    if img.mode not in _WIDE_MODES:
        return img.convert("RGB")
    values = np.asarray(img, dtype=np.float64)
    finite = values[np.isfinite(values)]
    low, high = (finite.min(), finite.max()) if finite.size else (0.0, 0.0)
    scaled = np.zeros_like(values) if high <= low else (values - low) / (high - low) * 255.0
    scaled = np.nan_to_num(scaled, nan=0.0, posinf=255.0, neginf=0.0)
    return Image.fromarray(np.round(scaled).astype(np.uint8)).convert("RGB")


def _open(data: bytes, param: str, max_pixels: int) -> Image.Image:
    """Open, check the size from the header, then decode: a tiny file can declare a huge
    image, so the pixel count is checked before any pixel is decompressed."""
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
                              f"more than the limit of {max_pixels}", param)
    if width == 0 or height == 0:
        raise InputError(422, f"field '{param}' image is empty ({width}x{height})", param)
    try:
        img.load()
    except Exception as error:  # truncated or corrupt pixel data
        what = kind.describe() if kind else f"an image ({img.format})"
        raise InputError(422, f"field '{param}' holds {what} that could not be decoded "
                              f"({error})", param) from error
    try:
        return ImageOps.exif_transpose(img)
    except Exception:  # a malformed EXIF block should not cost the picture its upload
        return img
