"""Q4_K blocks as `onellm quantize` writes them, read back by the gguf package's own dequantizer."""

import gguf
import numpy as np
import pytest

from server.tools import q4_k

Q4_K = gguf.GGMLQuantizationType.Q4_K


def read_back(blocks: np.ndarray) -> np.ndarray:
    return gguf.quants.dequantize(blocks, Q4_K)


def test_weights_on_the_formats_grid_come_back_exactly():
    """Rows built from chosen float16 d and dmin, 6-bit scales and mins (all 64 values of each, top
    bits included) and 4-bit levels: a wrong bit of the packing reads back other weights."""
    rng = np.random.default_rng(0)
    blocks, subs = 16, 8
    d = rng.uniform(1e-4, 1e-3, blocks).astype(np.float16).astype(np.float32)
    dmin = rng.uniform(1e-4, 1e-3, blocks).astype(np.float16).astype(np.float32)
    scales = rng.permutation(np.arange(blocks * subs) % 64).reshape(blocks, subs)
    mins = rng.permutation(np.arange(blocks * subs) % 64).reshape(blocks, subs)
    scales[:, 0], mins[:, 1] = 63, 63  # the largest of each block sets d and dmin
    scales[scales == 0] = 1  # a sub-block of zero step is all one value: its levels are not recoverable
    levels = rng.integers(0, 16, (blocks, subs, 32))
    levels[..., 0], levels[..., 1] = 0, 15  # each sub-block spans its whole range
    weights = d[:, None, None] * scales[..., None] * levels - dmin[:, None, None] * mins[..., None]
    rows = weights.reshape(4, -1).astype(np.float32)  # 4 rows of 1,024: 4 blocks each

    encoded = q4_k.quantize(rows)
    assert encoded.shape == (4, 4 * 144) and encoded.dtype == np.uint8
    np.testing.assert_allclose(read_back(encoded), rows, rtol=0, atol=1e-6)


def test_gaussian_weights_round_closer_than_q4_0_in_the_same_bits():
    rng = np.random.default_rng(1)
    rows = (rng.standard_normal((256, 2048)) * 0.02).astype(np.float32)
    rows[7, 300] = 0.4  # an outlier takes its block's scales
    ours = read_back(q4_k.quantize(rows))
    q4_0 = gguf.quants.dequantize(gguf.quants.quantize(rows, gguf.GGMLQuantizationType.Q4_0),
                                  gguf.GGMLQuantizationType.Q4_0)
    ours_rms, q4_0_rms = np.sqrt(np.mean((ours - rows) ** 2)), np.sqrt(np.mean((q4_0 - rows) ** 2))
    # 0.84 of q4_0's when measured; one spacing of the levels (the sub-block's range) instead of the
    # best of five made it 0.88
    assert ours_rms < 0.86 * q4_0_rms
    assert np.abs(ours[7, 300] - 0.4) < 0.4 / 15 / 2  # the outlier keeps half a step of its range


def test_flat_and_one_signed_sub_blocks_keep_their_values():
    rows = np.zeros((3, 256), np.float32)
    rows[0] = 0.25  # flat, positive: no min to subtract
    rows[1, :32] = np.linspace(0.1, 0.2, 32)  # positive, beside zeros
    rows[2] = -np.linspace(0.0, 1.0, 256)  # all at or below zero
    back = read_back(q4_k.quantize(rows))
    assert np.abs(back[0] - 0.25).max() < 0.25 * 2e-3  # float16 d times a 6-bit scale
    assert np.abs(back[1] - rows[1]).max() < 0.2 / 15
    assert np.abs(back[2] - rows[2]).max() < 1.0 / 15


def test_rows_of_no_whole_number_of_blocks_are_refused():
    with pytest.raises(ValueError, match="multiple of 256"):
        q4_k.quantize(np.zeros((2, 128), np.float32))
