import torch
from torch import nn

CENTRES = 1024
NEIGHBOURS = 32


def furthest_point_sample(xyz: torch.Tensor, n: int) -> torch.Tensor:
    """xyz [B, N, 3] -> indices [B, n]: start at 0, then the point furthest from the chosen set.

    Ties go to the first index (argmax's rule), so the result is deterministic.
    """
    b, count, _ = xyz.shape
    chosen = torch.zeros(b, n, dtype=torch.long, device=xyz.device)
    nearest = torch.full((b, count), float("inf"), dtype=xyz.dtype, device=xyz.device)
    rows = torch.arange(b, device=xyz.device)
    last = torch.zeros(b, dtype=torch.long, device=xyz.device)
    for i in range(1, n):
        d = (xyz - xyz[rows, last].unsqueeze(1)).pow(2).sum(-1)  # [B, N]
        nearest = torch.minimum(nearest, d)
        last = nearest.argmax(-1)
        chosen[:, i] = last
    return chosen


def group_neighbours(points: torch.Tensor, coords: torch.Tensor, centres: torch.Tensor, k: int) -> torch.Tensor:
    """The raw channels of each centre's k nearest points: [B, N, C] -> [B, C, n, k]."""
    centre_coords = torch.gather(coords, 1, centres.unsqueeze(-1).expand(-1, -1, coords.shape[-1]))  # [B, n, 3]
    nearest = torch.cdist(centre_coords, coords).topk(k, dim=-1, largest=False).indices  # [B, n, k]
    b, n, _ = nearest.shape
    grouped = torch.gather(points, 1, nearest.reshape(b, n * k, 1).expand(-1, -1, points.shape[-1]))
    return grouped.view(b, n, k, -1).permute(0, 3, 1, 2)


class PointTokenizer(nn.Module):
    """Cloud [B, N, 6] -> [B, 1024, W]: FPS centres, 32-NN groups, 1x1 conv, max over each group.

    Sampling and grouping use channels 3:6, as the released weights were trained; the conv
    sees the raw 6 channels of each neighbour, not centre-relative ones.
    """

    def __init__(self, channels: int, width: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, width, kernel_size=1)

    @classmethod
    def from_weights(cls, weights: dict[str, torch.Tensor]) -> "PointTokenizer":
        width, channels, _, _ = weights["conv1.weight"].shape
        return cls(channels, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        coords = x[..., 3:].float()  # fp32 so low-precision models pick the same neighbours
        centres = furthest_point_sample(coords, CENTRES)
        groups = group_neighbours(x, coords, centres, NEIGHBOURS)  # [B, 6, 1024, 32]
        return self.conv1(groups).amax(-1).transpose(1, 2)  # [B, W, 1024] -> [B, 1024, W]
