"""What one attachment's decoding may cost: decided from its headers before the work, measured
here as the growth of this process's peak RSS (tests/peak_memory.py) around single decodes of
files made in the test, and cancellation that stops a decode between its blocks."""

import io
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F
from PIL import Image

from inputs_files import image_bytes, npy_bytes, silence_flac, sound_bytes, tone, video_bytes
from peak_memory import peak_growth
from server.errors import Cancelled, InputError
from server.media.decoders.arrays import imu_tensor, load_array
from server.media.decoders.audio import audio_tensor, decode_audio
from server.media.decoders.images import decode_image, rgbx_tensor
from server.media.decoders.resample import input_length_read, resample
from server.media.decoders.video import SIZE, _scaled_crops, video_tensor

MB = 1 << 20


def error_of(call, *args, **kwargs) -> InputError:
    with pytest.raises(InputError) as caught:
        call(*args, **kwargs)
    return caught.value


def imu_csv(rows: int) -> bytes:
    values = np.random.default_rng(0).normal(size=(rows, 6))
    out = io.StringIO()
    np.savetxt(out, values, delimiter=",", fmt="%.4f", header="ax,ay,az,gx,gy,gz", comments="")
    return out.getvalue().encode()


@pytest.fixture(scope="module", autouse=True)
def warm_decoders():
    """The first decodes load codecs and plugins: that is not what a request costs."""
    audio_tensor(silence_flac(1))
    audio_tensor(sound_bytes(tone(440, 1.0, 48000), 48000))
    video_tensor(video_bytes([np.zeros((48, 64, 3), np.uint8)] * 4))
    imu_tensor(imu_csv(100))


# ---------------------------------------------------------------------------- audio

def test_a_long_8_channel_192_khz_flac_decodes_only_what_the_model_reads():
    data = silence_flac(120)  # 120 s × 8 × 192 kHz: 737 MB as float32, ~200 kB as FLAC
    with peak_growth() as growth:
        result = audio_tensor(data)
    assert result.shape == (1, 128, 1024)
    assert growth.added <= 64 * MB, growth.added / MB


def test_a_long_48_khz_stereo_wav_decodes_only_what_the_model_reads():
    data = sound_bytes(np.stack([tone(440, 300, 48000)] * 2, 1), 48000)  # 58 MB
    with peak_growth() as growth:
        result = audio_tensor(data)
    assert torch.isfinite(result).all()
    assert growth.added <= 64 * MB, growth.added / MB


def test_decoding_stops_where_the_resampler_stops_reading_and_gives_the_same_samples():
    for rate in (8000, 44100, 48000, 192000):
        data = sound_bytes(tone(440, 12.0, rate), rate)
        whole = sf.read(io.BytesIO(data), dtype="float32")[0]
        expected = resample(whole, rate, 16000, 164_240).astype(np.float32)
        assert np.array_equal(decode_audio(data, max_samples=164_240), expected)


@pytest.mark.parametrize("rate,new_rate", [(44100, 16000), (192000, 16000), (8000, 16000),
                                           (44099, 16000), (97, 200), (99.5, 200)])
def test_input_length_read_is_all_the_resampler_reads(rate, new_rate):
    signal = np.random.default_rng(0).standard_normal(int(rate * 3))
    for length in (1, 7, 1000):
        read = input_length_read(length, rate, new_rate)
        assert np.array_equal(resample(signal[:read], rate, new_rate, length),
                              resample(signal, rate, new_rate, length))


def test_audio_sampled_past_the_rate_limit_is_refused_before_decoding():
    data = sound_bytes(tone(440, 0.5, 400_000), 400_000)
    error = error_of(audio_tensor, data)
    assert (error.status, error.param) == (413, "audio")
    assert "400000 Hz" in error.message and "(max_audio_sample_rate)" in error.message
    assert audio_tensor(data, max_sample_rate=400_000).shape == (1, 128, 1024)


def test_audio_past_the_decode_memory_limit_is_refused_naming_it():
    data = sound_bytes(tone(440, 12.0, 192_000), 192_000)
    error = error_of(audio_tensor, data, max_decode_mb=20)
    assert error.status == 413 and "(max_decode_mb)" in error.message, error.message


# ---------------------------------------------------------------------------- video

@pytest.mark.parametrize("height,width", [(1080, 1920), (1920, 1080), (481, 640), (224, 300), (100, 60)])
def test_scaled_crops_equal_torch_bilinear_on_the_whole_frame(height, width):
    rgb = np.random.default_rng(height).integers(0, 256, (height, width, 3), dtype=np.uint8)
    pixels = torch.from_numpy(rgb).permute(2, 0, 1).float().div(255.0)
    if width < height:
        size = (int(np.floor(height / width * SIZE)), SIZE)
    else:
        size = (SIZE, int(np.floor(width / height * SIZE)))
    scaled = F.interpolate(pixels[None], size=size, mode="bilinear", align_corners=False)[0]
    long_side = max(size)
    offsets = (0, -(-(long_side - SIZE) // 2), long_side - SIZE)
    if size[0] > size[1]:
        expected = torch.stack([scaled[:, y:y + SIZE, :SIZE] for y in offsets])
    else:
        expected = torch.stack([scaled[:, :SIZE, x:x + SIZE] for x in offsets])
    assert (_scaled_crops(rgb) - expected).abs().max() < 1e-6


def test_a_high_resolution_video_holds_one_frame_at_a_time_and_no_float_frame():
    height, width = 1440, 2560
    y, x = np.mgrid[0:height, 0:width]
    frames = [np.stack([x * 255 // width, y * 255 // height, np.full_like(x, 40 * k)], -1).astype(np.uint8)
              for k in range(6)]
    data = video_bytes(frames, fps=2, gop=2)
    del frames, x, y
    with peak_growth() as growth:
        result = video_tensor(data)
    assert result.shape == (15, 3, 224, 224)
    # 12 bytes a pixel is what the decoder estimates (rgb24 + six 4:2:0 frames); a float32
    # [3,H,W] copy of each of the five frames, as before, is 60 bytes a pixel
    assert growth.added <= height * width * 12 + 16 * MB, growth.added / MB


def test_video_past_the_decode_memory_or_pixel_budget_is_refused_naming_it():
    data = video_bytes([np.zeros((480, 640, 3), np.uint8)] * 10, fps=2)
    error = error_of(video_tensor, data, max_decode_mb=1)
    assert error.status == 413 and "(max_decode_mb)" in error.message, error.message
    error = error_of(video_tensor, data, max_decoded_pixels=640 * 480 * 3)
    assert error.status == 413 and "(max_video_decoded_pixels)" in error.message, error.message


# ---------------------------------------------------------------------------- arrays

def test_a_csv_past_the_sample_limit_is_refused_before_it_is_parsed():
    data = imu_csv(200_000)
    with peak_growth() as growth:
        error = error_of(imu_tensor, data, max_samples=100_000)
    assert error.status == 413 and "100000 (max_imu_samples)" in error.message, error.message
    # the text decoded once, nothing parsed (parsed, this CSV took 30 times its size)
    assert growth.added <= len(data) + 8 * MB, (growth.added / MB, len(data) / MB)


def test_an_allowed_csv_is_parsed_at_about_8_bytes_a_value():
    data = imu_csv(200_000)
    with peak_growth() as growth:
        result = imu_tensor(data, max_samples=200_000)
    assert result.shape == (6, 400)
    values = 200_000 * 6
    assert growth.added <= len(data) + 9 * values + 8 * MB, (growth.added / MB, len(data) / MB)


def test_a_csv_row_that_is_not_numbers_is_named_past_the_first_block():
    lines = imu_csv(70_000).decode().splitlines()
    lines[69_000] = "1,2,3,x,5,6"  # data row 69 000: the header is line 0
    lines[69_500] = "1,2,3"
    error = error_of(load_array, "\n".join(lines).encode(), "imu")
    assert error.message == "field 'imu' CSV row 69000 is not all numbers"
    del lines[69_000]  # the short row becomes data row 69 499
    error = error_of(load_array, "\n".join(lines).encode(), "imu")
    assert error.message == "field 'imu' CSV row 69499 has 3 values, the first has 6"


def test_comment_lines_do_not_count_against_the_limit():
    data = b"# recorded at 100 Hz\n" * 1000 + imu_csv(1000)
    assert load_array(data, "imu", max_values=6000, limit="6 × 1000").shape == (1000, 6)


def test_an_npy_past_the_limit_is_refused_from_its_header():
    data = npy_bytes(np.zeros((400_000, 6), np.float32))
    with peak_growth() as growth:
        error = error_of(imu_tensor, data, max_samples=100_000)
    assert error.status == 413 and "(max_imu_samples)" in error.message
    assert growth.added <= 4 * MB, growth.added / MB


# ---------------------------------------------------------------------------- images

def test_images_past_the_decode_memory_limit_are_refused_before_decoding():
    png = image_bytes(Image.new("RGBA", (2000, 1500)), "PNG")  # 4 bytes a pixel, +4 as RGB: 24 MB
    error = error_of(decode_image, png, "image", max_decode_mb=16)
    assert error.status == 413 and "(max_decode_mb)" in error.message, error.message
    assert decode_image(png, "image", max_decode_mb=32).size == (2000, 1500)


def test_a_16_bit_depth_map_is_stretched_without_a_float_copy_of_it():
    side = 3000
    ramp = np.linspace(0, 65535, side)
    depth = image_bytes(Image.fromarray(((ramp[:, None] + ramp[None, :]) / 2).astype(np.uint16)), "PNG")
    picture = image_bytes(Image.new("RGB", (side, side), (30, 60, 90)), "PNG")
    rgbx_tensor(picture, image_bytes(Image.new("I;16", (8, 8)), "PNG"), "depth")
    with peak_growth() as growth:
        result = rgbx_tensor(picture, depth, "depth")
    assert result.shape == (2, 3, 224, 224)
    # the map (2) and its 8-bit levels (1), as RGB (4) and that resized (4): the float64 copies
    # of before took 16 bytes a pixel more
    assert growth.added <= side * side * 11 + 8 * MB, growth.added / MB


# ---------------------------------------------------------------------------- cancellation

class CancelledAtCheck(threading.Event):
    """A cancel event that the test's other thread sets when the decoder reaches check number
    `at`: the decoder must then stop at that very check, with its work half done."""

    def __init__(self, at: int):
        super().__init__()
        self.at, self.checks, self.reached = at, 0, threading.Event()

    def is_set(self) -> bool:
        self.checks += 1
        if self.checks == self.at:
            self.reached.set()
            assert self.wait(timeout=60), "the test did not set the event"
        return super().is_set()


def cancel_from_another_thread(work, cancel: CancelledAtCheck):
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(work)
        assert cancel.reached.wait(timeout=60), "the decoder never checked for cancellation"
        cancel.set()
        with pytest.raises(Cancelled):
            running.result(timeout=60)
        assert pool.submit(lambda: "free").result(timeout=60) == "free"  # the thread is not held


def test_a_cancelled_audio_decode_stops_at_its_next_block():
    # the ~10.3 s the model reads of 48 kHz stereo: 4 blocks of 2¹⁸ samples
    data = sound_bytes(np.stack([tone(440, 20, 48000)] * 2, 1), 48000)
    cancel = CancelledAtCheck(at=3)
    cancel_from_another_thread(lambda: audio_tensor(data, cancel=cancel), cancel)
    assert cancel.checks == 3


def test_a_cancelled_video_decode_stops_at_its_next_frame():
    data = video_bytes([np.full((48, 64, 3), 6 * k, np.uint8) for k in range(40)], fps=10, gop=40)
    cancel = CancelledAtCheck(at=5)
    cancel_from_another_thread(lambda: video_tensor(data, cancel=cancel), cancel)
    assert cancel.checks == 5


def test_a_cancelled_csv_parse_stops_at_its_next_block():
    data = imu_csv(300_000)  # 5 blocks of rows
    cancel = CancelledAtCheck(at=2)
    cancel_from_another_thread(lambda: imu_tensor(data, cancel=cancel), cancel)
    assert cancel.checks == 2
