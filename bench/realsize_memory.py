"""Peak memory of each part of a benchmark: the process's RSS high-water mark on a CPU (reset
between parts through /proc/self/clear_refs), the allocator's peak on a GPU."""

from contextlib import contextmanager
from pathlib import Path

import torch


class Peak:
    bytes: int | None = None


def _status_bytes(field: str) -> int:
    for row in Path("/proc/self/status").read_text().splitlines():
        if row.startswith(field + ":"):
            return int(row.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


class PeakMemory:
    def __init__(self, device: torch.device):
        self.device = device

    def _reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM back to the RSS now (Linux >= 4.0)

    def _peak(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        return _status_bytes("VmHWM")

    @contextmanager
    def phase(self, name: str):
        """Yields a Peak whose `bytes` holds the highest memory reached inside the block, once it ends."""
        peak = Peak()
        self._reset()
        try:
            yield peak
        finally:
            peak.bytes = self._peak()
            print(f"  peak memory, {name}: {peak.bytes / 2**30:.2f} GiB", flush=True)
