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

import av
import numpy as np
import torch
import torch.nn.functional as F

from server.errors import InputError
from server.inputs.images import SIZE, check_aspect, normalize
from server.inputs.sniff import check_kind, undecodable

CLIPS = 5
CROPS = 3
MAX_DURATION_S = 3600.0
MAX_FRAME_PIXELS = 40_000_000  # a little over 8K UHD
MAX_DECODED_FRAMES = 30_000
_EPS = 1e-6  # seconds: timestamps are rationals turned into floats


class _SeekMissed(Exception):
    """The container's seek index did not take us to a frame at or before the target."""


def video_tensor(data: bytes, param: str = "video", *, max_duration_s: float = MAX_DURATION_S,
                 max_frame_pixels: int = MAX_FRAME_PIXELS,
                 max_decoded_frames: int = MAX_DECODED_FRAMES) -> torch.Tensor:
    """[15,3,224,224] float32 from an MP4/WebM/MOV/MKV/AVI upload (see module docstring)."""
    kind = check_kind(data, param, {"video"}, "a video")
    try:
        frames = _pick_frames(data, param, max_duration_s, max_frame_pixels, max_decoded_frames)
    except InputError:
        raise
    except Exception as error:  # PyAV/FFmpeg raise several types on damaged input
        raise undecodable(param, kind, "a video", error) from error
    crops = [crop for frame in frames for crop in _crops(_scale_short_side(frame))]
    return normalize(torch.stack(crops))


def _pick_frames(data: bytes, param: str, max_duration_s: float, max_frame_pixels: int,
                 max_decoded_frames: int) -> list[np.ndarray]:
    with av.open(io.BytesIO(data)) as container:
        if not container.streams.video:
            raise InputError(422, f"field '{param}' holds a file with no video stream", param)
        stream = container.streams.video[0]
        width, height = stream.codec_context.width, stream.codec_context.height
        if width * height > max_frame_pixels:
            raise InputError(413, f"field '{param}' video frames are {width}x{height}, more than "
                                  f"the limit of {max_frame_pixels} pixels", param)
        if width and height:  # some containers only know the size once a frame is decoded
            check_aspect((width, height), param)
        start, duration = _timing(container, stream)
        if not duration > 0:
            raise InputError(422, f"field '{param}' holds a video of zero duration", param)
        if duration > max_duration_s:
            raise InputError(413, f"field '{param}' video lasts {duration:.0f} s, more than the "
                                  f"limit of {max_duration_s:.0f} s", param)
        targets = [start + k * max(duration - 1, 0) / CLIPS for k in range(CLIPS)]
        budget = _Budget(max_decoded_frames, param)
        try:
            frames = [_seek_frame(container, stream, t, start, budget) for t in targets]
        except _SeekMissed:
            frames = None
    if frames is None:
        frames = _scan_frames(data, targets, start, budget)
    return [_upright_rgb(frame) for frame in frames]


def _upright_rgb(frame) -> np.ndarray:
    """[H,W,3] uint8 as the video is shown: phones store portrait video as landscape frames
    plus a display rotation (counter-clockwise degrees), which players apply."""
    rgb = frame.to_ndarray(format="rgb24")
    quarter_turns = round((frame.rotation or 0) / 90) % 4
    return np.ascontiguousarray(np.rot90(rgb, quarter_turns)) if quarter_turns else rgb


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
    """Caps the frames decoded per request: a video without a usable index is decoded
    from the start for every clip, which must not run unbounded."""

    def __init__(self, limit: int, param: str):
        self.left = limit
        self.param = param

    def spend(self) -> None:
        self.left -= 1
        if self.left < 0:
            raise InputError(413, f"field '{self.param}' video needs too many frames decoded",
                             self.param)


def _seek_frame(container, stream, target: float, start: float, budget: _Budget):
    """The first frame at or after `target` (or the last frame, if the video ends first)."""
    container.seek(int(target / stream.time_base), stream=stream, backward=True)
    last = None
    for frame in container.decode(stream):
        budget.spend()
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


def _scan_frames(data: bytes, targets: list[float], start: float, budget: _Budget) -> list:
    """Decode from the beginning, taking the first frame at or after each target."""
    picked = []
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        rate = float(stream.average_rate or stream.guessed_rate or 25)
        last = None
        for index, frame in enumerate(container.decode(stream)):
            budget.spend()
            time = frame.time if frame.time is not None else start + index / rate
            while len(picked) < len(targets) and time >= targets[len(picked)] - _EPS:
                picked.append(frame)
            if len(picked) == len(targets):
                break
            last = frame
    if last is None and not picked:
        raise ValueError("no frame could be decoded")
    return picked + [last] * (len(targets) - len(picked))


def _scale_short_side(rgb: np.ndarray) -> torch.Tensor:
    """[3,H',W'] in 0–1 with the short side 224."""
    height, width = rgb.shape[:2]
    if width < height:
        size = (int(math.floor(height / width * SIZE)), SIZE)
    else:
        size = (SIZE, int(math.floor(width / height * SIZE)))
    pixels = torch.from_numpy(rgb).permute(2, 0, 1).float().div(255.0)
    return F.interpolate(pixels[None], size=size, mode="bilinear", align_corners=False)[0]


def _crops(frame: torch.Tensor) -> list[torch.Tensor]:
    """Three 224-squares along the long side: start, centre, end."""
    height, width = frame.shape[1:]
    long_side = max(height, width)
    offsets = (0, int(math.ceil((long_side - SIZE) / 2)), long_side - SIZE)
    if height > width:
        return [frame[:, y:y + SIZE, :SIZE] for y in offsets]
    return [frame[:, :SIZE, x:x + SIZE] for x in offsets]
