from server.media.decoders.images import rgbx_tensor
from server.media.modalities.base import Modality, limits

MODALITY = Modality(
    name="rgbd",
    fields=("image", "depth"),
    preprocess=lambda files, options: rgbx_tensor(  # [2, 3, 224, 224]
        files["image"], files["depth"], "depth",
        **limits(options, max_pixels="max_pixels", max_decode_mb="max_decode_mb", cancel="cancel")),
)
