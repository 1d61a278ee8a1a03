"""server/engines/panels.py: bfloat16 products on weights packed in panels, by C compiled on first
use, against float32 products rounded once; where the C cannot be built, oneDNN's products."""

import pytest
import torch
import torch.nn.functional as F

from server.engines import linear, panels
from server.model.dtype import host_cpu_flags

pytestmark = pytest.mark.skipif(not panels.usable(host_cpu_flags()),
                                reason="no AVX512-BF16 or no C compiler here: products on panels cannot run")

AFTER = {"none": lambda y, other: y, "silu": lambda y, other: F.silu(y), "mul": lambda y, other: y * other, "add": lambda y, other: y + other}


def rounded_once(x, weight, bias, op, other):
    """The product and what follows it in float32 from the bfloat16 operands, rounded at the end."""
    y = x.float() @ weight.float().T + (0 if bias is None else bias.float())
    return AFTER[op](y, None if other is None else other.float()).bfloat16()


@pytest.mark.parametrize("op", list(AFTER))
@pytest.mark.parametrize("rows", [1, 12, 13, 39, 300])  # up to 12 rows a block in registers; 300: two chunks of rows
@pytest.mark.parametrize("k", [64, 2048])  # 2048: rows 4 KiB apart, at most 6 a block
@torch.inference_mode()
def test_a_product_on_panels_is_the_float32_product_rounded_once(op, rows, k):
    torch.manual_seed(rows)
    weight, bias = torch.randn(96, k, dtype=torch.bfloat16), torch.randn(2 * 96, dtype=torch.bfloat16)[::2]  # a view
    x = torch.randn(2, rows, k + 16, dtype=torch.bfloat16)[..., 8 : k + 8]  # rows not contiguous
    other = torch.randn(2, rows + 3, 96, dtype=torch.bfloat16)[:, :rows] if op in ("mul", "add") else None
    got = panels.product(x, panels.pack(weight), bias, op, other)
    want = rounded_once(x, weight, bias, op, other)
    assert got.shape == (2, rows, 96)
    # sums of k products in another order: float32's rounding, then at most a bfloat16 step apart
    torch.testing.assert_close(got.float(), want.float(), atol=1e-3 * k ** 0.5, rtol=2 ** -7)


def test_panels_hold_the_weight_column_by_column_in_pairs_along_k():
    weight = torch.arange(64 * 6, dtype=torch.float32).view(64, 6).bfloat16()
    packed = panels.pack(weight)  # [N/32, K/2, 32, 2]
    assert packed.shape == (2, 3, 32, 2)
    assert torch.equal(packed[1, 2, 5], weight[32 + 5, 4:6])


def test_only_weights_of_whole_panels_are_packed_into_panels():
    flags = host_cpu_flags()
    layer = linear.Linear(64, 3).to(torch.bfloat16)  # a router's 3 experts: not a multiple of 32
    linear.pack_linears(layer, flags)
    assert layer.weight.is_mkldnn and not panels.is_panels(layer.weight)


def test_operands_the_c_would_misread_are_refused():
    weight = panels.pack(torch.randn(32, 64, dtype=torch.bfloat16))
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="bfloat16 rows"):
        panels.product(x.float(), weight)
    with pytest.raises(TypeError, match="bfloat16 bias"):
        panels.product(x, weight, bias=torch.randn(32))
    for wrong in (dict(x=torch.randn(2, 48, dtype=torch.bfloat16)), dict(bias=torch.randn(16, dtype=torch.bfloat16)),
                  dict(other=torch.randn(3, 32, dtype=torch.bfloat16), op="add")):
        with pytest.raises(ValueError, match="do not fit a weight of 32×64"):
            panels.product(**{"x": x, "panels": weight, **wrong})


@pytest.fixture
def fresh_library(monkeypatch, tmp_path):
    """panels.library() built again, into an empty cache folder; the one already loaded afterwards."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    panels.library.cache_clear()
    yield tmp_path
    panels.library.cache_clear()


def test_the_library_is_compiled_once_into_the_cache_folder(fresh_library, caplog):
    caplog.set_level("INFO", logger="onellm.engines")
    assert panels.library() is not None
    assert "run on panels" in caplog.text  # which products run is in the server's log
    built = list((fresh_library / "onellm-serve").glob("panel_linear-*.so"))
    assert len(built) == 1 and not list((fresh_library / "onellm-serve").glob("*.tmp"))
    panels.library.cache_clear()
    mtime = built[0].stat().st_mtime_ns
    assert panels.library() is not None and built[0].stat().st_mtime_ns == mtime  # loaded, not compiled again


@pytest.mark.parametrize("compiler, cache", [("/nonexistent/cc", None), ("false", None),  # none there; one that fails
                                             ("cc", "/proc/no-cache-here")])  # a cache folder it cannot write
def test_without_a_compiler_bfloat16_weights_are_packed_for_onednn(fresh_library, monkeypatch, compiler, cache, caplog):
    monkeypatch.setenv("CC", compiler)
    if cache:
        monkeypatch.setenv("XDG_CACHE_HOME", cache)
    assert not panels.usable(host_cpu_flags())
    assert "oneDNN" in caplog.text
    layer = linear.Linear(64, 64).to(torch.bfloat16)
    linear.pack_linears(layer, host_cpu_flags())
    assert layer.weight.is_mkldnn
