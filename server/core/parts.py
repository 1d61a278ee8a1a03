"""What every API's media parts carry, whatever shape the API gives them: bytes inline (base64, a
`data:` URL), a remote URL or a stored file read beforehand (see media/fetch.py), or only the uuid
of an attachment sent before; and a part's own sample rate. Each becomes an Upload, its errors
naming the part's keys as the API spells them."""

import binascii
import re
from dataclasses import dataclass, field

from server.core.chat import Upload
from server.errors import InputError
from server.media.fetch import Fetched
from server.media.sniff import Kind, sniff

SANE_UUID = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")
# the upload field of a stored file, from what its bytes are; arrays and text could be any of
# several modalities, so those are sent in a part that names one
FILE_FIELDS = {"image": "image", "video": "video", "audio": "audio", "mesh": "point", "points": "point"}
# binascii holds the GIL while it decodes, ~80 ms for a 40 MiB file. A piece (~1.5 ms; a multiple
# of 4 characters) at a time, the GIL can pass to the event loop's thread between pieces
BASE64_PIECE = 1 << 20


@dataclass
class References:
    """What a request's parts point at outside it, known before any part is read: the upload field
    of each media part (to count the attachments), and the remote URLs and stored files, each as
    (the param naming it, the URL or file id)."""

    fields: list[str] = field(default_factory=list)
    urls: list[tuple[str, str]] = field(default_factory=list)
    file_ids: list[tuple[str, str]] = field(default_factory=list)

    def add(self, body: object, where: str, keys: str, url_key: str | None = None) -> None:
        """What the `body` of the part `where` points at: a stored file (`file_id`), a remote URL
        (under `url_key`); `keys` as for media_upload."""
        if not isinstance(body, dict):
            return
        if isinstance(file_id := body.get("file_id"), str):
            self.file_ids.append((f"{where}.{keys}file_id", file_id))
        if url_key and is_remote(url := body.get(url_key)):
            self.urls.append((f"{where}.{keys}{url_key}", url))


def checked_uuid(uuid: object, param: str) -> str | None:
    if uuid is not None and not (isinstance(uuid, str) and SANE_UUID.fullmatch(uuid)):
        raise InputError(400, "a uuid is 1 to 128 letters, digits or ._:@/+=-", param)
    return uuid


def decode_base64(text: object, param: str, start: int = 0) -> bytes:
    """`text[start:]` decoded, strictly: only the alphabet, padding only at the end."""
    if not isinstance(text, str):
        raise InputError(400, "expected a base64 string", param)
    pieces = []
    try:
        for at in range(start, len(text), BASE64_PIECE):
            piece = text[at:at + BASE64_PIECE]
            if at + BASE64_PIECE < len(text) and "=" in piece:
                raise binascii.Error("padding before the end")
            pieces.append(binascii.a2b_base64(piece, strict_mode=True))
    except (binascii.Error, ValueError):  # ValueError: characters beyond ASCII
        raise InputError(400, "not valid base64", param) from None
    return b"".join(pieces)


def is_remote(url: object) -> bool:
    # not urlsplit: it copies the whole string a few times, and a data URL can be tens of MiB
    return isinstance(url, str) and url[:8].lower().startswith(("http://", "https://"))


def url_bytes(url: object, param: str, fetched: Fetched) -> bytes:
    """A `data:` URL's bytes, or a remote URL's from those fetched (none when remote URLs are not allowed)."""
    if not isinstance(url, str):
        raise InputError(400, "expected a URL string", param)
    if url.startswith("data:"):
        comma = url.find(",")  # the payload is not copied out of the URL: it can be tens of MiB
        if comma < 0 or not url[:comma].endswith(";base64"):
            raise InputError(400, "expected a base64 data URL: data:<type>;base64,<data>", param)
        return decode_base64(url, param, start=comma + 1)
    if is_remote(url):
        if url not in fetched.urls:
            raise InputError(400, "remote URLs are not accepted by this server; send the file as a data: URL", param)
        return fetched.urls[url]
    raise InputError(400, "unsupported URL scheme; send a data: URL", param)


def media_upload(field_name: str, body: dict | None, inline: str, uuid: str | None, where: str, keys: str,
                 fetched: Fetched) -> Upload:
    """The upload of the media part `where`: the bytes inline in `body[inline]` (a URL when `inline`
    names one, else base64), a stored file's (`body["file_id"]`), or none when the part carries
    only the `uuid` of an attachment sent before. `field_name` "file": the bytes tell which upload
    it is. `keys`: how a param names the body's keys below the part ("image_url." where the body
    nests in the part, "" where the body is the part itself). A `sample_rate` in the body is the
    part's own, over the request's."""
    if field_name == "file":
        upload = _file_upload(body, uuid, where, keys, fetched)
    elif body is not None and "file_id" in body:
        param = f"{where}.{keys}file_id"
        upload = Upload(field_name, stored_bytes(body["file_id"], param, fetched)[1], param, uuid, body["file_id"])
    elif body is not None and body.get(inline) is not None:
        param = f"{where}.{keys}{inline}"
        data = url_bytes(body[inline], param, fetched) if inline.endswith("url") else decode_base64(body[inline], param)
        upload = Upload(field_name, data, param, uuid)
    elif uuid is None:
        raise InputError(400, f"the part carries no data: send '{keys}{inline}', a '{keys}file_id', or the 'uuid' "
                              "of an attachment sent before", where)
    else:
        upload = Upload(field_name, None, where, uuid)
    if isinstance(body, dict) and "sample_rate" in body:
        upload = upload._replace(options={"imu_sample_rate": sample_rate(body["sample_rate"],
                                                                         f"{where}.{keys}sample_rate")})
    return upload


def _file_upload(body: dict | None, uuid: str | None, where: str, keys: str, fetched: Fetched) -> Upload:
    """A file part (`file_id` or `file_data`): the modality is what the bytes are."""
    if not isinstance(body, dict) or not ({"file_id", "file_data"} & body.keys()):
        raise InputError(400, f"a file part needs '{keys}file_id' (from POST /v1/files) or '{keys}file_data'", where)
    if "file_id" in body:
        param, file_id = f"{where}.{keys}file_id", body["file_id"]
        kind, data = stored_bytes(file_id, param, fetched)
    else:
        param, file_id = f"{where}.{keys}file_data", None
        data = url_bytes(body["file_data"], param, fetched) if str(body["file_data"]).startswith("data:") \
            else decode_base64(body["file_data"], param)
        kind = (sniff(data) or Kind("", "")).family
    if kind not in FILE_FIELDS:
        raise InputError(400, "a file part's bytes must be an image, a video, audio, a 3D mesh or a point cloud; "
                              "send arrays and other files in the part of their modality (input_fmri, input_imu, "
                              "input_point, input_depth, input_normal) with a file_id or data", param)
    return Upload(FILE_FIELDS[kind], data, param, uuid, file_id)


def stored_bytes(file_id: object, param: str, fetched: Fetched) -> tuple[str, bytes]:
    """(kind, bytes) of a stored file the request names (read beforehand: see References)."""
    if not isinstance(file_id, str):
        raise InputError(400, "a file_id is a string, from POST /v1/files", param)
    return fetched.files[file_id]


def sample_rate(value: object, param: str) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value <= 10000:
        raise InputError(400, "expected a number in (0, 10000]", param)
    return float(value)
