"""Which dtype the encoder and the embedded LLM compute in: one decision, from the device, the
CPU's instruction sets and what was asked for, whatever dtype the weights were written in.

On a CPU the dtype decides which kernels run: with AVX512-BF16 or AMX, bfloat16 matrix products
run several times faster than float32 and read half the bytes; without native float16 (AVX512-FP16
or AMX-FP16), float16 has no fast kernels at all. On a GPU the weights' own half dtype is the fast
one, so it is kept.
"""

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger("onellm.model")

CHOICES = ("auto", "float32", "float16", "bfloat16")
NATIVE_BF16 = frozenset({"avx512_bf16", "amx_bf16"})  # /proc/cpuinfo flags
NATIVE_FP16 = frozenset({"avx512_fp16", "amx_fp16"})
# torch `@`, 2 threads: on a 2-core Zen 4 (avx512_bf16, no native fp16), and on a 2-core AVX2 EPYC
EMULATED_COST = ("{dtype} has no native kernels on this CPU (no {instructions}): matrix products run "
                 "tens to hundreds of times slower than in float32 (measured: float16 3.2 GFLOP/s on a Zen 4 "
                 "against ~180 in float32; bfloat16 1.2 GFLOP/s on an AVX2 EPYC against ~130); --dtype auto picks the fast one")
INSTRUCTIONS = {torch.bfloat16: "AVX512-BF16 or AMX", torch.float16: "AVX512-FP16 or AMX-FP16"}


@dataclass(frozen=True)
class DtypeChoice:
    dtype: torch.dtype
    reason: str
    warning: str | None = None
    asked: bool = False  # given with --dtype rather than decided here

    @property
    def name(self) -> str:
        return str(self.dtype).removeprefix("torch.")


def choose_dtype(requested: str, device: str, stored: torch.dtype, cpu_flags: frozenset[str]) -> DtypeChoice:
    """The compute dtype for weights written in `stored`, on `device` ("cpu", "cuda:0", ...), on a
    CPU with `cpu_flags` (those of /proc/cpuinfo), when `requested` is one of CHOICES."""
    if requested not in CHOICES:
        raise ValueError(f"unknown dtype {requested!r} (one of {', '.join(CHOICES)})")
    on_cpu = torch.device(device).type == "cpu"
    if requested != "auto":
        dtype = getattr(torch, requested)
        slow = on_cpu and not native_on_cpu(dtype, cpu_flags)
        warning = EMULATED_COST.format(dtype=requested, instructions=INSTRUCTIONS[dtype]) if slow else None
        return DtypeChoice(dtype, "asked for (--dtype)", warning, asked=True)
    if not on_cpu:
        return DtypeChoice(stored, f"the weights' own dtype on {device}")
    if native_on_cpu(torch.bfloat16, cpu_flags):
        found = ", ".join(sorted(cpu_flags & NATIVE_BF16))
        return DtypeChoice(torch.bfloat16, f"this CPU computes bfloat16 natively ({found})")
    return DtypeChoice(torch.float32, "this CPU has no native bfloat16 (no AVX512-BF16 or AMX)")


def native_on_cpu(dtype: torch.dtype, cpu_flags: frozenset[str]) -> bool:
    """Whether a CPU with `cpu_flags` has fast kernels for `dtype`: float32 always, the half dtypes
    only with their own instructions (emulated, they run at about 1 GFLOP/s)."""
    needs = {torch.bfloat16: NATIVE_BF16, torch.float16: NATIVE_FP16}.get(dtype)
    return needs is None or bool(cpu_flags & needs)


def host_cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The instruction-set flags of this machine's CPU; none where /proc/cpuinfo is not there."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def decide_dtype(requested: str, device: str, stored: torch.dtype) -> DtypeChoice:
    """choose_dtype on this machine's CPU, logged with its reason (and warning, if any)."""
    choice = choose_dtype(requested, device, stored, host_cpu_flags())
    log.info("computing in %s on %s: %s (weights stored in %s)", choice.name, device, choice.reason,
             str(stored).removeprefix("torch."))
    if choice.warning:
        log.warning(choice.warning)
    return choice
