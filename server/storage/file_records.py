"""The record of an uploaded file, the same in every file store, and what the stores share."""

import hashlib
import json
import secrets
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass

from server.cache.redis_client import REDIS_ERRORS
from server.errors import Unavailable

# a download is read and sent this much at a time: what one held by a reader that stopped reading costs
PIECE_BYTES = 256 << 10


@dataclass(frozen=True)
class StoredFile:
    id: str
    bytes: int
    created_at: int
    expires_at: int
    filename: str
    purpose: str
    sha256: str
    kind: str  # what sniffing found: image, video, audio, array, mesh, text; "" when unrecognised
    uploaded_at: float  # created_at to the microsecond: lists keep the upload order within a second

    def openai(self) -> dict:
        return {"id": self.id, "object": "file", "bytes": self.bytes, "created_at": self.created_at,
                "expires_at": self.expires_at, "filename": self.filename, "purpose": self.purpose,
                "status": "processed", "status_details": None}

    def expired(self, now: float) -> bool:
        return self.expires_at <= now


def new_record(data: bytes, filename: str, purpose: str, ttl_s: int, kind: str) -> StoredFile:
    now = time.time()
    return StoredFile("file-" + secrets.token_hex(12), len(data), int(now), int(now) + ttl_s, filename, purpose,
                      hashlib.sha256(data).hexdigest(), kind, now)


def stored_file_from_json(raw: bytes) -> StoredFile | None:
    try:
        return StoredFile(**json.loads(raw))
    except (ValueError, TypeError):
        return None


def tenant_key(tenant: str) -> str:
    # API key ids are free text in the keys file; a hash is always a safe file and key name
    return hashlib.sha256(tenant.encode()).hexdigest()[:32]


@asynccontextmanager
async def unavailable_as_503():
    """A store that fails (a full or failing disk, a Redis that is down) is a 503 for the request."""
    try:
        yield
    except REDIS_ERRORS as e:
        raise Unavailable(f"the file store is unavailable ({type(e).__name__})", headers={"Retry-After": "1"}) from None
