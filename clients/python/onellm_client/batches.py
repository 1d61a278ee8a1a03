"""Batches over HTTP (OpenAI's Batch API on a OneLLM gateway): a folder of files and a prompt made
into batch input lines, a batch submitted and followed, its results read back."""

import json
import time
from pathlib import Path

from onellm_client.client import Client

FINAL = ("completed", "failed", "expired", "cancelled")
# the upload field of a file, by extension; arrays (.npy, .csv) could be a point cloud, fMRI or IMU: --modality
FIELD_OF_EXTENSION = {**dict.fromkeys((".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif"), "image"),
                      **dict.fromkeys((".mp4", ".webm", ".mov", ".mkv", ".avi"), "video"),
                      **dict.fromkeys((".wav", ".flac", ".ogg", ".mp3", ".m4a"), "audio"),
                      **dict.fromkeys((".ply", ".obj", ".glb", ".gltf", ".stl", ".off"), "point")}


def field_of(path: Path, modality: str | None) -> str:
    field = modality or FIELD_OF_EXTENSION.get(path.suffix.lower())
    if field is None:
        raise ValueError(f"{path.name}: which modality is a '{path.suffix}' file? say it with --modality")
    return field


def folder_lines(client: Client, folder: Path, prompt: str, model: str, modality: str | None = None,
                 max_tokens: int | None = None) -> list[dict]:
    """One chat completion request per file of `folder` (sorted by name, custom_id = the file name),
    each file uploaded once and named by its file_id."""
    lines = []
    for path in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
        field = field_of(path, modality)
        stored = upload(client, path.name, path.read_bytes(), "user_data")
        body = {"model": model, "messages": [{"role": "user", "content": [
            {"type": f"input_{field}", f"input_{field}": {"file_id": stored["id"]}}, {"type": "text", "text": prompt}]}]}
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
        lines.append({"custom_id": path.name, "method": "POST", "url": "/v1/chat/completions", "body": body})
    if not lines:
        raise ValueError(f"no files in {folder}")
    return lines


def upload(client: Client, name: str, data: bytes, purpose: str) -> dict:
    return client._send("POST", "/v1/files", files={"file": (name, data)}, data={"purpose": purpose}).json()


def submit(client: Client, data: bytes, endpoint: str = "/v1/chat/completions") -> dict:
    stored = upload(client, "batch.jsonl", data, "batch")
    return client._send("POST", "/v1/batches", json={"input_file_id": stored["id"], "endpoint": endpoint,
                                                     "completion_window": "24h"}).json()


def status(client: Client, batch_id: str) -> dict:
    return client._send("GET", f"/v1/batches/{batch_id}").json()


def results(client: Client, batch: dict, errors: bool = False) -> bytes:
    file_id = batch.get("error_file_id" if errors else "output_file_id")
    return client._send("GET", f"/v1/files/{file_id}/content").content if file_id else b""


def jsonl(lines: list[dict]) -> bytes:
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


def progress_line(batch: dict, started: float, done_at_start: int, now: float) -> str:
    """`[#####.....] 45/100 (2 failed) 3.1 lines/s ETA 0:00:18 in_progress`; the rate is of the lines
    done while this was watching."""
    counts = batch.get("request_counts") or {}
    total, finished = counts.get("total", 0), counts.get("completed", 0) + counts.get("failed", 0)
    width = 20
    filled = width * finished // total if total else 0
    text = f"[{'#' * filled}{'.' * (width - filled)}] {finished}/{total}"
    if counts.get("failed"):
        text += f" ({counts['failed']} failed)"
    rate = (finished - done_at_start) / (now - started) if now > started else 0.0
    if rate > 0:
        left = round((total - finished) / rate)
        text += f" {rate:.1f} lines/s ETA {left // 3600}:{left // 60 % 60:02d}:{left % 60:02d}"
    return f"{text} {batch['status']}"


def follow(client: Client, batch_id: str, show, every_s: float = 1.0) -> dict:
    """Polls the batch until it ends, handing `show` a progress line each time; the last batch."""
    batch = status(client, batch_id)
    started, done_at_start = time.monotonic(), _finished(batch)
    while True:
        show(progress_line(batch, started, done_at_start, time.monotonic()))
        if batch["status"] in FINAL:
            return batch
        time.sleep(every_s)
        batch = status(client, batch_id)


def _finished(batch: dict) -> int:
    counts = batch.get("request_counts") or {}
    return counts.get("completed", 0) + counts.get("failed", 0)
