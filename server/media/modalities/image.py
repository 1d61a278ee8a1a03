from server.media.decoders.images import decode_image, image_tensor
from server.media.modalities.base import Modality

MODALITY = Modality(
    name="image",
    fields=("image",),
    preprocess=lambda files, decoding: image_tensor(  # [3, 224, 224]
        decode_image(files["image"], "image", decoding.limits.max_image_pixels,
                     max_decode_mb=decoding.limits.max_decode_mb)),
    formats=("JPEG, PNG (8/16-bit, alpha dropped), WebP, GIF (first frame), BMP, TIFF, AVIF (HEIC refused by name): "
             "RGB, EXIF rotation applied, short side to 224 (bicubic), centre crop"),
)
