"""Linear layers on a CPU: float32 products of few rows through oneDNN, bfloat16 on packed weights.

torch's float32 `F.linear` on a CPU calls MKL's sgemm, which is slow for products of few rows:
measured on a 2-core AVX2 EPYC (GFLOP/s, MKL against oneDNN's `_linear_pointwise`, five weights
of the encoder's and the LLM's shapes, each taken in turn from copies no cache holds): 16 rows
31-54 against 69-84, 64 rows 86-112 against 116-129, 128 rows 108-136 against 134-144, 256 rows
127-158 against 142-153 (within about 15 % either way), 512 rows 160-164 against 138-152, and
1,243 rows 176 against 129.
A 1-row product, one decoded token's, read a 4096×11008 weight at 24.8 GB/s through MKL and 34.7
through oneDNN. So the in-process LLM's decode steps go through oneDNN, and an encoder run wherever
it has few rows: fMRI's 9 through CLIP and 39 through the UPM at batch 1, and the UPM's last block's
30 for every modality. Only float32 is routed this way; on a GPU `F.linear` is what runs.

In bfloat16 `F.linear` on a CPU already runs through oneDNN, but on the weight's plain layout. On a
2-core Zen 4 EPYC (AVX512-BF16) the same products on weights packed once into oneDNN's blocked layout
(`pack_linears`) ran faster at every row count from 9 (GFLOP/s, plain against packed, nine weights
of the encoder's and the LLM's shapes from 1024×4096 to 8192×15724): 9 rows 98-148 against 186-263,
30 rows 249-291 against 326-370, 82-100 rows 345-388 against 394-426, 257 rows 384-418 against
415-436, 1,243 rows 352-409 against 383-438. One row is the exception: packed was slower for 7 of
the 9 weights (20-31 GB/s against 26-49), so what multiplies one row a call (the fMRI tokenizer at
batch 1, an LLM's decode step) keeps the plain layout.

Where the CPU has AVX512-BF16 and a C compiler is there, the packed layout is panels of our own
(server/engines/panels.py) instead: oneDNN's products of few rows read their weights from memory at
about half the rate they compute from cache. Measured on the same machine (GFLOP/s, oneDNN's packed
layout against panels, four weights of the encoder's shapes, each read from memory): 9 rows 189-200
against 229-291, 39 rows 350-369 against 390-405, 257 rows 416-431 against 426-445, 1,243 rows
434-447 against 433-450, 9,944 rows 390-444 against 371-449.
"""

import torch
import torch.nn.functional as F
from torch import nn

from server.engines import panels

FEW_ROWS = 256  # below it oneDNN was faster for nearly every shape measured above; from 512, MKL
ONEDNN = torch.backends.mkldnn.is_available()


def routed(x: torch.Tensor) -> bool:
    """Whether products of x [..., in] go to oneDNN: float32 on a CPU, fewer than FEW_ROWS rows."""
    return ONEDNN and x.dtype == torch.float32 and x.device.type == "cpu" and x.numel() < FEW_ROWS * x.shape[-1]


def is_packed(weight: torch.Tensor) -> bool:
    return weight.is_mkldnn or panels.is_panels(weight)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear: x [..., in] @ weight [out, in]ᵀ + bias -> [..., out]; the weight plain or packed."""
    if panels.is_panels(weight):
        return panels.product(x, weight, bias)
    if weight.is_mkldnn or routed(x):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


# A packed weight's product applies what follows it to its float32 sums before rounding them: the
# element-wise op costs no pass of its own (at fMRI's 39 UPM rows a pass costs about as much
# dispatching as computing). Other weights get the same result from the op run after the product.

def linear_silu(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """silu(x @ weightᵀ)"""
    if panels.is_panels(weight):
        return panels.product(x, weight, op="silu")
    if weight.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise(x, weight, None, "swish", [], "")
    return F.silu(linear(x, weight))


def linear_mul(x: torch.Tensor, weight: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """(x @ weightᵀ) * other, other shaped as the product"""
    return _linear_then(x, weight, "mul", other)


def linear_add(x: torch.Tensor, weight: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """x @ weightᵀ + other, other shaped as the product (a residual)"""
    return _linear_then(x, weight, "add", other)


def _linear_then(x: torch.Tensor, weight: torch.Tensor, op: str, other: torch.Tensor) -> torch.Tensor:
    if panels.is_panels(weight):
        return panels.product(x, weight, op=op, other=other)
    if weight.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise.binary(x, other, weight, None, op)
    y = linear(x, weight)
    return y.mul_(other) if op == "mul" else y.add_(other)


class Linear(nn.Linear):
    @classmethod
    def taking_over(cls, other: nn.Linear) -> "Linear":
        """A Linear holding `other`'s parameters themselves (built on the meta device: no new memory)."""
        new = cls(other.in_features, other.out_features, bias=other.bias is not None, device="meta")
        new.weight, new.bias = other.weight, other.bias
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class SelfAttention(nn.Module):
    """nn.MultiheadAttention(batch_first=True) called with query, key and value the same tensor,
    its parameters taken over under the same names. Its fused inference op makes the projections
    itself from plain weights, with MKL in float32: where the products are routed or the weights
    packed, they go through `linear` and the attention through SDPA; elsewhere that op runs as before
    (on a 2-core Zen 4 EPYC in bfloat16 on plain weights, 177 ms a CLIP layer at audio's 1,243 rows
    against 194 through SDPA)."""

    def __init__(self, attention: nn.MultiheadAttention):
        super().__init__()
        if not (attention.batch_first and attention._qkv_same_embed_dim and attention.in_proj_bias is not None
                and attention.bias_k is None):
            raise ValueError("only batch-first self-attention with biases is replaced")
        self.heads = attention.num_heads
        self.in_proj_weight, self.in_proj_bias = attention.in_proj_weight, attention.in_proj_bias  # q, k, v stacked
        self.out_proj = Linear.taking_over(attention.out_proj)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, need_weights: bool = False,
                attn_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, None]:
        if key is not query or value is not query or need_weights or attn_mask is not None:
            raise ValueError("SelfAttention attends a sequence to itself, unmasked, and returns no weights")
        b, n, w = query.shape
        if not (routed(query) or is_packed(self.in_proj_weight)):
            return torch._native_multi_head_attention(
                query, query, query, w, self.heads, self.in_proj_weight, self.in_proj_bias,
                self.out_proj.weight, self.out_proj.bias, None, False)[0], None
        qkv = linear(query, self.in_proj_weight, self.in_proj_bias)  # [B, N, 3W]
        q, k, v = qkv.view(b, n, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)  # 3 × [B, H, N, W/H]
        y = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(y.transpose(1, 2).reshape(b, n, w)), None


def pack_linears(module: nn.Module, cpu_flags: frozenset[str]) -> None:
    """Packs the bfloat16 weights of every Linear and SelfAttention in `module`, on a CPU with
    `cpu_flags`, in place of the plain ones (the plain copy is freed, not kept beside it): into
    panels (server/engines/panels.py) where the CPU and the weight's shape allow, else into oneDNN's
    blocked layout. Packed weights serve only these layers' products: nothing may move or cast them
    afterwards."""
    use_panels = panels.usable(cpu_flags)
    if not (ONEDNN or use_panels):
        return
    for layer in module.modules():
        if isinstance(layer, Linear):
            layer.weight = _packed(layer.weight, use_panels)
        elif isinstance(layer, SelfAttention):
            layer.in_proj_weight = _packed(layer.in_proj_weight, use_panels)  # its out_proj is a Linear: packed above


def _packed(weight: nn.Parameter, use_panels: bool) -> nn.Parameter:
    if weight.dtype != torch.bfloat16 or weight.device.type != "cpu":
        raise ValueError(f"only bfloat16 weights on a CPU are packed, not {weight.dtype} on {weight.device}")
    if use_panels and panels.packable(weight):
        return panels.pack(weight)
    if not ONEDNN:
        return weight
    return nn.Parameter(torch.ops.mkldnn._reorder_linear_weight(weight.detach()), requires_grad=False)


def adopt_linears(module: nn.Module) -> None:
    """Replaces, in a module built by another library (open_clip's CLIP, transformers' LLaMA), each
    nn.Linear and each nn.MultiheadAttention by the forms above, which take over their parameters."""
    for name, child in module.named_children():
        if isinstance(child, nn.MultiheadAttention):
            setattr(module, name, SelfAttention(child))
        elif type(child) is nn.Linear:
            setattr(module, name, Linear.taking_over(child))
        else:
            adopt_linears(child)
