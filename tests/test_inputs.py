"""server/media/decoders: real uploaded files → the modality tensors of ONELLM.md §4."""

import io
import pickle
from fractions import Fraction

import numpy as np
import pytest
import torch
import trimesh
from PIL import Image

from inputs_files import (audio_only_mp4, csv_bytes, halves_frame, image_bytes, level_frames,
                          npy_bytes, png_with_declared_size, sound_bytes, tone, video_bytes)
from server.errors import InputError
from server.media.decoders import video as video_module
from server.media.decoders.arrays import fmri_tensor, imu_tensor, load_array
from server.media.decoders.audio import audio_tensor, decode_audio, kaldi_fbank
from server.media.decoders.images import CLIP_MEAN, CLIP_STD, decode_image, image_tensor, rgbx_tensor
from server.media.decoders.points import point_tensor
from server.media.decoders.video import video_tensor

MEAN = torch.tensor(CLIP_MEAN).view(3, 1, 1)
STD = torch.tensor(CLIP_STD).view(3, 1, 1)
RED = ((torch.tensor([1.0, 0, 0]).view(3, 1, 1) - MEAN) / STD).view(3)
BLUE = ((torch.tensor([0, 0, 1.0]).view(3, 1, 1) - MEAN) / STD).view(3)
PAD = 4.2677393 / (2 * 4.5689974)  # an all-zero (padded) fbank frame after normalising


def error_of(call, *args, **kwargs) -> InputError:
    with pytest.raises(InputError) as caught:
        call(*args, **kwargs)
    return caught.value


def assert_tensor(tensor: torch.Tensor, shape: tuple) -> None:
    assert tensor.shape == shape
    assert tensor.dtype == torch.float32
    assert tensor.is_contiguous()
    assert torch.isfinite(tensor).all()


def red_png() -> bytes:
    return image_bytes(Image.new("RGB", (300, 200), (255, 0, 0)), "PNG")


def wav(seconds: float = 1.0, rate: int = 16000) -> bytes:
    return sound_bytes(tone(1000, seconds, rate), rate)


# ---------------------------------------------------------------------------- images

@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"])
def test_decode_image_formats(fmt):
    img = decode_image(image_bytes(Image.new("RGB", (40, 30), (10, 200, 30)), fmt))
    assert img.mode == "RGB" and img.size == (40, 30)


def test_all_red_image_is_the_normalised_red_everywhere():
    tensor = image_tensor(decode_image(red_png()))
    assert_tensor(tensor, (3, 224, 224))
    assert torch.allclose(tensor, RED.view(3, 1, 1).expand(3, 224, 224), atol=1e-6)


@pytest.mark.parametrize("size", [(300, 200), (200, 300), (224, 224), (225, 500), (100, 50), (7, 1)])
def test_image_transform_equals_torchvision(size):
    from torchvision import transforms as T

    reference = T.Compose([T.Resize(224, interpolation=T.InterpolationMode.BICUBIC),
                           T.CenterCrop(224), T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)])
    pixels = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    img = Image.fromarray(pixels)
    assert torch.equal(image_tensor(img), reference(img))


def test_alpha_and_greyscale_become_rgb():
    rgba = Image.new("RGBA", (50, 50), (255, 0, 0, 0))
    assert decode_image(image_bytes(rgba, "PNG")).getpixel((0, 0)) == (255, 0, 0)
    grey = decode_image(image_bytes(Image.new("L", (50, 50), 128), "PNG"))
    assert grey.mode == "RGB" and grey.getpixel((0, 0)) == (128, 128, 128)


def test_exif_rotation_is_applied():
    img = Image.new("RGB", (60, 20), (0, 255, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    assert decode_image(image_bytes(img, "JPEG", exif=exif)).size == (20, 60)


def test_animated_image_gives_its_first_frame():
    frames = [Image.new("RGB", (20, 20), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    data = image_bytes(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert decode_image(data).getpixel((5, 5)) == (255, 0, 0)


def test_pixel_limit_is_checked_from_the_header():
    error = error_of(decode_image, png_with_declared_size(8000, 8000))  # 64 MP > 50 MP
    assert error.status == 413 and "8000x8000" in error.message
    assert error_of(decode_image, png_with_declared_size(100_000, 100_000)).status == 413
    small = image_bytes(Image.new("RGB", (100, 100)), "PNG")
    assert error_of(decode_image, small, max_pixels=5000).status == 413
    assert decode_image(small, max_pixels=10_000).size == (100, 100)


def test_extreme_aspect_ratio_is_refused_before_the_resize():
    strip = image_bytes(Image.new("RGB", (5100, 100)), "PNG")
    assert error_of(decode_image, strip).status == 422
    error = error_of(decode_image, image_bytes(Image.new("RGB", (1080, 4)), "PNG"))
    assert "is 1080x4 pixels, its sides 270 times apart" in error.message and "crop or pad" in error.message
    assert decode_image(image_bytes(Image.new("RGB", (4900, 100)), "PNG")).size == (4900, 100)
    assert error_of(video_tensor, video_bytes([np.zeros((2, 200, 3), np.uint8)] * 3)).status == 422


def test_image_field_errors():
    error = error_of(decode_image, wav(), "photo")
    assert (error.status, error.param) == (415, "photo")
    assert "holds audio (WAV), expected an image" in error.message
    assert error_of(decode_image, b"just some words").status == 415
    assert error_of(decode_image, b"").status == 422
    png = image_bytes(Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)),
                      "PNG")
    assert error_of(decode_image, png[: len(png) // 2]).status in (415, 422)
    assert error_of(decode_image, png[:12]).status in (415, 422)


def test_rgbd_stacks_image_and_16_bit_depth_drawn_near_yellow_far_purple():
    from matplotlib import colormaps

    depth = np.full((100, 150), 4000, np.uint16)  # half the image's size, millimetres
    depth[:, :75] = 1000  # near on the left
    depth[:10, 140:] = 0  # no measurement: drawn as far, and not the far end of the range
    data = rgbx_tensor(red_png(), image_bytes(Image.fromarray(depth), "PNG"), "depth")
    assert_tensor(data, (2, 3, 224, 224))
    assert torch.equal(data[0], image_tensor(decode_image(red_png())))
    near, far = (torch.tensor(colormaps["viridis"](v, bytes=True)[:3]).view(3, 1, 1) / 255.0 for v in (1.0, 0.0))
    # resized to 300×200, short side → 224: the map's halves meet at column 168 of 336, the crop starts at 56
    assert torch.allclose(data[1][:, :, :100], ((near - MEAN) / STD).expand(3, 224, 100), atol=1e-5)
    assert torch.allclose(data[1][:, 40:, 124:], ((far - MEAN) / STD).expand(3, 184, 100), atol=1e-5)


def test_rgbn_normal_map_keeps_its_colours_and_reports_its_own_field():
    normal = image_bytes(Image.new("RGB", (300, 200), (128, 128, 255)), "PNG")
    data = rgbx_tensor(red_png(), normal, "normal")
    expected = (torch.tensor([128, 128, 255]) / 255.0 - MEAN.view(3)) / STD.view(3)
    assert torch.allclose(data[1, :, 100, 100], expected, atol=1e-5)
    error = error_of(rgbx_tensor, red_png(), b"not an image", "normal")
    assert (error.status, error.param) == (415, "normal")


# ---------------------------------------------------------------------------- video

CONTAINERS = [("mp4", "h264"), ("mp4", "mpeg4"), ("webm", "libvpx"), ("webm", "libvpx-vp9"),
              ("mov", "h264"), ("matroska", "h264"), ("avi", "mpeg4")]
LEVELS = [8 * i for i in range(30)]  # 30 frames at 10 fps: 3 s; frame i is grey level 8·i


def grey_levels(tensor: torch.Tensor) -> list[float]:
    """The grey level (0–255) of the centre crop of each sampled frame."""
    pixels = tensor[1::3] * STD + MEAN
    return [round(float(frame.mean()) * 255, 1) for frame in pixels]


@pytest.mark.parametrize("fmt,codec", CONTAINERS)
def test_video_containers_pick_the_first_frame_of_each_clip(fmt, codec):
    data = video_tensor(video_bytes(level_frames(LEVELS), fmt, codec))
    assert_tensor(data, (15, 3, 224, 224))
    # 3 s: clips start at k·(3 − 1)/5 = 0, .4, .8, 1.2, 1.6 s → frames 0, 4, 8, 12, 16
    assert grey_levels(data) == pytest.approx([0, 32, 64, 96, 128], abs=4)


@pytest.mark.parametrize("fmt,codec", [("mp4", "h264"), ("webm", "libvpx-vp9")])
def test_each_clip_takes_the_first_frame_at_or_after_its_start(fmt, codec):
    # 23 frames at 10 fps, 2.3 s (WebM states no frame count: decord estimates it from the
    # container's duration): clips start at k·1.3/5 = 0, .26, .52, .78, 1.04 s → frames
    # 0, 3, 6, 8, 11 (not 0, 4, 7, 10, 13 as with starts at k·1.3/4)
    data = video_tensor(video_bytes(level_frames(LEVELS[:23]), fmt, codec))
    assert grey_levels(data) == pytest.approx([0, 24, 48, 64, 88], abs=4)


@pytest.mark.parametrize("gop", [1, 4, 1000])
def test_seeking_and_decoding_from_the_start_pick_the_same_frames(gop, monkeypatch):
    data = video_bytes(level_frames(LEVELS), gop=gop)
    by_seeking = video_tensor(data)

    def missed(*args):
        raise video_module._SeekMissed

    monkeypatch.setattr(video_module, "_seek_frame", missed)
    assert torch.equal(video_tensor(data), by_seeking)
    assert grey_levels(by_seeking) == pytest.approx([0, 32, 64, 96, 128], abs=4)


def test_video_with_fewer_frames_than_clips_repeats_the_last():
    # 2 frames at 0.5 fps: shown at 0 and 2 s, 4 s long; clips at 0, .6, 1.2, 1.8, 2.4 s,
    # and no frame starts at or after 2.4 s
    data = video_tensor(video_bytes(level_frames([40, 200]), "mp4", "mpeg4", fps=Fraction(1, 2)))
    assert grey_levels(data) == pytest.approx([40, 200, 200, 200, 200], abs=4)


def test_video_shorter_than_a_second_takes_its_first_frame_five_times():
    data = video_tensor(video_bytes(level_frames([100, 180, 250])))
    assert grey_levels(data) == pytest.approx([100] * 5, abs=4)


@pytest.mark.parametrize("width,height", [(96, 48), (48, 96)])
def test_three_crops_run_along_the_long_side(width, height):
    data = video_tensor(video_bytes([halves_frame(width, height)] * 10))
    start, centre, end = data[0], data[1], data[2]
    # short side → 224, long → 448: the start crop is all red, the end crop all blue
    inner = (slice(None), slice(8, -8), slice(8, -8))
    assert torch.allclose(start[inner].mean((1, 2)), RED, atol=0.05)
    assert torch.allclose(end[inner].mean((1, 2)), BLUE, atol=0.05)
    # the centre crop straddles the boundary: red first, blue second
    first, second = (centre[:, 8:100, 8:-8], centre[:, 124:-8, 8:-8]) if height > width else \
        (centre[:, 8:-8, 8:100], centre[:, 8:-8, 124:-8])
    assert torch.allclose(first.mean((1, 2)), RED, atol=0.05)
    assert torch.allclose(second.mean((1, 2)), BLUE, atol=0.05)
    assert torch.equal(data[3:6], data[0:3])  # still frames: every clip alike


@pytest.mark.parametrize("rotation,first,last", [(90, BLUE, RED), (-90, RED, BLUE), (180, BLUE, RED)])
def test_display_rotation_is_applied(rotation, first, last):
    # stored landscape, red left / blue right; turned for display
    data = video_tensor(video_bytes([halves_frame(96, 48)] * 5, rotation=rotation))
    inner = (slice(None), slice(8, -8), slice(8, -8))
    assert torch.allclose(data[0][inner].mean((1, 2)), first, atol=0.05)
    assert torch.allclose(data[2][inner].mean((1, 2)), last, atol=0.05)


def test_video_field_errors():
    error = error_of(video_tensor, b"this is a text file, not a video", "clip")
    assert (error.status, error.param) == (415, "clip")
    assert "holds text, expected a video" in error.message
    assert "holds an image (PNG)" in error_of(video_tensor, red_png()).message
    assert error_of(video_tensor, wav()).status == 415
    mp4 = video_bytes(level_frames(LEVELS))
    assert error_of(video_tensor, mp4[: len(mp4) // 2]).status in (415, 422)
    assert error_of(video_tensor, mp4[:40]).status in (415, 422)
    error = error_of(video_tensor, audio_only_mp4())
    assert error.status == 422 and "no video stream" in error.message


def test_video_limits():
    mp4 = video_bytes(level_frames(LEVELS))
    assert error_of(video_tensor, mp4, max_frame_pixels=64 * 47).status == 413
    assert error_of(video_tensor, mp4, max_duration_s=2.5).status == 413
    assert error_of(video_tensor, mp4, max_decoded_frames=5).status == 413


# ---------------------------------------------------------------------------- audio

def mel(hz: float) -> float:
    return 1127.0 * np.log(1 + hz / 700.0)


def mel_bin_of(hz: float, bins: int = 128) -> int:
    """The filter whose centre is nearest `hz` on Kaldi's mel scale (20 Hz – 8 kHz)."""
    delta = (mel(8000) - mel(20)) / (bins + 1)
    centres = mel(20) + delta * np.arange(1, bins + 1)
    return int(np.argmin(np.abs(centres - mel(hz))))


@pytest.mark.parametrize("fmt,subtype", [("WAV", None), ("FLAC", None), ("OGG", "VORBIS"),
                                         ("MP3", "MPEG_LAYER_III")])
@pytest.mark.parametrize("rate", [16000, 44100])
def test_tone_peaks_in_its_mel_bin(fmt, subtype, rate):
    data = audio_tensor(sound_bytes(tone(1000, 3.0, rate), rate, fmt, subtype))
    assert_tensor(data, (1, 128, 1024))
    frames = 1 + (48000 - 400) // 160  # 298 whole 25 ms windows every 10 ms in 3 s
    spectrum = data[0, :, 5:frames - 5].mean(1)
    assert int(spectrum.argmax()) == mel_bin_of(1000)
    assert torch.all(data[0, :, frames:] == PAD)


def test_frame_count_and_padding_follow_the_kaldi_formula():
    data = audio_tensor(wav(3.0))
    # 1 + (48000 − 400) // 160 = 298 frames: columns 0–297 hold the tone, the rest padding
    assert (data[0, mel_bin_of(1000), :298] != PAD).all()
    assert (data[0, :, 298:] == PAD).all()
    long = audio_tensor(wav(12.0))  # past 10.24 s: cut, nothing padded
    assert (long[0, mel_bin_of(1000)] != PAD).all()


def test_resampling_keeps_the_duration_and_the_scale():
    for rate in (16000, 22050, 44100, 48000):
        waveform = decode_audio(sound_bytes(tone(1000, 2.0, rate), rate))
        assert len(waveform) == 32000
        assert waveform.dtype == np.float32
        assert 0.49 < np.abs(waveform[1000:-1000]).max() < 0.51  # int16 WAV read as ±1 floats


def test_first_channel_is_used():
    left, right = tone(1000, 2.0, 16000), tone(3000, 2.0, 16000)
    data = audio_tensor(sound_bytes(np.stack([left, right], 1), 16000))
    assert int(data[0, :, 10:190].mean(1).argmax()) == mel_bin_of(1000)
    data = audio_tensor(sound_bytes(np.stack([right, left], 1), 16000))
    assert int(data[0, :, 10:190].mean(1).argmax()) == mel_bin_of(3000)


@pytest.mark.parametrize("bins", [64, 80])
def test_fbank_equals_kaldi_native_fbank(bins):
    import kaldi_native_fbank as knf

    rng = np.random.default_rng(0)
    waveform = (0.1 * rng.standard_normal(8000) + tone(440, 0.5, 16000, 0.3)).astype(np.float32)
    options = knf.FbankOptions()
    options.frame_opts.dither = 0.0
    options.frame_opts.window_type = "hanning"
    options.mel_opts.num_bins = bins
    options.use_energy = False
    options.htk_compat = True
    reference = knf.OnlineFbank(options)
    reference.accept_waveform(16000, waveform.tolist())
    reference.input_finished()
    expected = np.array([reference.get_frame(i) for i in range(reference.num_frames_ready)])
    ours = kaldi_fbank(waveform, bins)
    assert ours.shape == expected.shape == (1 + (8000 - 400) // 160, bins)
    np.testing.assert_allclose(ours, expected, atol=2e-3)


def test_empty_mel_bin_is_log_epsilon_as_in_torchaudio():
    # At 128 bins over a 512-point FFT, filter 3 (≈48–93 Hz) holds no FFT bin.
    noise = np.random.default_rng(0).standard_normal(16000).astype(np.float32)
    fbank = kaldi_fbank(noise)
    assert np.allclose(fbank[:, 3], np.log(np.finfo(np.float32).eps))
    assert (fbank[:, [2, 4]] > -15).all()


def test_m4a_is_decoded_through_pyav():
    data = audio_tensor(audio_only_mp4(seconds=2.0))
    assert int(data[0, :, 20:180].mean(1).argmax()) == mel_bin_of(440)


def test_audio_shorter_than_a_window_is_all_padding():
    assert torch.all(audio_tensor(sound_bytes(tone(1000, 0.01, 16000), 16000)) == PAD)


def test_audio_field_errors():
    error = error_of(audio_tensor, red_png())
    assert (error.status, error.param) == (415, "audio")
    assert error.message == "field 'audio' holds an image (PNG), expected audio"
    assert error_of(audio_tensor, b"hello, this is text").status == 415
    data = wav(2.0)
    assert error_of(audio_tensor, data[: len(data) // 2]).status == 422
    assert error_of(audio_tensor, data[:20]).status in (415, 422)
    assert error_of(audio_tensor, sound_bytes(np.zeros(0), 16000)).status == 422
    nan = sound_bytes(np.full(1600, np.nan), 16000, subtype="FLOAT")
    assert error_of(audio_tensor, nan).status == 422
    assert error_of(audio_tensor, video_bytes(level_frames([0] * 10))).status == 415
    assert error_of(audio_tensor, data, max_duration_s=1.0).status == 413


# ---------------------------------------------------------------------------- points

def cloud(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.normal(size=(n, 3)) * 3 + 7, rng.random((n, 3))], axis=1)


def assert_normalised(points: torch.Tensor) -> None:
    assert_tensor(points, (8192, 6))
    xyz = points[:, :3].double()
    assert torch.allclose(xyz.mean(0), torch.zeros(3, dtype=torch.float64), atol=1e-6)
    assert xyz.norm(dim=1).max().item() == pytest.approx(1.0, abs=1e-6)


def test_npy_points_are_repeated_cyclically_with_rgb_untouched():
    points = cloud(100)
    data = point_tensor(npy_bytes(points))
    assert_normalised(data)
    assert torch.equal(data[:100], data[100:200])
    assert torch.equal(data[8100:8192], data[:92])  # 8192 = 81·100 + 92
    assert np.allclose(data[:100, 3:].numpy(), points[:, 3:], atol=1e-7)


def test_many_points_are_subsampled_by_even_strides():
    points = cloud(20_000)
    points[:, 3] = np.arange(20_000)  # the row number rides in the red channel
    data = point_tensor(npy_bytes(points))
    assert_normalised(data)
    assert np.array_equal(data[:, 3].numpy(), np.arange(8192) * 20_000 // 8192)


def test_normalisation_ignores_position_and_scale():
    points = cloud(8192)
    moved = points.copy()
    moved[:, :3] = moved[:, :3] * 0.01 - 50
    assert torch.allclose(point_tensor(npy_bytes(points)), point_tensor(npy_bytes(moved)), atol=1e-5)


def test_xyz_only_points_get_zero_colour():
    data = point_tensor(npy_bytes(cloud(500)[:, :3]))
    assert_normalised(data)
    assert torch.all(data[:, 3:] == 0)


def test_csv_points():
    data = point_tensor(csv_bytes(cloud(300), header="x,y,z,r,g,b"))
    assert_normalised(data)


def exported(geometry, file_type: str) -> bytes:
    data = geometry.export(file_type=file_type)
    return data.encode() if isinstance(data, str) else data  # text formats come back as str


def coloured_box() -> trimesh.Trimesh:
    box = trimesh.creation.box()
    box.visual.vertex_colors = np.tile([255, 0, 0, 255], (len(box.vertices), 1))
    return box


@pytest.mark.parametrize("file_type", ["ply", "obj", "glb"])
def test_meshes_are_sampled_on_their_surface_with_vertex_colours(file_type):
    mesh_file = exported(coloured_box(), file_type)
    data = point_tensor(mesh_file)
    assert_normalised(data)
    assert torch.allclose(data[:, 3:], torch.tensor([1.0, 0, 0]).expand(8192, 3))
    # every point lies on a face of the box: its largest |coordinate| is the half-side
    # (up to the centring by the sample mean, which is close to the box centre)
    extent = data[:, :3].abs().max(dim=1).values
    assert (extent.max() - extent.min()).item() < 0.02
    assert torch.equal(point_tensor(mesh_file), data)  # the same file, the same points


@pytest.mark.parametrize("file_type", ["off", "stl"])
def test_colourless_meshes(file_type):
    data = point_tensor(exported(trimesh.creation.icosphere(subdivisions=1), file_type))
    assert_normalised(data)
    assert torch.all(data[:, 3:] == 0)


def test_sampling_is_uniform_over_area_and_interpolates_vertex_colours():
    # a 2×1 rectangle in z=0, red on the left edge, blue on the right
    vertices = np.array([[0, 0, 0], [2, 0, 0], [2, 1, 0], [0, 1, 0]], float)
    colours = np.array([[255, 0, 0, 255], [0, 0, 255, 255], [0, 0, 255, 255], [255, 0, 0, 255]])
    mesh = trimesh.Trimesh(vertices, [[0, 1, 2], [0, 2, 3]], vertex_colors=colours, process=False)
    data = point_tensor(mesh.export(file_type="ply")).double()
    assert torch.all(data[:, 2] == 0)
    x, red, blue = data[:, 0], data[:, 3], data[:, 5]
    assert torch.allclose(red + blue, torch.ones_like(red), atol=1e-6)
    fraction = (x - x.min()) / (x.max() - x.min())
    assert torch.allclose(blue, fraction, atol=0.01)  # colour follows position linearly
    assert abs((x < 0).double().mean().item() - 0.5) < 0.03  # both halves equally covered


def test_face_colours():
    box = trimesh.creation.box()
    box.visual.face_colors = np.tile([0, 255, 0, 255], (len(box.faces), 1))
    data = point_tensor(box.export(file_type="ply"))
    assert torch.allclose(data[:, 3:], torch.tensor([0, 1.0, 0]).expand(8192, 3))


def test_texture_colours_are_looked_up():
    box = trimesh.creation.box()
    texture = Image.new("RGB", (8, 8), (255, 128, 0))
    uv = np.random.default_rng(0).random((len(box.vertices), 2))
    box.visual = trimesh.visual.TextureVisuals(uv=uv, image=texture)
    data = point_tensor(box.export(file_type="glb"))
    assert torch.allclose(data[:, 3:], torch.tensor([1.0, 128 / 255, 0]).expand(8192, 3), atol=0.01)


def test_point_cloud_ply_keeps_its_points_and_colours():
    points = cloud(4096)
    colours = np.concatenate([np.tile([0, 0, 255], (4096, 1)), np.full((4096, 1), 255)], axis=1)
    data = point_tensor(exported(trimesh.PointCloud(points[:, :3], colors=colours), "ply"))
    assert_normalised(data)
    assert torch.equal(data[:4096], data[4096:])
    assert torch.allclose(data[:, 3:], torch.tensor([0, 0, 1.0]).expand(8192, 3))


def test_point_field_errors():
    bad = cloud(100)
    bad[5, 1] = np.nan
    assert error_of(point_tensor, npy_bytes(bad)).status == 422
    bad[5, 1] = np.inf
    assert error_of(point_tensor, npy_bytes(bad)).status == 422
    error = error_of(point_tensor, npy_bytes(np.zeros((10, 4))))
    assert error.status == 422 and "expected [N,6]" in error.message
    assert error_of(point_tensor, npy_bytes(np.zeros((0, 6)))).status == 422
    assert error_of(point_tensor, red_png()).status == 415
    assert error_of(point_tensor, pickle.dumps(cloud(10))).status == 415
    assert error_of(point_tensor, npy_bytes(np.array([object()]), allow_pickle=True)).status == 422
    ply = coloured_box().export(file_type="ply")
    assert error_of(point_tensor, ply[: len(ply) // 2]).status in (415, 422)
    assert error_of(point_tensor, npy_bytes(cloud(100)), max_points=50).status == 413
    # an OBJ cut off inside its first vertex: one coordinate, not three
    error = error_of(point_tensor, b"# https://github.com/mikedh/trimesh\nv -0")
    assert error.status == 422 and "[N, 3]" in error.message


# ---------------------------------------------------------------------------- fMRI, IMU, arrays

def test_fmri_single_vector_and_mean_over_repeats():
    voxels = np.random.default_rng(0).normal(size=(3, 15724))
    single = fmri_tensor(npy_bytes(voxels[0]))
    assert_tensor(single, (1, 15724))
    assert np.allclose(single.numpy(), voxels[0], atol=1e-6)
    repeated = fmri_tensor(npy_bytes(voxels.astype(np.float32)))
    assert np.allclose(repeated.numpy(), voxels.mean(0), atol=1e-5)
    assert torch.allclose(fmri_tensor(csv_bytes(voxels)), repeated, atol=1e-5)
    column = csv_bytes(voxels[0][:, None], header="voxel")  # one value per line
    assert torch.allclose(fmri_tensor(column), single)


def test_fmri_errors():
    error = error_of(fmri_tensor, npy_bytes(np.zeros(15000)))
    assert error.status == 422 and "15724" in error.message
    assert error_of(fmri_tensor, npy_bytes(np.zeros((15724, 2)))).status == 422
    bad = np.zeros(15724)
    bad[7] = np.nan
    assert error_of(fmri_tensor, npy_bytes(bad)).status == 422
    assert error_of(fmri_tensor, red_png()).status == 415


def ramp_imu(length: int) -> np.ndarray:
    """Channel c at step t holds t + 1000·c: where each sample went is easy to read back."""
    return np.arange(length)[:, None] + 1000.0 * np.arange(6)[None, :]


def test_imu_at_200_hz_is_cut_to_two_seconds_either_orientation():
    series = ramp_imu(500)
    data = imu_tensor(npy_bytes(series))
    assert_tensor(data, (6, 400))
    assert np.array_equal(data.numpy(), series[:400].T)
    assert torch.equal(imu_tensor(npy_bytes(series.T)), data)
    assert torch.equal(imu_tensor(csv_bytes(series, header="ax,ay,az,gx,gy,gz")), data)
    assert torch.equal(imu_tensor(csv_bytes(series, delimiter=" ")), data)


def slow_waves_imu(rate: float, seconds: float) -> tuple[np.ndarray, callable]:
    """[T,6] sines of 1–6 Hz, far below any Nyquist rate here, and the function they sample."""
    def waves(times):
        return np.sin(2 * np.pi * np.arange(1, 7)[None, :] * np.asarray(times)[:, None])
    return waves(np.arange(round(rate * seconds)) / rate), waves


@pytest.mark.parametrize("rate", [50.0, 100.0, 99.5, 400.0])
def test_imu_is_resampled_band_limited_to_200_hz(rate):
    series, waves = slow_waves_imu(rate, 3.0)  # 3 s: the first 2 s at 200 Hz are kept
    data = imu_tensor(npy_bytes(series), sample_rate=rate).numpy()
    assert_tensor(torch.from_numpy(data), (6, 400))
    # away from the start, where the windowed sinc rings as it did for the authors, the
    # resampled series is the same waves at the new instants
    inner = slice(40, 400)
    assert np.allclose(data[:, inner], waves(np.arange(400)[inner] / 200).T, atol=2e-3)
    assert np.abs(data[:, :40] - waves(np.arange(40) / 200).T).max() > 1e-3


def test_short_imu_is_zero_padded_after_its_duration():
    series, _ = slow_waves_imu(100.0, 1.0)  # 1 s → 200 samples at 200 Hz, then zeros
    data = imu_tensor(npy_bytes(series), sample_rate=100.0)
    assert torch.all(data[:, 190:200] != 0)
    assert torch.all(data[:, 200:] == 0)


def test_imu_errors():
    assert error_of(imu_tensor, npy_bytes(np.zeros((50, 5)))).status == 422
    for rate in (0, -5, float("nan"), "fast"):
        assert error_of(imu_tensor, npy_bytes(np.zeros((50, 6))), sample_rate=rate).status == 422
    assert imu_tensor(npy_bytes(np.ones((50, 6))), sample_rate="100").shape == (6, 400)
    assert error_of(imu_tensor, npy_bytes(np.zeros((0, 6)))).status == 422
    assert error_of(imu_tensor, b"a,b,c\n1,2,oops\n").status == 422
    assert error_of(imu_tensor, b"1,2,3,4,5,6\n1,2,3\n").status == 422
    error = error_of(imu_tensor, wav(), param="motion")
    assert (error.status, error.param) == (415, "motion")


def test_load_array_refuses_pickles_and_non_numeric_arrays():
    objects = npy_bytes(np.array([{"a": 1}], dtype=object), allow_pickle=True)
    assert "dtype object" in error_of(load_array, objects, "x").message
    assert error_of(load_array, pickle.dumps([1, 2, 3]), "x").status == 415
    assert error_of(load_array, npy_bytes(np.array(["a", "b"])), "x").status == 422
    assert error_of(load_array, npy_bytes(np.zeros(3, complex)), "x").status == 422
    structured = np.zeros(3, dtype=[("a", "f4"), ("b", "i4")])
    assert error_of(load_array, npy_bytes(structured), "x").status == 422
    archive = io.BytesIO()
    np.savez(archive, a=np.zeros(3))
    assert error_of(load_array, archive.getvalue(), "x").status == 415


def test_load_array_checks_the_header_before_allocating():
    header = b"{'descr': '<f8', 'fortran_order': False, 'shape': (1000000000000,), }"
    header += b" " * (63 - len(header) % 64) + b"\n"
    forged = b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + b"\x00" * 64
    error = error_of(load_array, forged, "x")
    assert error.status == 422 and "truncated" in error.message
    data = npy_bytes(np.arange(100.0))
    assert error_of(load_array, data[: len(data) - 8], "x").status == 422
    huge = b"\x93NUMPY\x02\x00" + (200_000).to_bytes(4, "little") + b" " * 200_000
    assert error_of(load_array, huge, "x").status == 422


def test_load_array_reads_integer_and_bool_npy_and_semicolon_csv():
    assert load_array(npy_bytes(np.arange(4, dtype=np.int16)), "x").tolist() == [0, 1, 2, 3]
    assert load_array(npy_bytes(np.array([True, False])), "x").tolist() == [1.0, 0.0]
    assert load_array(b"# comment\n1;2\n3;4\n", "x").tolist() == [[1, 2], [3, 4]]
