from server.media.decoders.arrays import fmri_tensor
from server.media.modalities.base import Modality

MODALITY = Modality(
    name="fmri",
    fields=("fmri",),
    preprocess=lambda files, decoding: fmri_tensor(  # [1, 15724]
        files["fmri"], "fmri", max_repeats=decoding.limits.max_fmri_repeats,
        max_decode_mb=decoding.limits.max_decode_mb, cancel=decoding.cancel),
    formats=(".npy or CSV of NSD nsdgeneral voxels, [15724] or [R,15724]: the mean over repeats"),
)
