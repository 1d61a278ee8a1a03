import torch
from torch import nn

from server.media.decoders.arrays import imu_tensor
from server.media.modalities.base import Modality, limits


class ImuTokenizer(nn.Conv1d):
    """IMU [B, 6, 400] -> [B, 391, W]."""

    @classmethod
    def from_weights(cls, weights: dict[str, torch.Tensor]) -> "ImuTokenizer":
        width, channels, k = weights["weight"].shape
        return cls(channels, width, kernel_size=k, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).transpose(1, 2)


def preprocess(files, options) -> torch.Tensor:
    return imu_tensor(files["imu"], float(options.get("imu_sample_rate", 200.0)), "imu",  # [6, 400]
                      **limits(options, max_samples="max_imu_samples", max_decode_mb="max_decode_mb",
                               cancel="cancel"))


MODALITY = Modality(name="imu", fields=("imu",), preprocess=preprocess, tokenizer=ImuTokenizer.from_weights)
