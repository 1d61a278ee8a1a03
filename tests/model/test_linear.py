"""server/engines/linear.py: few float32 rows through oneDNN, many through aten, the same results
either way; bfloat16 weights packed in panels or for oneDNN, the same results as plain ones; CLIP's
attention and the in-process LLM taken over without touching their weights."""

import pytest
import torch
import torch.nn.functional as F
from open_clip.transformer import VisionTransformer
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from server.engines import panels
from server.engines.linear import (FEW_ROWS, Linear, SelfAttention, adopt_linears, is_packed, linear, linear_add,
                                   linear_mul, linear_silu, pack_linears)
from server.engines.local import LocalEngine
from server.model import onellm
from server.model.onellm import load_model

BF16_ON_ONEDNN = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
needs_bf16_onednn = pytest.mark.skipif(not BF16_ON_ONEDNN, reason="this CPU's oneDNN has no bfloat16 kernels")
HOST_FLAGS = onellm.host_cpu_flags()
# how bfloat16 weights are packed: into panels (this CPU's own flags, where panels serve them), or
# for oneDNN (flags that do not let panels serve)
PACKINGS = [pytest.param(HOST_FLAGS, id="panels", marks=pytest.mark.skipif(
                not panels.usable(HOST_FLAGS), reason="no AVX512-BF16 or no C compiler here: no panels")),
            pytest.param(frozenset({"avx512_bf16"}), id="onednn")]


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


@needs_bf16_onednn
@pytest.mark.parametrize("cpu_flags", PACKINGS)
@pytest.mark.parametrize("rows", [1, 9, 300])
@torch.inference_mode()
def test_packed_bfloat16_weights_compute_what_the_plain_ones_did(rows, cpu_flags):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(64, 4, batch_first=True)
    nn.init.normal_(mha.in_proj_bias)
    model = nn.Sequential(Linear(64, 64), nn.ReLU())
    model.attention = SelfAttention(mha)
    model = model.to(torch.bfloat16).eval()
    x = torch.randn(1, rows, 80, dtype=torch.bfloat16)[..., 8:72]  # rows not contiguous
    plain_linear, plain_attention = model[0](x), model.attention(x, x, x)[0]
    pack_linears(model, cpu_flags)
    weights = [model[0].weight, model.attention.in_proj_weight, model.attention.out_proj.weight]
    on_panels = panels.usable(cpu_flags)
    assert all(panels.is_panels(w) == on_panels and w.is_mkldnn != on_panels for w in weights)
    assert not is_packed(model.attention.in_proj_bias)
    ops = ops_of(lambda: model.attention(x, x, x))
    assert ("_linear_pointwise" in ops) != on_panels and "_native_multi_head_attention" not in ops, ops
    torch.testing.assert_close(model[0](x), plain_linear, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(model.attention(x, x, x)[0], plain_attention, atol=2e-2, rtol=2e-2)


def after_products(x: torch.Tensor, weight: torch.Tensor, other: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"silu": linear_silu(x, weight), "mul": linear_mul(x, weight, other), "add": linear_add(x, weight, other)}


@needs_bf16_onednn
@pytest.mark.parametrize("cpu_flags", PACKINGS)
@pytest.mark.parametrize("rows", [9, 300])
@torch.inference_mode()
def test_a_packed_product_applies_the_op_after_it_as_the_plain_one_does(rows, cpu_flags):
    """silu, a product or a residual after a packed weight's product come from the product itself
    (no op of their own), with what the plain weight's product and the op after it give; the other
    operand may be a view of a larger tensor, as a residual's first rows are."""
    torch.manual_seed(0)
    layer = Linear(64, 96, bias=False).to(torch.bfloat16)
    x = torch.randn(2, rows, 64, dtype=torch.bfloat16)
    other = torch.randn(2, rows + 5, 96, dtype=torch.bfloat16)[:, :rows]
    plain = after_products(x, layer.weight, other)
    pack_linears(layer, cpu_flags)
    packed = after_products(x, layer.weight, other)
    # panels: C, which torch does not see (beside the output's memory and a copy of a view)
    alone = [] if panels.usable(cpu_flags) else ["_linear_pointwise"]
    for name, op in (("silu", lambda: linear_silu(x, layer.weight)), ("mul", lambda: linear_mul(x, layer.weight, other)),
                     ("add", lambda: linear_add(x, layer.weight, other))):
        assert [op for op in ops_of(op) if op not in ("empty", "empty_like", "contiguous")] == alone, name
    for name in plain:
        torch.testing.assert_close(packed[name], plain[name], atol=3e-2, rtol=2e-2, msg=name)


def test_only_bfloat16_weights_on_a_cpu_are_packed():
    with pytest.raises(ValueError, match="only bfloat16 weights on a CPU"):
        pack_linears(Linear(4, 4), HOST_FLAGS)  # float32


def pack_state(model) -> dict[str, bool]:
    return {name: is_packed(p) for name, p in model.encoder.named_parameters()}


@needs_bf16_onednn
@pytest.mark.parametrize("cpu_flags", PACKINGS)
def test_the_encoder_is_packed_where_the_cpu_computes_bfloat16_natively(fixture_model, monkeypatch, cpu_flags):
    monkeypatch.setattr(onellm, "host_cpu_flags", lambda: cpu_flags)
    packed = load_model(fixture_model, dtype="bfloat16")
    state = pack_state(packed)
    assert not any(v for name, v in state.items() if name.startswith("conv1."))  # one row a call at batch 1
    parts = [f"{part}.weight" for part in ("clip.visual.transformer.resblocks.0.mlp.c_fc",
                                           "resample_layers.0.0.attention.wqkv", "routers.image.fc1",
                                           "clip_proj2.image.0")] + ["clip.visual.transformer.resblocks.0.attn.in_proj_weight"]
    assert all(state[name] for name in parts)
    weights = dict(packed.encoder.named_parameters())
    assert all(panels.is_panels(weights[name]) == panels.usable(cpu_flags) for name in parts)
    monkeypatch.setattr(onellm, "host_cpu_flags", lambda: frozenset())
    plain = load_model(fixture_model, dtype="bfloat16")
    assert not any(pack_state(plain).values())
    exact = load_model(fixture_model, dtype="float32")
    torch.manual_seed(0)
    for modality, x in {"image": torch.randn(2, 3, 224, 224), "fmri": torch.randn(2, 1, 15724)}.items():
        want = exact.encode(modality, x)
        errors = [(m.encode(modality, x).float() - want).abs().max().item() for m in (packed, plain)]
        assert errors[0] <= 1.5 * errors[1], errors  # bfloat16's error, not more


def test_float32_weights_stay_plain(fixture_model, monkeypatch):
    monkeypatch.setattr(onellm, "host_cpu_flags", lambda: frozenset({"avx512_bf16"}))
    assert not any(pack_state(load_model(fixture_model, dtype="float32")).values())
