"""What the batch stores share: a batch is kept as its OpenAI object with its API key's tenant,
and each finished line as its output line, under its custom_id, so that a line answered twice
(its gateway died after answering it, before the batch went on, or two gateways answered it) is
still one line of output: the first answer stored is the one kept."""

import json

# a batch in one of these is done: nothing runs it, and nothing resumes it
FINAL_STATES = ("completed", "failed", "expired", "cancelled")


class LeaseLost(Exception):
    """Another gateway runs the batch now: this one's lease lapsed (it stalled past the lease's TTL)."""


def plain_batch_id(batch_id: str) -> bool:
    # ids come from URLs: one that is not ours must not become a path or a key pattern
    return batch_id.startswith("batch_") and batch_id[6:].isalnum() and len(batch_id) <= 64


def encode_batch(tenant: str, batch: dict) -> bytes:
    return json.dumps({"tenant": tenant, "batch": batch}).encode()


def decode_batch(raw: bytes | None) -> tuple[str, dict] | None:
    """(tenant, batch) of a stored batch; None for nothing, or for bytes that are not one."""
    try:
        stored = json.loads(raw) if raw is not None else None
        return (stored["tenant"], stored["batch"]) if stored is not None else None
    except (ValueError, TypeError, KeyError):
        return None


def results_by_custom_id(lines) -> dict[str, dict]:
    """The output lines, by custom_id, the first of each; a line cut short by a crash while it was
    written is skipped."""
    found = {}
    for raw in lines:
        try:
            result = json.loads(raw)
            found.setdefault(result["custom_id"], result)
        except (ValueError, TypeError, KeyError):
            continue
    return found
