from server.media.decoders.points import point_tensor
from server.media.modalities.base import Modality

MODALITY = Modality(
    name="point",
    fields=("point",),
    preprocess=lambda files, decoding: point_tensor(  # [8192, 6]
        files["point"], "point", max_points=decoding.limits.max_points,
        max_decode_mb=decoding.limits.max_decode_mb, cancel=decoding.cancel),
    formats=("a point cloud or mesh: .npy/CSV [N,3] or [N,6] (xyz + rgb in 0-1), PLY, PCD (ascii, binary, "
             "binary_compressed; rgb packed), LAS (rgb 8 or 16-bit; LAZ refused), OBJ, GLB, OFF, STL (meshes sampled on "
             "their surface): centred, scaled to unit radius, 8192 points"),
)
