from server.media.decoders.images import rgbx_tensor
from server.media.modalities.base import Modality

MODALITY = Modality(
    name="rgbd",
    fields=("image", "depth"),
    preprocess=lambda files, decoding: rgbx_tensor(  # [2, 3, 224, 224]
        files["image"], files["depth"], "depth", max_pixels=decoding.limits.max_image_pixels,
        max_decode_mb=decoding.limits.max_decode_mb, cancel=decoding.cancel),
    formats=("depth: an 8-bit image as the authors' maps (used as is); a 16-bit PNG (mm), float32 TIFF, .npy or .npz "
             "[H,W] (m): drawn as Omnidata's demo drew depth (viridis, near yellow, stretched over the map's range)"),
)
