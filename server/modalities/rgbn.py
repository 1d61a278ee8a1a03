from server.inputs.images import rgbx_tensor
from server.modalities.base import Modality

MODALITY = Modality(
    name="rgbn",
    fields=("image", "normal"),
    preprocess=lambda files, options: rgbx_tensor(files["image"], files["normal"], "normal"),  # [2, 3, 224, 224]
)
