"""Universal projection module: 3 LLaMA-style experts mixed by a per-modality router (ONELLM.md §3)."""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from server.engines.linear import Linear


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # computed in fp32 whatever the model dtype, as LLaMA does; rms_norm is one pass over the
        # rows where the written-out formula made five
        return F.rms_norm(x.float(), x.shape[-1:], eps=self.eps).type_as(x) * self.weight


class Attention(nn.Module):
    """Bidirectional multi-head attention: no RoPE, no mask, no biases."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.wq = Linear(dim, dim, bias=False)
        self.wk = Linear(dim, dim, bias=False)
        self.wv = Linear(dim, dim, bias=False)
        self.wo = Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor, n_queries: int | None = None) -> torch.Tensor:
        """x [B, N, W] -> [B, n_queries or N, W]: the first n_queries rows attend to all N."""
        b, n, d = x.shape
        q = self.wq(x[:, :n_queries])
        q = q.view(b, q.shape[1], self.heads, d // self.heads).transpose(1, 2)
        k, v = (w(x).view(b, n, self.heads, d // self.heads).transpose(1, 2) for w in (self.wk, self.wv))
        y = F.scaled_dot_product_attention(q, k, v)  # [B, H, n_queries, d/H]
        return self.wo(y.transpose(1, 2).reshape(b, q.shape[2], d))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = Linear(dim, hidden, bias=False)
        self.w2 = Linear(hidden, dim, bias=False)
        self.w3 = Linear(dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int, eps: float):
        super().__init__()
        self.attention = Attention(dim, heads)
        self.feed_forward = FeedForward(dim, hidden)
        self.attention_norm = RMSNorm(dim, eps)
        self.ffn_norm = RMSNorm(dim, eps)

    def forward(self, x: torch.Tensor, n_out: int | None = None) -> torch.Tensor:
        """x [B, N, W] -> [B, n_out or N, W]; rows past n_out still serve as keys and values."""
        x = x[:, :n_out] + self.attention(self.attention_norm(x), n_out)
        return x + self.feed_forward(self.ffn_norm(x))


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
    those (attending to all N): for audio's 1,243 rows that block costs ~2 % of a full one.
    `between_blocks` runs before each block.
    """
    weights = router(h[:, :n_out])  # [B, n_out, E]; the router works row by row
    out = 0
    for k, expert in enumerate(experts):
        y = h
        for block in expert[:-1]:
            between_blocks()
            y = block(y)
        between_blocks()
        out = out + expert[-1](y, n_out) * weights[:, :, k : k + 1]
    return out
