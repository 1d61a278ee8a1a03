"""A bounded LRU of attachment prefixes: a chat resends its files every turn, the encoder runs once."""

import hashlib
from collections import OrderedDict

import torch


def prefix_key(model: str, modality: str, files: dict[str, bytes], options: dict) -> str:
    digest = hashlib.sha256(f"{model}\0{modality}\0{sorted(options.items())}".encode())
    for name in sorted(files):
        digest.update(name.encode() + b"\0" + len(files[name]).to_bytes(8, "little"))
        digest.update(files[name])  # apart: joined to the header, a 64 MiB file was copied first
    return digest.hexdigest()


class PrefixCache:
    def __init__(self, capacity_bytes: int):
        self.capacity = capacity_bytes
        self.size = 0
        self.entries: OrderedDict[str, torch.Tensor] = OrderedDict()

    def get(self, key: str) -> torch.Tensor | None:
        value = self.entries.get(key)
        if value is not None:
            self.entries.move_to_end(key)
        return value

    def put(self, key: str, value: torch.Tensor) -> None:
        nbytes = value.numel() * value.element_size()
        if nbytes > self.capacity or key in self.entries:
            return
        self.entries[key] = value
        self.size += nbytes
        while self.size > self.capacity:
            _, old = self.entries.popitem(last=False)
            self.size -= old.numel() * old.element_size()
