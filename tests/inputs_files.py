"""Real files, encoded in memory with the same libraries people's tools use: the encoders every tier shares."""

import io
import struct
import zlib

import av
import imagecodecs
import laspy
import numpy as np
import soundfile as sf
from PIL import Image


def image_bytes(img: Image.Image, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    img.save(out, format=fmt, **options)
    return out.getvalue()


def png_with_declared_size(width: int, height: int) -> bytes:
    """A small valid-looking PNG whose header claims `width`×`height` (a decompression bomb
    in form: the IHDR is rewritten with a correct CRC, the pixel data is a 1×1 image's)."""
    data = bytearray(image_bytes(Image.new("RGB", (1, 1)), "PNG"))
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


def video_bytes(frames: list[np.ndarray], fmt: str = "mp4", codec: str = "h264", fps=10,
                gop: int | None = None, rotation: int = 0) -> bytes:
    """Encode RGB uint8 frames [H,W,3] (even sizes) as a video file."""
    height, width = frames[0].shape[:2]
    out = io.BytesIO()
    with av.open(out, "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if rotation:
            stream.set_display_rotation(rotation)  # counter-clockwise, as phones tag portrait video
        if gop is not None:
            stream.codec_context.gop_size = gop
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return out.getvalue()


def level_frames(levels: list[int], width: int = 64, height: int = 48) -> list[np.ndarray]:
    """Flat grey frames, one grey level each: which frame was picked can be read back."""
    return [np.full((height, width, 3), level, np.uint8) for level in levels]


def halves_frame(width: int, height: int) -> np.ndarray:
    """Red in the first half of the long side, blue in the second."""
    frame = np.zeros((height, width, 3), np.uint8)
    if width >= height:
        frame[:, : width // 2, 0] = 255
        frame[:, width // 2:, 2] = 255
    else:
        frame[: height // 2, :, 0] = 255
        frame[height // 2:, :, 2] = 255
    return frame


def audio_only_mp4(seconds: float = 1.0, rate: int = 16000, fmt: str = "mp4") -> bytes:
    out = io.BytesIO()
    samples = (0.3 * np.sin(2 * np.pi * 440 * np.arange(int(seconds * rate)) / rate))
    with av.open(out, "w", format=fmt) as container:
        stream = container.add_stream("aac", rate=rate)
        stream.layout = "mono"
        frame_size = 1024
        for start in range(0, len(samples), frame_size):
            chunk = samples[start:start + frame_size].astype(np.float32)[None]
            frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout="mono")
            frame.sample_rate = rate
            frame.pts = start
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return out.getvalue()


def tone(freq: float, seconds: float, rate: int, amplitude: float = 0.5) -> np.ndarray:
    return amplitude * np.sin(2 * np.pi * freq * np.arange(int(round(seconds * rate))) / rate)


def sound_bytes(channels: np.ndarray, rate: int, fmt: str = "WAV", subtype: str | None = None) -> bytes:
    """`channels` is [T] or [T,C] float in [-1,1]."""
    out = io.BytesIO()
    sf.write(out, channels, rate, format=fmt, subtype=subtype)
    return out.getvalue()


def silence_flac(seconds: int, rate: int = 192_000, channels: int = 8) -> bytes:
    """Many channels of silence at a high rate: a FLAC of ~1.6 kB a second that decodes to
    rate × channels float32 samples a second (6 MB at the defaults), written a second at a time."""
    out = io.BytesIO()
    with sf.SoundFile(out, "w", rate, channels, "PCM_16", format="FLAC") as audio:
        block = np.zeros((rate, channels), np.int16)
        for _ in range(seconds):
            audio.write(block)
    return out.getvalue()


def npy_bytes(array: np.ndarray, allow_pickle: bool = False) -> bytes:
    out = io.BytesIO()
    np.save(out, array, allow_pickle=allow_pickle)
    return out.getvalue()


def csv_bytes(array: np.ndarray, header: str | None = None, delimiter: str = ",") -> bytes:
    lines = [header] if header else []
    lines += [delimiter.join(repr(float(v)) for v in np.atleast_1d(row)) for row in array]
    return ("\n".join(lines) + "\n").encode()


def pcd_bytes(xyz: np.ndarray, rgb8: np.ndarray | None = None, data: str = "binary", rgb_type: str = "F",
              extra: bool = False) -> bytes:
    """A PCD file as PCL writes it: float32 x y z, then (with `rgb8`, [N,3] uint8) the colour packed in
    one 32-bit field 0x00RRGGBB, typed F (PCL's float reinterpretation) or U; `extra` adds an
    intensity field between them. binary_compressed: the fields one after another, LZF-compressed."""
    fields = [("x", "F", xyz[:, 0].astype("<f4")), ("y", "F", xyz[:, 1].astype("<f4")),
              ("z", "F", xyz[:, 2].astype("<f4"))]
    if extra:
        fields.append(("intensity", "F", np.arange(len(xyz), dtype="<f4")))
    if rgb8 is not None:
        packed = (rgb8[:, 0].astype("<u4") << 16) | (rgb8[:, 1].astype("<u4") << 8) | rgb8[:, 2].astype("<u4")
        fields.append(("rgb", rgb_type, packed.view("<f4") if rgb_type == "F" else packed))
    header = ("# .PCD v0.7 - Point Cloud Data file format\nVERSION 0.7\n"
              f"FIELDS {' '.join(name for name, _, _ in fields)}\nSIZE {' '.join('4' for _ in fields)}\n"
              f"TYPE {' '.join(kind for _, kind, _ in fields)}\nCOUNT {' '.join('1' for _ in fields)}\n"
              f"WIDTH {len(xyz)}\nHEIGHT 1\nVIEWPOINT 0 0 0 1 0 0 0\nPOINTS {len(xyz)}\nDATA {data}\n").encode()
    if data == "ascii":  # PCL writes a packed colour as the whole number its 32 bits are, whatever its TYPE
        columns = [values.view("<u4") if name == "rgb" else values for name, _, values in fields]
        rows = zip(*(values.tolist() for values in columns))
        return header + "".join(" ".join(map(str, row)) + "\n" for row in rows).encode()
    if data == "binary":
        records = np.empty(len(xyz), [(name, values.dtype) for name, _, values in fields])
        for name, _, values in fields:
            records[name] = values
        return header + records.tobytes()
    raw = b"".join(values.tobytes() for _, _, values in fields)
    compressed = imagecodecs.lzf_encode(raw)
    return header + struct.pack("<II", len(compressed), len(raw)) + compressed


def las_bytes(xyz: np.ndarray, rgb16: np.ndarray | None) -> bytes:
    """A LAS 1.2 file written by laspy: point format 2 (xyz + 16-bit rgb) or 0 (xyz), on a 1 mm grid."""
    las = laspy.create(point_format=2 if rgb16 is not None else 0, file_version="1.2")
    las.header.scales = [0.001] * 3
    las.header.offsets = [0.0] * 3
    las.x, las.y, las.z = xyz[:, 0], xyz[:, 1], xyz[:, 2]
    if rgb16 is not None:
        las.red, las.green, las.blue = rgb16[:, 0], rgb16[:, 1], rgb16[:, 2]
    out = io.BytesIO()
    las.write(out)
    return out.getvalue()
