from server.inputs.images import decode_image, image_tensor
from server.modalities.base import Modality

MODALITY = Modality(
    name="image",
    fields=("image",),
    preprocess=lambda files, options: image_tensor(decode_image(files["image"], "image")),  # [3, 224, 224]
)
