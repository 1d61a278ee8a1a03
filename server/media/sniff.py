"""Recognise what kind of file an upload is from its first bytes.

File names and declared content types are whatever the client says they are, so every
decoder starts from the bytes: a PNG sent in the `audio` field must be answered with
"that is an image" (415), not with whatever the audio decoder happens to raise.
"""

import re
import struct
from typing import NamedTuple

from server.errors import InputError


class Kind(NamedTuple):
    family: str  # image, video, audio, array, mesh, points, text, pickle, archive, document
    name: str  # the format, as people know it: PNG, MP4, PLY, ...

    def describe(self) -> str:
        phrases = {
            "image": f"an image ({self.name})",
            "video": f"a video ({self.name})",
            "audio": f"audio ({self.name})",
            "array": "a NumPy array (.npy)",
            "archive": "NumPy arrays (.npz)" if self.name == "NPZ" else f"a {self.name} archive",
            "mesh": f"a 3D mesh ({self.name})",
            "points": f"a point cloud ({self.name})",
            "text": "text",
            "pickle": "a Python pickle",
        }
        return phrases.get(self.family, f"a {self.name} file")


# ISO base media brands (bytes 8:12 after `ftyp`) that are not videos.
_IMAGE_BRANDS = {b"heic": "HEIC", b"heix": "HEIC", b"mif1": "HEIF", b"msf1": "HEIF",
                 b"avif": "AVIF", b"avis": "AVIF"}
_AUDIO_BRANDS = {b"M4A ": "M4A", b"M4B ": "M4A", b"F4A ": "M4A"}
# Top-level QuickTime atoms a .mov may start with when it has no `ftyp`.
_QUICKTIME_ATOMS = {b"moov", b"mdat", b"wide", b"free", b"skip", b"pnot"}


def sniff(data: bytes) -> Kind | None:
    """The kind of file `data` is, or None when its first bytes match nothing known."""
    head = data[:64]
    kind = _by_magic(head) or _point_cloud(data) or _zip(data)
    if kind is None and _looks_like_text(data[:4096]):
        kind = _text_kind(data[:4096])
    if kind is None and _is_binary_stl(data):
        kind = Kind("mesh", "STL")
    return kind


def _by_magic(head: bytes) -> Kind | None:
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return Kind("image", "PNG")
    if head.startswith(b"\xff\xd8\xff"):
        return Kind("image", "JPEG")
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return Kind("image", "GIF")
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return Kind("image", "TIFF")
    if head.startswith(b"BM") and len(head) >= 26 and head[6:10] == b"\x00\x00\x00\x00":
        return Kind("image", "BMP")  # BM + size + two reserved zero words
    if head[:4] in (b"RIFF", b"RF64"):
        return {b"WEBP": Kind("image", "WebP"), b"WAVE": Kind("audio", "WAV"),
                b"AVI ": Kind("video", "AVI")}.get(head[8:12])
    if head.startswith(b"FORM") and head[8:12] in (b"AIFF", b"AIFC"):
        return Kind("audio", "AIFF")
    if head.startswith(b"fLaC"):
        return Kind("audio", "FLAC")
    if head.startswith(b"OggS"):
        return Kind("audio", "OGG")
    if head.startswith(b"ID3") or _is_mpeg_audio_sync(head):
        return Kind("audio", "MP3")
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in _IMAGE_BRANDS:
            return Kind("image", _IMAGE_BRANDS[brand])
        if brand in _AUDIO_BRANDS:
            return Kind("audio", _AUDIO_BRANDS[brand])
        return Kind("video", "MOV" if brand == b"qt  " else "MP4")
    if head[4:8] in _QUICKTIME_ATOMS:
        return Kind("video", "MOV")
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        return Kind("video", "WebM" if b"webm" in head else "Matroska")
    if head.startswith(b"\x93NUMPY"):
        return Kind("array", "NPY")
    if head.startswith(b"glTF"):
        return Kind("mesh", "GLB")
    if head.startswith((b"ply\n", b"ply\r\n")):
        return Kind("mesh", "PLY")
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return Kind("pickle", "pickle")
    if head.startswith(b"\x1f\x8b"):
        return Kind("archive", "gzip")
    if head.startswith(b"%PDF"):
        return Kind("document", "PDF")
    return None


def _point_cloud(data: bytes) -> Kind | None:
    if data.startswith(b"LASF"):
        # the point data format byte (offset 104) has bit 7 (or bit 6, in older LAZ) set when compressed
        return Kind("points", "LAZ" if len(data) > 104 and data[104] & 0xC0 else "LAS")
    # PCL writes "# .PCD v0.7 - Point Cloud Data file format" first; other writers other comments
    if data.startswith((b"# .PCD", b"VERSION")) or data.startswith(b"#") and b"\nVERSION " in data[:1024]:
        return Kind("points", "PCD")
    return None


def _zip(data: bytes) -> Kind | None:
    if not data.startswith(b"PK\x03\x04") or len(data) < 30:
        return None
    # NumPy's .npz is a ZIP of .npy files: its first member's name, after the 30-byte local header
    name_length = int.from_bytes(data[26:28], "little")
    first_member = data[30:30 + name_length]
    return Kind("archive", "NPZ" if first_member.endswith(b".npy") else "ZIP")


def _is_mpeg_audio_sync(head: bytes) -> bool:
    # 11 sync bits, then a layer field that is non-zero (zero would be AAC in ADTS).
    return len(head) >= 4 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0 and head[1] & 0x06 != 0


def _looks_like_text(sample: bytes) -> bool:
    if not sample or b"\x00" in sample:
        return False
    # The sample may end in the middle of a multi-byte character.
    for cut in range(4):
        try:
            sample[: len(sample) - cut].decode("utf-8")
            return True
        except UnicodeDecodeError:
            continue
    return False


def _text_kind(sample: bytes) -> Kind:
    text = sample.decode("utf-8", errors="ignore").lstrip("\ufeff")
    lines = [line.strip() for line in text.splitlines()]
    first = next((line for line in lines if line and not line.startswith("#")), "")
    if first.split()[:1] in (["OFF"], ["COFF"]):
        return Kind("mesh", "OFF")
    if first.startswith("solid") and "facet" in text:
        return Kind("mesh", "STL")
    if any(line.startswith("v ") for line in lines):
        return Kind("mesh", "OBJ")
    return Kind("text", "text")


def _is_binary_stl(data: bytes) -> bool:
    # Binary STL has no magic: an 80-byte header, a triangle count, 50 bytes per triangle.
    if len(data) < 84:
        return False
    (count,) = struct.unpack("<I", data[80:84])
    return count > 0 and len(data) == 84 + 50 * count


def check_kind(data: bytes, param: str, accepted: set[str], expected: str) -> Kind | None:
    """Sniff `data`, raising 415 when it is recognisably something the field cannot take.

    Returns the kind (None if unrecognised: the caller's decoder gets to try it).
    """
    if not data:
        raise InputError(422, f"field '{param}' is empty, expected {expected}", param)
    kind = sniff(data)
    if kind is not None and kind.family not in accepted:
        raise InputError(415, f"field '{param}' holds {kind.describe()}, expected {expected}", param)
    return kind


def undecodable(param: str, kind: Kind | None, expected: str, error: Exception) -> InputError:
    """The error for a decoder failure: 422 if the bytes looked right (so the file is
    damaged), 415 if we could not tell what they were (so it is not a format we read)."""
    if kind is None:
        return InputError(415, f"field '{param}' is not {expected} in a format we can read "
                               f"({_short(error)})", param)
    return InputError(422, f"field '{param}' holds {kind.describe()} that could not be decoded "
                           f"({_short(error)})", param)


def _short(error: Exception) -> str:
    # Decoders name the stream they read from ("<_io.BytesIO object at 0x…>"): noise to a client.
    text = re.sub(r"<[^<>]* at 0x[0-9a-fA-F]+>", "the upload", str(error)).strip()
    text = text or type(error).__name__
    return text if len(text) <= 200 else text[:197] + "..."
