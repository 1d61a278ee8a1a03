import torch
from torch import nn


class AudioTokenizer(nn.Conv2d):
    """Fbank [B, 1, 128, 1024] -> [B, 1212, W]: 16x16 patches at stride 10, frequency rows x time columns."""

    @classmethod
    def from_weights(cls, weights: dict[str, torch.Tensor]) -> "AudioTokenizer":
        width, channels, k, _ = weights["weight"].shape
        return cls(channels, width, kernel_size=k, stride=10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).flatten(2).transpose(1, 2)  # [B, W, 12, 101] -> [B, 1212, W]
