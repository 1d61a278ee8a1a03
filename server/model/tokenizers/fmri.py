import torch

from server.engines.linear import Linear


class FmriTokenizer(Linear):
    """Voxels [B, 1, 15724] -> [B, 8, W]: one linear layer to 8W, read row-major as [W, 8]."""

    @classmethod
    def from_weights(cls, weights: dict[str, torch.Tensor]) -> "FmriTokenizer":
        out_features, in_features = weights["weight"].shape
        return cls(in_features, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)  # [B, 1, 8W]
        return y.reshape(y.shape[0], -1, 8).transpose(1, 2)  # [B, W, 8] -> the 8 columns are the tokens
