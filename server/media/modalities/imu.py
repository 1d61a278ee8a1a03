from server.media.decoders.arrays import imu_tensor
from server.media.modalities.base import Modality

MODALITY = Modality(
    name="imu",
    fields=("imu",),
    preprocess=lambda files, decoding: imu_tensor(  # [6, 400]
        files["imu"], decoding.imu_sample_rate, "imu", max_samples=decoding.limits.max_imu_samples,
        max_decode_mb=decoding.limits.max_decode_mb, cancel=decoding.cancel),
    formats=(".npy or CSV, [T,6] or [6,T] (accelerometer xyz, gyroscope xyz; values as given, m/s² and rad/s "
             "assumed), or a CSV whose header names its columns (timestamp, accel_x/ax/acc_x..., gyro_x/gx/wx..., "
             "any order, others ignored): at imu_sample_rate, else the rate of its timestamps (s, ms, µs or ns), "
             "else 200 Hz; resampled to 200 Hz, 2 s"),
)
