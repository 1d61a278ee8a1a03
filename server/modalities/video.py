from server.inputs.video import video_tensor
from server.modalities.base import Modality

MODALITY = Modality(
    name="video",
    fields=("video",),
    preprocess=lambda files, options: video_tensor(files["video"], "video"),  # [15, 3, 224, 224]
)
