"""Uploaded files (OpenAI's Files API): bytes kept once per content, a record per upload, each
record its API key's own and gone when it expires.

Two stores behind one interface: a local directory (the default; it survives restarts) and Redis
(every gateway replica sees the same files). Both keep a file's bytes once however many uploads
bring them, and drop the bytes when the last record naming them is deleted or expires. Here: what
an upload must be, and which store the settings choose.
"""

from server.config import DecoderLimits
from server.errors import InputError
from server.media.decoders.arrays import load_array
from server.media.decoders.images import decode_image
from server.media.sniff import sniff
from server.storage.local_batches import LocalBatchStore
from server.storage.local_files import LocalFileStore
from server.storage.redis_batches import RedisBatchStore
from server.storage.redis_files import RedisFileStore

PURPOSES = ("user_data", "vision", "batch")
# what each modality's decoders read; anything else (pickles, archives, documents) is refused on upload
ACCEPTED_FAMILIES = {"image", "video", "audio", "array", "mesh", "points", "text"}


def check_upload(data: bytes, limits: DecoderLimits) -> str:
    """What kind of file `data` is, after the checks inline attachments get before decoding:
    the bytes name the kind (never the file name), and a kind no decoder reads is refused."""
    param = "file"
    if not data:
        raise InputError(422, "the uploaded file is empty", param)
    kind = sniff(data)
    if kind is None:
        return ""  # a decoder may still read it: decided when a chat uses it, as for inline bytes
    if kind.family not in ACCEPTED_FAMILIES:
        raise InputError(415, f"the uploaded file is {kind.describe()}, which no modality reads; accepted: "
                              "images, videos, audio, .npy or CSV arrays, 3D meshes, point clouds "
                              "(a .npz depth or normal map is read when sent inline, in its field)", param)
    if kind.family == "image":  # the header's pixel count, as for an inline image
        decode_image(data, param, limits.max_image_pixels)
    if kind.family == "array":  # object arrays are pickles in disguise
        load_array(data, param, max_decode_mb=limits.max_decode_mb)
    return kind.family


def file_store_for(settings) -> LocalFileStore | RedisFileStore:
    if settings.files_url:
        return RedisFileStore(settings.files_url)
    return LocalFileStore(settings.files_dir)


def batch_store_for(settings) -> LocalBatchStore | RedisBatchStore:
    """The batches live where the files they read and write do: shared by the gateways sharing those."""
    if settings.files_url:
        return RedisBatchStore(settings.files_url, settings.batch_lease_ttl_s)
    return LocalBatchStore(settings.files_dir)
