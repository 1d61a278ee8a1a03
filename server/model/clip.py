"""The frozen CLIP ViT trunk shared by every modality (ONELLM.md §3, "CLIP vision trunk")."""

from collections.abc import Callable

import torch
from open_clip.transformer import QuickGELU, VisionTransformer
from torch import nn

from server.engines.linear import adopt_linears


def build_visual(weights: dict[str, torch.Tensor], heads: int) -> VisionTransformer:
    """An open_clip VisionTransformer sized from the `clip.visual.*` tensors; no pretrained download.
    Its blocks' layers are taken over by server/engines/linear.py's, which multiply few rows faster
    on a CPU (fMRI's 9 tokens), under the same parameter names."""
    width, _, patch, _ = weights["conv1.weight"].shape  # [W, 3, 14, 14]
    grid = int(round((weights["positional_embedding"].shape[0] - 1) ** 0.5))
    layers = 1 + max(int(k.split(".")[2]) for k in weights if k.startswith("transformer.resblocks."))
    mlp_width = weights["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
    visual = VisionTransformer(
        image_size=grid * patch, patch_size=patch, width=width, layers=layers, heads=heads,
        mlp_ratio=mlp_width / width, output_dim=weights["proj"].shape[1],
        act_layer=QuickGELU)  # OpenAI CLIP was trained with QuickGELU, not GELU
    adopt_linears(visual.transformer)
    return visual


def patch_tokens(visual: VisionTransformer, images: torch.Tensor) -> torch.Tensor:
    """[N, 3, 224, 224] -> [N, 256, W] through CLIP's own patch conv."""
    x = visual.conv1(images)  # [N, W, 16, 16]
    return x.flatten(2).transpose(1, 2)


def run_trunk(visual: VisionTransformer, tokens: torch.Tensor, positions: torch.Tensor,
              between_blocks: Callable[[], None]) -> torch.Tensor:
    """[N, L, W] tokens -> [N, L+1, W]: class token, positions, ln_pre, blocks, ln_post on every token.

    `proj` is not applied. open_clip >= 2.24 runs its transformer batch-first, so the
    tokens go in as (N, L, W); permuting them to (L, N, W) would attend across the batch.
    The blocks run here one by one, not through `visual.transformer`, so that `between_blocks`
    runs before each.
    """
    cls = visual.class_embedding.to(tokens.dtype).expand(tokens.shape[0], 1, -1)
    x = torch.cat([cls, tokens], dim=1) + positions.to(tokens.dtype)
    x = visual.ln_pre(x)
    for block in visual.transformer.resblocks:
        between_blocks()
        x = block(x)
    return visual.ln_post(x)


class Clip(nn.Module):
    """Holds the trunk under `clip.visual` so checkpoint names load unchanged."""

    def __init__(self, visual: VisionTransformer):
        super().__init__()
        self.visual = visual
