from server.media.decoders.images import rgbx_tensor
from server.media.modalities.base import Modality

MODALITY = Modality(
    name="rgbn",
    fields=("image", "normal"),
    preprocess=lambda files, decoding: rgbx_tensor(  # [2, 3, 224, 224]
        files["image"], files["normal"], "normal", max_pixels=decoding.limits.max_image_pixels,
        max_decode_mb=decoding.limits.max_decode_mb, cancel=decoding.cancel),
)
