from server.media.decoders.arrays import imu_tensor
from server.media.modalities.base import Modality

MODALITY = Modality(
    name="imu",
    fields=("imu",),
    preprocess=lambda files, decoding: imu_tensor(  # [6, 400]
        files["imu"], decoding.imu_sample_rate, "imu", max_samples=decoding.limits.max_imu_samples,
        max_decode_mb=decoding.limits.max_decode_mb, cancel=decoding.cancel),
)
