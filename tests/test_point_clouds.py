"""Point clouds as lidar and depth-camera tools write them: PCL's PCD (ascii, binary, binary_compressed)
and ASPRS LAS, each giving the tensor the same points give as PLY and .npy (server/media/decoders)."""

import numpy as np
import pytest
import torch
import trimesh

from inputs_files import las_bytes, npy_bytes, pcd_bytes
from server.errors import InputError
from server.media.decoders.lzf import lzf_decompress
from server.media.decoders.points import point_tensor
from server.media.sniff import sniff

ENCODINGS = ["ascii", "binary", "binary_compressed"]


def error_of(call, *args, **kwargs) -> InputError:
    with pytest.raises(InputError) as caught:
        call(*args, **kwargs)
    return caught.value


def scan(n: int = 3000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """float32 xyz (a wall with a box in front, as a scanner sees it) and uint8 colours."""
    rng = np.random.default_rng(seed)
    xyz = np.concatenate([rng.uniform(-2, 2, (n, 2)), rng.normal(3, 0.05, (n, 1))], axis=1).astype(np.float32)
    return xyz, rng.integers(0, 256, (n, 3), dtype=np.uint8)


def as_ply(xyz: np.ndarray, rgb8: np.ndarray | None) -> bytes:
    colours = None if rgb8 is None else np.concatenate([rgb8, np.full((len(rgb8), 1), 255, np.uint8)], axis=1)
    return trimesh.PointCloud(xyz, colors=colours).export(file_type="ply")


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("rgb_type", ["F", "U"])
def test_each_pcd_encoding_gives_the_tensor_of_the_same_points_in_ply(encoding, rgb_type):
    xyz, rgb8 = scan()
    pcd = pcd_bytes(xyz, rgb8, encoding, rgb_type, extra=True)
    assert sniff(pcd).name == "PCD"
    expected = point_tensor(as_ply(xyz, rgb8))
    assert torch.equal(point_tensor(pcd), expected)
    # the colours are the packed ones, not zero: the same points without them are another input
    assert not torch.equal(point_tensor(pcd_bytes(xyz, None, encoding)), expected)


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_colourless_pcd_equals_the_xyz_npy(encoding):
    xyz, _ = scan(seed=1)
    assert torch.equal(point_tensor(pcd_bytes(xyz, None, encoding)), point_tensor(npy_bytes(xyz.astype(np.float64))))


def test_pcd_points_without_a_return_are_dropped():
    xyz, rgb8 = scan(seed=2)
    holes = xyz.copy()
    holes[::7] = np.nan  # an organised cloud's pixels that saw nothing
    kept = np.isfinite(holes).all(axis=1)
    assert torch.equal(point_tensor(pcd_bytes(holes, rgb8, "binary")), point_tensor(as_ply(xyz[kept], rgb8[kept])))


def test_ascii_colour_written_as_the_float_of_its_bits_is_read_too():
    xyz, rgb8 = scan(50, seed=3)
    binary = pcd_bytes(xyz, rgb8, "binary")
    header, _, body = binary.partition(b"DATA binary\n")
    records = np.frombuffer(body, [("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("rgb", "<f4")])
    rows = "".join(" ".join(repr(float(v)) for v in record) + "\n" for record in records.tolist())
    assert torch.equal(point_tensor(header + b"DATA ascii\n" + rows.encode()), point_tensor(binary))


def test_lzf_decoder_undoes_liblzf_including_overlapping_references():
    import imagecodecs

    for raw in (b"abc" * 1000, b"a" * 5000, np.linspace(0, 1, 20_000).astype(np.float32).tobytes(),
                np.random.default_rng(4).integers(0, 256, 3000, dtype=np.uint8).tobytes()):
        assert lzf_decompress(imagecodecs.lzf_encode(raw), len(raw)) == raw
    compressed = imagecodecs.lzf_encode(b"abc" * 1000)
    with pytest.raises(ValueError, match="declared"):
        lzf_decompress(compressed, 100)
    with pytest.raises(ValueError):
        lzf_decompress(compressed[:-3], 3000)


def test_pcd_errors_name_the_format():
    xyz, rgb8 = scan(100, seed=5)
    good = pcd_bytes(xyz, rgb8, "ascii")
    cut = good[: len(good) // 2]
    error = error_of(point_tensor, cut)
    assert error.status == 422 and "point cloud (PCD)" in error.message and "CSV" not in error.message
    error = error_of(point_tensor, good.replace(b"DATA ascii", b"DATA packed"))
    assert error.status == 422 and "PCD" in error.message and "packed" in error.message
    error = error_of(point_tensor, good.replace(b"FIELDS x y z", b"FIELDS u v w"))
    assert error.status == 422 and "no x, y and z" in error.message
    compressed = pcd_bytes(xyz, rgb8, "binary_compressed")
    error = error_of(point_tensor, compressed[:-20])
    assert error.status == 422 and "PCD" in error.message
    assert error_of(point_tensor, pcd_bytes(xyz, rgb8, "binary"), max_points=50).status == 413
    commented = b"# written by a scanner\n" + good.split(b"\n", 1)[1]
    assert torch.equal(point_tensor(commented), point_tensor(good))


@pytest.mark.parametrize("depth", [8, 16])
def test_las_gives_the_tensor_of_the_same_points_as_npy(depth):
    xyz, rgb8 = scan(seed=6)
    xyz = np.round(xyz.astype(np.float64), 3)  # on the LAS grid of 1 mm
    rgb = rgb8.astype(np.uint16) * (257 if depth == 16 else 1)
    data = las_bytes(xyz, rgb)
    assert sniff(data).name == "LAS"
    reference = np.concatenate([xyz, rgb8 / 255.0], axis=1)
    assert torch.allclose(point_tensor(data), point_tensor(npy_bytes(reference)), atol=1e-6)
    colourless = point_tensor(las_bytes(xyz, None))
    assert torch.allclose(colourless, point_tensor(npy_bytes(xyz)), atol=1e-6)


def test_laz_is_refused_by_name():
    data = bytearray(las_bytes(*scan(10, seed=7)[:1], None))
    data[104] |= 0x80  # the point format byte's compression bit, as LAZ writers set it
    error = error_of(point_tensor, bytes(data))
    assert error.status == 415 and "LAZ" in error.message
