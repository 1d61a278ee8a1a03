"""Universal projection module: 3 LLaMA-style experts mixed by a per-modality router (ONELLM.md §3)."""

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()  # the norm is computed in fp32 whatever the model dtype, as LLaMA does
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class Attention(nn.Module):
    """Bidirectional multi-head attention: no RoPE, no mask, no biases."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.wq = nn.Linear(dim, dim, bias=False)
        self.wk = nn.Linear(dim, dim, bias=False)
        self.wv = nn.Linear(dim, dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = (w(x).view(b, n, self.heads, d // self.heads).transpose(1, 2) for w in (self.wq, self.wk, self.wv))
        y = F.scaled_dot_product_attention(q, k, v)  # [B, H, N, d/H]
        return self.wo(y.transpose(1, 2).reshape(b, n, d))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int, eps: float):
        super().__init__()
        self.attention = Attention(dim, heads)
        self.feed_forward = FeedForward(dim, hidden)
        self.attention_norm = RMSNorm(dim, eps)
        self.ffn_norm = RMSNorm(dim, eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x))
        return x + self.feed_forward(self.ffn_norm(x))


class Router(nn.Module):
    def __init__(self, dim: int, experts: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = torch.sigmoid(self.fc2(F.gelu(self.fc1(x))))  # exact-erf GELU
        return r / r.sum(-1, keepdim=True)


def mix_experts(experts: nn.ModuleList, router: Router, h: torch.Tensor, n_out: int) -> torch.Tensor:
    """h [B, N, W] -> [B, n_out, W]: each expert's first n_out rows weighted by the router."""
    weights = router(h)[:, :n_out]  # [B, n_out, E]
    out = 0
    for k, expert in enumerate(experts):
        y = h
        for block in expert:
            y = block(y)
        out = out + y[:, :n_out] * weights[:, :, k : k + 1]
    return out
