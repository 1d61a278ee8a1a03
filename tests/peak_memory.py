"""A process's peak resident memory around one piece of work, from /proc.

The kernel keeps a high-water mark of each process's RSS (VmHWM); writing 5 to its clear_refs
sets the mark back to the current RSS (Linux ≥ 4.0), so the mark read after the work is the
peak reached during it, not one that model loading or an earlier test left behind."""

from contextlib import contextmanager
from pathlib import Path


def _status_kib(pid: int | str, field: str) -> int:
    for row in Path(f"/proc/{pid}/status").read_text().splitlines():
        if row.startswith(field + ":"):
            return int(row.split()[1])
    raise RuntimeError(f"no {field} in /proc/{pid}/status")


def rss_bytes(pid: int | str = "self") -> int:
    return _status_kib(pid, "VmRSS") * 1024


def reset_peak(pid: int | str = "self") -> int:
    """Sets the process's peak back to its RSS now; returns that RSS in bytes."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    return rss_bytes(pid)


def peak_bytes(pid: int | str = "self") -> int:
    return _status_kib(pid, "VmHWM") * 1024


class PeakGrowth:
    """`added`: how far the peak rose above the RSS at the start of the block, in bytes."""

    added: int = 0


@contextmanager
def peak_growth(pid: int | str = "self"):
    growth = PeakGrowth()
    start = reset_peak(pid)
    yield growth
    growth.added = peak_bytes(pid) - start
