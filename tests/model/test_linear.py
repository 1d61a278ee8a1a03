"""server/engines/linear.py: few float32 rows through oneDNN, many through aten, the same results
either way; CLIP's attention and the in-process LLM taken over without touching their weights."""

import pytest
import torch
import torch.nn.functional as F
from open_clip.transformer import VisionTransformer
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from server.engines.linear import FEW_ROWS, Linear, SelfAttention, adopt_linears, linear
from server.engines.local import LocalEngine


class OpsCalled(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def ops_of(fn) -> list[str]:
    with OpsCalled() as ops:
        fn()
    return ops.names


@pytest.mark.parametrize("rows, onednn", [(1, True), (FEW_ROWS - 1, True), (FEW_ROWS, False)])
def test_few_rows_go_through_onednn_and_many_through_aten_with_the_same_result(rows, onednn):
    torch.manual_seed(0)
    weight, bias = torch.randn(48, 64), torch.randn(48)
    x = torch.randn(1, rows, 80)[..., 8:72]  # a view whose rows are not contiguous, as a slice of a batch is
    ops = ops_of(lambda: linear(x, weight, bias))
    assert ("_linear_pointwise" in ops) == onednn and bool({"mm", "addmm"} & set(ops)) != onednn, ops
    torch.testing.assert_close(linear(x, weight, bias), F.linear(x, weight, bias), atol=1e-5, rtol=1e-5)


def test_other_dtypes_are_left_to_aten():
    x, weight = torch.randn(3, 16, dtype=torch.float64), torch.randn(8, 16, dtype=torch.float64)
    assert "_linear_pointwise" not in ops_of(lambda: linear(x, weight))


@pytest.mark.parametrize("rows", [9, 300])
@torch.inference_mode()
def test_self_attention_computes_what_the_multihead_attention_it_replaces_did(rows):
    """Few rows: projections through oneDNN, attention through SDPA. Many: nn.MultiheadAttention's
    own fused op, as before, to the bit."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(64, 4, batch_first=True).eval()
    nn.init.normal_(mha.in_proj_bias)  # torch starts them at zero, which would hide a bias left out
    x = torch.randn(2, rows // 2, 64)
    expected = mha(x, x, x, need_weights=False)[0]
    attention = SelfAttention(mha)
    ops = ops_of(lambda: attention(x, x, x, need_weights=False))
    out, weights = attention(x, x, x, need_weights=False)
    assert weights is None
    if rows < FEW_ROWS:
        assert "_linear_pointwise" in ops and "_native_multi_head_attention" not in ops, ops
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    else:
        assert "_native_multi_head_attention" in ops, ops
        assert torch.equal(out, expected)


def test_self_attention_refuses_what_it_does_not_compute():
    attention = SelfAttention(nn.MultiheadAttention(16, 2, batch_first=True))
    x = torch.randn(1, 3, 16)
    with pytest.raises(ValueError, match="itself"):
        attention(x, torch.randn(1, 3, 16), x)
    with pytest.raises(ValueError, match="unmasked"):  # nn.MultiheadAttention's masks mean the opposite of SDPA's
        attention(x, x, x, attn_mask=torch.zeros(3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="only batch-first"):
        SelfAttention(nn.MultiheadAttention(16, 2))  # sequence-first


def test_adopting_clips_layers_keeps_every_parameter_under_its_name():
    visual = VisionTransformer(image_size=28, patch_size=14, width=32, layers=2, heads=2, mlp_ratio=4,
                               output_dim=16)
    before = {name: tensor for name, tensor in visual.state_dict().items()}
    adopt_linears(visual.transformer)
    after = visual.state_dict()
    assert after.keys() == before.keys()
    assert all(after[name].data_ptr() == before[name].data_ptr() for name in before)  # the same memory, no copies
    kinds = {type(m) for m in visual.modules()}
    assert nn.MultiheadAttention not in kinds and nn.Linear not in kinds
    assert SelfAttention in kinds and Linear in kinds


def test_the_in_process_llm_decodes_through_the_routed_products(fixture_model):
    engine = LocalEngine(fixture_model / "llm")
    kinds = {type(m) for m in engine.model.modules()}
    assert nn.Linear not in kinds and Linear in kinds
    ops = ops_of(lambda: engine.first_logits(torch.randn(5, engine.model.config.hidden_size)))
    assert "_linear_pointwise" in ops and "addmm" not in ops and "mm" not in ops, ops
