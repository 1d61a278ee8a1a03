"""Property-based fuzzing of every decoder in server/media/decoders with real files made here, then
truncated, corrupted (random byte flips, many in the header) or sent to the wrong decoder.

The one exception a decoder may raise is InputError with a 4xx status naming its field; each
example has a bound on the growth of the process's peak RSS while it is decoded (reset before
each example). How long the slowest example takes: bench/timings.py fuzz. The decoders get limits like the gateway's
(`Settings.decoder_limits`), small ones, as a corrupt header may claim any size up to them.
"""

import numpy as np
import pytest
import torch
import trimesh
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import inputs_files as files
from peak_memory import peak_growth
from server.errors import InputError
from server.media.decoders.arrays import fmri_tensor, imu_tensor
from server.media.decoders.audio import audio_tensor
from server.media.decoders.images import decode_image, image_tensor, rgbx_tensor
from server.media.decoders.points import point_tensor
from server.media.decoders.video import video_tensor

EXAMPLES = 300  # per decoder
FMRI_VOXELS = 15724
MB = 1 << 20
DECODE_MB = 64  # max_decode_mb given to every decoder: what a header may make it plan to hold
# Peak RSS growth one example may cause: what the decoder may plan (DECODE_MB, checked before it
# decodes), codec contexts and allocator slack (32 MB), and what follows from the bytes themselves
# whatever a header claims: a CSV held as text (1×) and as float64 (≤ 4× at ≥ 2 bytes a value),
# an .npy of bytes as float64 (8×), with the finiteness mask; 16× covers them.
SLACK_BYTES = 32 * MB
BYTES_PER_INPUT_BYTE = 16


def _picture(width: int = 48, height: int = 40) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _mesh(fmt: str) -> bytes:
    mesh = trimesh.creation.icosphere(subdivisions=1)
    mesh.visual.vertex_colors = np.tile([200, 30, 60, 255], (len(mesh.vertices), 1))
    exported = mesh.export(file_type=fmt)
    return exported.encode() if isinstance(exported, str) else exported


def _seeds() -> dict[str, dict[str, bytes]]:
    """Valid files of every kind the decoders read, by decoder family."""
    frames = [np.full((48, 64, 3), level, np.uint8) for level in range(0, 250, 25)]
    tone = files.tone(440, 0.5, 16000)
    cloud = np.random.default_rng(1).normal(size=(300, 6))
    imu = np.random.default_rng(2).normal(size=(120, 6))
    fmri = np.random.default_rng(3).normal(size=(2, FMRI_VOXELS)).astype(np.float32)
    depth_mm = np.arange(48 * 40, dtype=np.uint16).reshape(40, 48)
    depth = files.image_bytes(Image.fromarray(depth_mm), "PNG")
    xyz, rgb8 = cloud[:, :3].astype(np.float32), (cloud[:, 3:] % 1 * 255).astype(np.uint8)
    timestamped = np.concatenate([np.arange(len(imu))[:, None] * 10.0, imu], axis=1)
    return {
        "image": {fmt: files.image_bytes(_picture(), fmt) for fmt in ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")}
        | {"depth PNG": depth},
        "map": {"PNG": files.image_bytes(_picture(), "PNG"), "depth PNG": depth,
                "depth npy": files.npy_bytes(depth_mm / 1000.0)},
        "video": {"mp4": files.video_bytes(frames, "mp4"), "webm": files.video_bytes(frames, "webm", "libvpx-vp9"),
                  "mov": files.video_bytes(frames, "mov")},
        "audio": {fmt: files.sound_bytes(tone, 16000, fmt) for fmt in ("WAV", "FLAC", "OGG")}
        | {"m4a": files.audio_only_mp4(0.5)},
        "point": {"npy": files.npy_bytes(cloud), "csv": files.csv_bytes(cloud)}
        | {fmt: _mesh(fmt) for fmt in ("ply", "obj", "stl", "glb", "off")}
        | {f"pcd {data}": files.pcd_bytes(xyz, rgb8, data) for data in ("ascii", "binary", "binary_compressed")}
        | {"las": files.las_bytes(xyz.astype(np.float64), rgb8.astype(np.uint16) * 257)},
        "imu": {"npy": files.npy_bytes(imu), "csv": files.csv_bytes(imu, header="ax,ay,az,gx,gy,gz"),
                "logger csv": files.csv_bytes(timestamped, header="timestamp,gx,gy,gz,ax,ay,az")},
        "fmri": {"npy": files.npy_bytes(fmri), "csv": files.csv_bytes(fmri[:1].T)},
    }


SEEDS = _seeds()
VALID_IMAGE = SEEDS["image"]["PNG"]

# decoder -> (family of its own seeds, call, shape of a good result)
DECODERS = {
    "image": ("image", lambda d: image_tensor(decode_image(d, "image", max_pixels=1_000_000,
                                                           max_decode_mb=DECODE_MB)), (3, 224, 224)),
    "depth": ("map", lambda d: rgbx_tensor(VALID_IMAGE, d, "depth", max_pixels=1_000_000,
                                             max_decode_mb=DECODE_MB), (2, 3, 224, 224)),
    "video": ("video", lambda d: video_tensor(d, "video", max_duration_s=30, max_frame_pixels=1_000_000,
                                              max_decoded_frames=300, max_decode_mb=DECODE_MB), (15, 3, 224, 224)),
    "audio": ("audio", lambda d: audio_tensor(d, "audio", max_duration_s=30, max_decode_mb=DECODE_MB),
              (1, 128, 1024)),
    "point": ("point", lambda d: point_tensor(d, "point", max_points=100_000, max_decode_mb=DECODE_MB), (8192, 6)),
    "imu": ("imu", lambda d: imu_tensor(d, 200.0, "imu", max_samples=10_000, max_decode_mb=DECODE_MB), (6, 400)),
    "fmri": ("fmri", lambda d: fmri_tensor(d, "fmri", max_repeats=4, max_decode_mb=DECODE_MB), (1, FMRI_VOXELS)),
}


@st.composite
def damaged(draw, family: str) -> bytes:
    """A seed file, of the decoder's own family or (mislabelled) any other, maybe damaged."""
    own = draw(st.booleans())
    pool = SEEDS[family] if own else {k: v for f, s in SEEDS.items() if f != family for k, v in s.items()}
    data = bytearray(pool[draw(st.sampled_from(sorted(pool)))])
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data) - 1))]
    if data:
        positions = st.one_of(st.integers(0, min(len(data), 64) - 1), st.integers(0, len(data) - 1))
        for at, mask in draw(st.lists(st.tuples(positions, st.integers(1, 255)), max_size=12)):
            data[at] ^= mask
    return bytes(data)


@pytest.fixture(scope="module")
def warm_decoders():
    """The first calls load codecs and plugins: not what an example costs."""
    for family, call, _ in DECODERS.values():
        call(next(iter(SEEDS[family].values())))


@pytest.mark.parametrize("name", DECODERS)
def test_a_decoder_answers_any_bytes_with_a_tensor_or_a_4xx(name, warm_decoders):
    family, call, shape = DECODERS[name]

    @given(data=damaged(family))
    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    def check(data: bytes):
        with peak_growth() as growth:
            try:
                result = call(data)
            except InputError as error:
                result = error
        bound = DECODE_MB * MB + SLACK_BYTES + BYTES_PER_INPUT_BYTE * len(data)
        assert growth.added <= bound, f"{growth.added / MB:.0f} MB for {len(data)} bytes"
        if isinstance(result, InputError):
            assert 400 <= result.status < 500, result
            assert result.param == name, result
            return
        assert isinstance(result, torch.Tensor) and tuple(result.shape) == shape
        assert torch.isfinite(result).all()

    check()


@pytest.mark.parametrize("name", DECODERS)
def test_every_seed_of_its_own_kind_decodes(name):
    family, call, shape = DECODERS[name]
    for data in SEEDS[family].values():
        assert tuple(call(data).shape) == shape
