"""What a decoder may cost, decided from what it knows before decoding (headers, sizes), and the
cancellation it checks between blocks of work.

Every decoder estimates its working set from the header's pixels, samples or values before it
decodes anything, and refuses past `max_decode_mb`; while it works it checks `cancel` (a
threading.Event the serving layer sets when nobody waits for the result any more)."""

import threading

from server.errors import Cancelled, InputError

MAX_DECODE_MB = 512.0
MiB = 1 << 20


def check_decode_memory(estimate_bytes: float, max_decode_mb: float, param: str, what: str) -> None:
    """413 when decoding `what` would take more than max_decode_mb of working memory."""
    if estimate_bytes > max_decode_mb * MiB:
        raise InputError(413, f"field '{param}' holds {what}: decoding it needs about "
                              f"{estimate_bytes / MiB:.0f} MB, more than the limit of "
                              f"{max_decode_mb:g} MB (max_decode_mb)", param)


def check_cancelled(cancel: threading.Event | None) -> None:
    if cancel is not None and cancel.is_set():
        raise Cancelled
