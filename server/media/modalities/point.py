from server.media.decoders.points import point_tensor
from server.media.modalities.base import Modality

MODALITY = Modality(
    name="point",
    fields=("point",),
    preprocess=lambda files, decoding: point_tensor(  # [8192, 6]
        files["point"], "point", max_points=decoding.limits.max_points,
        max_decode_mb=decoding.limits.max_decode_mb, cancel=decoding.cancel),
)
