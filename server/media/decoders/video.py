"""Videos → the [15,3,224,224] clip-frame tensor of ONELLM.md §4, decoded with PyAV.

5 clips of 1 s as pytorchvideo's ConstantClipsPerVideoSampler lays them out (clip k starts at
k·max(duration−1,0)/5 s after the stream's start, so the last starts before the end, with
the duration as decord counts it: frames ÷ frame rate); the first frame at or after each clip's start; short side to
224 (bilinear, as pytorchvideo's ShortSideScale: long side floor(long/short·224), no
antialiasing); /255; CLIP normalise; 3 square crops per frame at the start, centre
(offset ceil((long−224)/2)) and end of the long side. Rows are frame-major:
f0c0, f0c1, f0c2, f1c0, …  Frames are first turned upright by the container's display
rotation, as players show them (the authors' decoder ignored it; their clips had none).

Frames are found by seeking to the keyframe at or before each clip start and decoding
forward, so a long video costs five short decodes, not a full one. When a container's
index cannot be trusted (the seek lands after the target, frames lack timestamps) the
frames are found by decoding from the beginning instead: same frames, more work.
"""

import io
import math
import threading

import av
import numpy as np
import torch

from server.errors import Cancelled, InputError
from server.media.decoders.costs import MAX_DECODE_MB, check_cancelled, check_decode_memory
from server.media.decoders.images import SIZE, check_aspect, normalize
from server.media.sniff import check_kind, undecodable

CLIPS = 5
CROPS = 3
MAX_DURATION_S = 3600.0
MAX_FRAME_PIXELS = 40_000_000  # a little over 8K UHD
MAX_DECODED_FRAMES = 30_000
MAX_DECODED_PIXELS = 20_000_000_000  # ~10 000 frames of 1080p or 500 of 40 MP
# decoded frames alive at once, per pixel in their own format: the one picked, the previous one,
# the decoder's references and pool (measured: 4 to 5 for 40 MP H.264), besides the rgb24 copy
_FRAMES_HELD = 6
_EPS = 1e-6  # seconds: timestamps are rationals turned into floats


class _SeekMissed(Exception):
    """The container's seek index did not take us to a frame at or before the target."""


def video_tensor(data: bytes, param: str = "video", *, max_duration_s: float = MAX_DURATION_S,
                 max_frame_pixels: int = MAX_FRAME_PIXELS, max_decoded_frames: int = MAX_DECODED_FRAMES,
                 max_decoded_pixels: int = MAX_DECODED_PIXELS, max_decode_mb: float = MAX_DECODE_MB,
                 cancel: threading.Event | None = None) -> torch.Tensor:
    """[15,3,224,224] float32 from an MP4/WebM/MOV/MKV/AVI upload (see module docstring)."""
    kind = check_kind(data, param, {"video"}, "a video")
    budget = _Budget(param, max_frame_pixels, max_decoded_frames, max_decoded_pixels, max_decode_mb, cancel)
    try:
        crops = _clip_crops(data, param, max_duration_s, budget)
    except (InputError, Cancelled):
        raise
    except Exception as error:  # PyAV/FFmpeg raise several types on damaged input
        raise undecodable(param, kind, "a video", error) from error
    return normalize(torch.cat(crops))


def _clip_crops(data: bytes, param: str, max_duration_s: float, budget: "_Budget") -> list[torch.Tensor]:
    """Each clip's frame, turned into its three crops as soon as it is found: one decoded frame
    at a time is held, never the five."""
    with av.open(io.BytesIO(data)) as container:
        if not container.streams.video:
            raise InputError(422, f"field '{param}' holds a file with no video stream", param)
        stream = container.streams.video[0]
        width, height = stream.codec_context.width, stream.codec_context.height
        if width and height:  # some containers only know the size once a frame is decoded
            budget.check_frame_size(width, height, stream.codec_context.format)
            check_aspect((width, height), param)
        start, duration = _timing(container, stream)
        if not duration > 0:
            raise InputError(422, f"field '{param}' holds a video of zero duration", param)
        if duration > max_duration_s:
            raise InputError(413, f"field '{param}' video lasts {duration:.0f} s, more than the "
                                  f"limit of {max_duration_s:.0f} s (max_video_seconds)", param)
        targets = [start + k * max(duration - 1, 0) / CLIPS for k in range(CLIPS)]
        try:
            return [_upright_crops(_seek_frame(container, stream, t, start, budget)) for t in targets]
        except _SeekMissed:
            pass
    return _scan_crops(data, targets, start, budget)


def _upright_crops(frame) -> torch.Tensor:
    """[3 crops,3,224,224] of the frame as the video is shown: phones store portrait video as
    landscape frames plus a display rotation (counter-clockwise degrees), which players apply."""
    rgb = frame.to_ndarray(format="rgb24")
    quarter_turns = round((frame.rotation or 0) / 90) % 4
    return _scaled_crops(np.rot90(rgb, quarter_turns))  # a view: only the pixels read are copied


def _timing(container, stream) -> tuple[float, float]:
    """(start, duration) of the video stream in seconds. The duration is the authors' reader's
    (decord): the frame count ÷ the average frame rate, the count estimated from the container's
    duration where the header has none (WebM). Without a rate, the headers' or the packets' span."""
    time_base = stream.time_base
    start = float(stream.start_time * time_base) if stream.start_time is not None else 0.0
    fps = stream.average_rate
    frames = stream.frames or (int(fps * container.duration / av.time_base) if fps and container.duration else 0)
    if fps and frames > 0:
        return start, float(frames / fps)
    if stream.duration:
        return start, float(stream.duration * time_base)
    if container.duration:  # WebM/Matroska carry only the container's duration
        return start, container.duration / av.time_base
    # No duration in the headers (e.g. browser-recorded WebM): read the packet timestamps,
    # which needs demuxing only, not decoding.
    end = start
    for packet in container.demux(stream):
        if packet.pts is not None:
            end = max(end, float((packet.pts + (packet.duration or 0)) * time_base))
    container.seek(0)
    return start, end - start


class _Budget:
    """Caps what one video may cost before its frames are decoded: each frame's pixels and the
    working memory they take, and the frames and pixels decoded in all (a video without a usable
    index is decoded from the start for every clip, which must not run unbounded)."""

    def __init__(self, param: str, max_frame_pixels: int, max_frames: int, max_pixels: int,
                 max_decode_mb: float, cancel: threading.Event | None):
        self.param, self.max_frame_pixels, self.max_decode_mb = param, max_frame_pixels, max_decode_mb
        self.frames_left, self.pixels_left, self.cancel = max_frames, max_pixels, cancel
        self.checked = None  # the frame size and format last checked

    def check_frame_size(self, width: int, height: int, pixel_format) -> None:
        size = (width, height, pixel_format and pixel_format.name)
        if size == self.checked:
            return
        if width * height > self.max_frame_pixels:
            raise InputError(413, f"field '{self.param}' video frames are {width}x{height}, more than "
                                  f"the limit of {self.max_frame_pixels} pixels (max_video_frame_pixels)",
                             self.param)
        per_pixel = 3 + _FRAMES_HELD * _decoded_bytes_per_pixel(pixel_format)
        check_decode_memory(width * height * per_pixel, self.max_decode_mb, self.param,
                            f"video frames of {width}x{height}")
        self.checked = size

    def spend(self, frame) -> None:
        check_cancelled(self.cancel)
        self.check_frame_size(frame.width, frame.height, frame.format)
        self.frames_left -= 1
        self.pixels_left -= frame.width * frame.height
        if self.frames_left < 0:
            raise InputError(413, f"field '{self.param}' video needs too many frames decoded "
                                  "(max_video_decoded_frames)", self.param)
        if self.pixels_left < 0:
            raise InputError(413, f"field '{self.param}' video needs too many pixels decoded "
                                  "(max_video_decoded_pixels)", self.param)


def _decoded_bytes_per_pixel(pixel_format) -> float:
    """Bytes per pixel of a frame in its decoder's format (8-bit 4:2:0: 1.5; 16-bit 4:4:4: 6);
    an unknown format counts as the widest common one (16-bit RGBA: 8)."""
    if pixel_format is None:
        return 8.0
    probe = av.VideoFormat(pixel_format.name, 64, 64)
    return sum(-(-c.bits // 8) * c.width * c.height for c in probe.components) / (64 * 64)


def _seek_frame(container, stream, target: float, start: float, budget: _Budget):
    """The first frame at or after `target` (or the last frame, if the video ends first)."""
    container.seek(int(target / stream.time_base), stream=stream, backward=True)
    last = None
    for frame in container.decode(stream):
        budget.spend(frame)
        if frame.time is None:
            raise _SeekMissed
        if last is None and frame.time > target + _EPS and target > start + _EPS:
            raise _SeekMissed  # landed past the target: frames before it were skipped
        if frame.time >= target - _EPS:
            return frame
        last = frame
    if last is None:
        raise _SeekMissed
    return last


def _scan_crops(data: bytes, targets: list[float], start: float, budget: _Budget) -> list[torch.Tensor]:
    """Decode from the beginning, taking the first frame at or after each target."""
    picked = []
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        rate = float(stream.average_rate or stream.guessed_rate or 25)
        last = None
        for index, frame in enumerate(container.decode(stream)):
            budget.spend(frame)
            time = frame.time if frame.time is not None else start + index / rate
            if len(picked) < len(targets) and time >= targets[len(picked)] - _EPS:
                crops = _upright_crops(frame)
                while len(picked) < len(targets) and time >= targets[len(picked)] - _EPS:
                    picked.append(crops)
            if len(picked) == len(targets):
                break
            last = frame
    if last is None and not picked:
        raise ValueError("no frame could be decoded")
    if len(picked) < len(targets):
        picked += [_upright_crops(last)] * (len(targets) - len(picked))
    return picked


def _scaled_crops(rgb: np.ndarray) -> torch.Tensor:
    """[3 crops,3,224,224] in 0–1 of an [H,W,3] uint8 frame: the short side scaled to 224 as
    F.interpolate(bilinear, align_corners=False) scales it, then the three squares along the long
    side. Only the output pixels the crops keep are computed, from the 2 source rows and 2 source
    columns each reads, so a frame is never held in float at full size."""
    height, width = rgb.shape[:2]
    if width < height:
        size = (int(math.floor(height / width * SIZE)), SIZE)
    else:
        size = (SIZE, int(math.floor(width / height * SIZE)))
    long_side = max(size)
    offsets = (0, int(math.ceil((long_side - SIZE) / 2)), long_side - SIZE)
    along = np.concatenate([np.arange(offset, offset + SIZE) for offset in offsets])
    crops_down_rows = size[0] > size[1]
    rows, cols = (along, np.arange(SIZE)) if crops_down_rows else (np.arange(SIZE), along)
    row_first, row_second, row_weights = _bilinear_taps(height, size[0], rows)
    col_first, col_second, col_weights = _bilinear_taps(width, size[1], cols)
    picked = rgb[np.ix_(np.concatenate([row_first, row_second]), np.concatenate([col_first, col_second]))]
    pixels = torch.from_numpy(np.ascontiguousarray(picked)).permute(2, 0, 1).float().div(255.0)
    # columns, then rows: torch sums h0·(w0·x00 + w1·x01) + h1·(w0·x10 + w1·x11)
    c, r = len(cols), len(rows)
    across = pixels[:, :, :c] * col_weights[0] + pixels[:, :, c:] * col_weights[1]  # [3, 2R, C]
    scaled = across[:, :r] * row_weights[0][:, None] + across[:, r:] * row_weights[1][:, None]  # [3, R, C]
    if crops_down_rows:
        return scaled.view(3, 3, SIZE, SIZE).permute(1, 0, 2, 3)
    return scaled.view(3, SIZE, 3, SIZE).permute(2, 0, 1, 3)


def _bilinear_taps(in_size: int, out_size: int, positions: np.ndarray):
    """The two source indices and weights of each output position, in float32 as torch's
    upsample_bilinear2d computes them (align_corners=False: source = scale·(dst + ½) − ½, ≥ 0)."""
    scale = np.float32(in_size) / np.float32(out_size)
    source = np.maximum(scale * (positions.astype(np.float32) + np.float32(0.5)) - np.float32(0.5),
                        np.float32(0))
    first = np.minimum(source.astype(np.int64), in_size - 1)
    second = first + (first < in_size - 1)
    weight = np.clip(source - first.astype(np.float32), 0, 1).astype(np.float32)
    return first, second, (torch.from_numpy(1 - weight), torch.from_numpy(weight))
