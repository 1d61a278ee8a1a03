import torch
from torch import nn


class ImuTokenizer(nn.Conv1d):
    """IMU [B, 6, 400] -> [B, 391, W]."""

    @classmethod
    def from_weights(cls, weights: dict[str, torch.Tensor]) -> "ImuTokenizer":
        width, channels, k = weights["weight"].shape
        return cls(channels, width, kernel_size=k, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).transpose(1, 2)
