from server.media.decoders.images import decode_image, image_tensor
from server.media.modalities.base import Modality, limits

MODALITY = Modality(
    name="image",
    fields=("image",),
    preprocess=lambda files, options: image_tensor(  # [3, 224, 224]
        decode_image(files["image"], "image",
                     **limits(options, max_pixels="max_pixels", max_decode_mb="max_decode_mb"))),
)
