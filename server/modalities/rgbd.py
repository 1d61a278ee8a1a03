from server.inputs.images import rgbx_tensor
from server.modalities.base import Modality

MODALITY = Modality(
    name="rgbd",
    fields=("image", "depth"),
    preprocess=lambda files, options: rgbx_tensor(files["image"], files["depth"], "depth"),  # [2, 3, 224, 224]
)
