"""bfloat16 products on weights packed in panels of 32 output columns, by panel_linear.c.

The C file is compiled on first use with the system's C compiler into a cache folder (a second
or two) and loaded with ctypes; where that cannot be done, `library()` is None and the products
stay oneDNN's (server/engines/linear.py). Its OpenMP runtime is torch's own: the library is
loaded after torch, whose libgomp.so.1 then answers the name, so both share one pool of threads.
"""

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
from functools import cache
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger("onellm.engines")

SOURCE = Path(__file__).with_name("panel_linear.c")
COLUMNS = 32  # a panel's output columns: two AVX-512 registers of float32 sums
NEEDS = frozenset({"avx512f", "avx512bw", "avx512vl", "avx512_bf16"})  # /proc/cpuinfo flags
FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mfma", "-fopenmp", "-shared", "-fPIC"]
OPS = {"none": 0, "silu": 1, "mul": 2, "add": 3}  # panel_linear.c's `enum op`


def cache_folder() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "onellm-serve"


@cache
def library() -> ctypes.CDLL | None:
    """panel_linear.c compiled and loaded, or None (logged) where it cannot be built or loaded."""
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if platform.machine() != "x86_64" or compiler is None:
        log.warning("no C compiler for x86-64 here: bfloat16 products of packed weights run through oneDNN")
        return None
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join(FLAGS).encode()).hexdigest()[:16]
    built = cache_folder() / f"panel_linear-{key}.so"
    try:
        if not built.exists():
            built.parent.mkdir(parents=True, exist_ok=True)
            partial = built.with_suffix(f".{os.getpid()}.tmp")
            run = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(partial)], capture_output=True, text=True)
            if run.returncode != 0:
                log.warning("compiling %s failed, products run through oneDNN: %s", SOURCE.name, run.stderr.strip())
                return None
            os.replace(partial, built)  # whole or absent, for a process compiling beside this one
        lib = ctypes.CDLL(str(built))
    except OSError as error:  # a cache folder it may not write, a library it cannot load
        log.warning("no %s (%s): bfloat16 products of packed weights run through oneDNN", built.name, error)
        return None
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    lib.panel_linear.argtypes = [pointer, pointer, pointer, pointer, pointer, size, size, size, ctypes.c_int,
                                 ctypes.c_int]
    lib.panel_linear.restype = None
    log.info("bfloat16 products of packed weights run on panels (%s)", built)
    return lib


def usable(cpu_flags: frozenset[str]) -> bool:
    """Whether panels serve the products on a CPU with `cpu_flags`: it has the instructions and the
    library compiles."""
    return NEEDS <= cpu_flags and library() is not None


class Panels(nn.Parameter):
    """A weight [N, K] packed as [N/32, K/2, 32, 2]: its own type, since a shape alone could be a
    convolution's."""


def pack(weight: torch.Tensor) -> Panels:
    """weight [N, K] bfloat16, N a multiple of 32 and K even -> panels [N/32, K/2, 32, 2]."""
    n, k = weight.shape
    return Panels(weight.detach().reshape(n // COLUMNS, COLUMNS, k // 2, 2).transpose(1, 2).contiguous(),
                  requires_grad=False)


def packable(weight: torch.Tensor) -> bool:
    return weight.dim() == 2 and weight.shape[0] % COLUMNS == 0 and weight.shape[1] % 2 == 0


def is_panels(weight: torch.Tensor) -> bool:
    return isinstance(weight, Panels)


def product(x: torch.Tensor, panels: torch.Tensor, bias: torch.Tensor | None = None, op: str = "none",
            other: torch.Tensor | None = None) -> torch.Tensor:
    """op(x [..., K] @ Wᵀ + bias, other) -> [..., N], W the weight `panels` was packed from; op is
    applied to the float32 sums before they are rounded, `other` is shaped as the product."""
    k, n = x.shape[-1], panels.shape[0] * COLUMNS
    if any(t is not None and t.dtype != torch.bfloat16 for t in (x, bias, other)):
        raise TypeError("panels multiply bfloat16 rows, add a bfloat16 bias and other")
    if k != 2 * panels.shape[1] or (bias is not None and bias.shape != (n,)) or \
            (other is not None and other.shape != (*x.shape[:-1], n)):
        raise ValueError(f"x {tuple(x.shape)}, bias and other do not fit a weight of {n}×{2 * panels.shape[1]}")
    x, bias, other = (None if t is None else t.contiguous() for t in (x, bias, other))
    y = torch.empty(*x.shape[:-1], n, dtype=torch.bfloat16)
    library().panel_linear(x.data_ptr(), panels.data_ptr(), None if bias is None else bias.data_ptr(),
                           None if other is None else other.data_ptr(), y.data_ptr(),
                           x.numel() // k, n, k, OPS[op], torch.get_num_threads())
    return y
