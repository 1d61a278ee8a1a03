"""Universal projection module: 3 LLaMA-style experts mixed by a per-modality router (ONELLM.md §3)."""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from server.engines.linear import Linear, linear_add, linear_mul, linear_silu

# rows per expert (B × N) up to which the 3 experts run block by block together: one op per norm,
# attention and residual instead of three (2-4 % of the UPM's time at 39 to 2,296 rows on a 2-core
# Zen 4); above it one expert at a time, which holds one expert's activations, not three
SIDE_BY_SIDE_ROWS = 2048


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., W] normalized, times weight (broadcast): in fp32 whatever the model dtype, as LLaMA
    does; rms_norm is one pass over the rows where the written-out formula made five."""
    return F.rms_norm(x.float(), x.shape[-1:], eps=eps).type_as(x) * weight


class Attention(nn.Module):
    """Bidirectional multi-head attention: no RoPE, no mask, no biases."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.wqkv = Linear(dim, 3 * dim, bias=False)  # the checkpoint's wq, wk, wv stacked: one product
        self.wo = Linear(dim, dim, bias=False)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """The checkpoint's wq, wk and wv load as wqkv's rows, in that order."""
        names = [f"{prefix}w{part}.weight" for part in "qkv"]
        if all(name in state_dict for name in names):
            state_dict[f"{prefix}wqkv.weight"] = torch.cat([state_dict.pop(name) for name in names])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = Linear(dim, hidden, bias=False)
        self.w2 = Linear(hidden, dim, bias=False)
        self.w3 = Linear(dim, hidden, bias=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """residual + w2(silu(w1 x) * w3 x)"""
        gated = linear_mul(x, self.w3.weight, linear_silu(x, self.w1.weight))
        return linear_add(gated, self.w2.weight, residual)


class Block(nn.Module):
    """One expert's transformer block; blocks run through `run_blocks`, one or several at a time."""

    def __init__(self, dim: int, heads: int, hidden: int, eps: float):
        super().__init__()
        self.attention = Attention(dim, heads)
        self.feed_forward = FeedForward(dim, hidden)
        self.attention_norm = RMSNorm(dim, eps)
        self.ffn_norm = RMSNorm(dim, eps)


def _together(tensors: list[torch.Tensor]) -> torch.Tensor:
    return tensors[0].unsqueeze(0) if len(tensors) == 1 else torch.stack(tensors)


def run_blocks(blocks: list[Block], x: torch.Tensor, n_out: int | None = None) -> torch.Tensor:
    """x [G, B, N, W] -> [G, B, n_out or N, W]: blocks[g] on x[g]; rows past n_out still serve as
    keys and values. Only the products are made block by block: the norms, the attention and the
    residuals of the G blocks are one op each."""
    g, b, n, w = x.shape
    heads, eps, m = blocks[0].attention.heads, blocks[0].attention_norm.eps, n_out or n
    norm_weights = _together([block.attention_norm.weight for block in blocks])[:, None, None]  # [G, 1, 1, W]
    h = rms_norm(x, norm_weights, eps)
    qkv = _together([block.attention.wqkv(h[i]) for i, block in enumerate(blocks)])  # [G, B, N, 3W]
    q, k, v = qkv.view(g * b, n, 3, heads, w // heads).permute(2, 0, 3, 1, 4)  # 3 × [G·B, H, N, W/H]
    y = F.scaled_dot_product_attention(q[:, :, :m], k, v).transpose(1, 2).reshape(g, b, m, w)
    x = _together([linear_add(y[i], block.attention.wo.weight, x[i, :, :m]) for i, block in enumerate(blocks)])
    norm_weights = _together([block.ffn_norm.weight for block in blocks])[:, None, None]
    h = rms_norm(x, norm_weights, eps)
    return _together([block.feed_forward(h[i], x[i]) for i, block in enumerate(blocks)])


class Router(nn.Module):
    def __init__(self, dim: int, experts: int):
        super().__init__()
        self.fc1 = Linear(dim, 4 * dim)
        self.fc2 = Linear(4 * dim, experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = torch.sigmoid(self.fc2(F.gelu(self.fc1(x))))  # exact-erf GELU
        return r / r.sum(-1, keepdim=True)


def mix_experts(experts: nn.ModuleList, router: Router, h: torch.Tensor, n_out: int,
                between_blocks: Callable[[], None]) -> torch.Tensor:
    """h [B, N, W] -> [B, n_out, W]: each expert's first n_out rows weighted by the router.

    Only the first n_out rows of an expert's output are read, so its last block computes just
    those past its products of q, k and v (attending to all N). Experts on at most
    SIDE_BY_SIDE_ROWS rows run side by side, block j of each together; larger inputs one expert at a
    time, which holds one expert's activations instead of all of them. `between_blocks` runs before
    each block or blocks run together.
    """
    weights = router(h[:, :n_out]).permute(2, 0, 1).unsqueeze(-1)  # [E, B, n_out, 1]; the router works row by row
    group = len(experts) if h.shape[0] * h.shape[1] <= SIDE_BY_SIDE_ROWS else 1
    out = 0
    for first in range(0, len(experts), group):
        chosen = experts[first : first + group]
        y = h.expand(len(chosen), *h.shape)  # [G, B, N, W]
        for depth in range(len(chosen[0])):
            between_blocks()
            y = run_blocks([expert[depth] for expert in chosen], y, n_out if depth == len(chosen[0]) - 1 else None)
        out = out + (y * weights[first : first + group]).sum(0)
    return out
