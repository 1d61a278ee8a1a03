from server.media.decoders.images import rgbx_tensor
from server.media.modalities.base import Modality

MODALITY = Modality(
    name="rgbn",
    fields=("image", "normal"),
    preprocess=lambda files, decoding: rgbx_tensor(  # [2, 3, 224, 224]
        files["image"], files["normal"], "normal", max_pixels=decoding.limits.max_image_pixels,
        max_decode_mb=decoding.limits.max_decode_mb, cancel=decoding.cancel),
    formats=("normal: an 8-bit RGB image ((n+1)/2); a .npy or .npz [H,W,3] of unit normals in [-1, 1], drawn the same way"),
)
