"""What this machine is and how its memory is handed back: the CPU's capability flags and model name, and
returning freed heap memory to the system. The one place engine, quantization and benchmarks read them."""

from __future__ import annotations

import ctypes
import ctypes.util
import platform
from functools import cache
from pathlib import Path
from typing import Any

import torch

CPUINFO = Path("/proc/cpuinfo")
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def _cpuinfo_field(prefix: str) -> str | None:
    """The value of the first /proc/cpuinfo line starting with `prefix` (None off Linux or when absent)."""
    try:
        for line in CPUINFO.read_text(errors="replace").splitlines():
            if line.startswith(prefix):
                return line.partition(":")[2].strip()
    except OSError:
        return None
    return None


def cpu_flags() -> frozenset[str]:
    """This machine's CPU capability flags: /proc/cpuinfo's (Linux) and PyTorch's own capability name."""
    flags = {torch.backends.cpu.get_cpu_capability().lower()}
    flags.update((_cpuinfo_field("flags") or "").split())
    return frozenset(flags)


def has_native_bf16(flags: frozenset[str] | set[str] | None = None) -> bool:
    """Whether the CPU multiplies bfloat16 natively (oneDNN's avx512_bf16 or AMX kernels); without, PyTorch's
    16-bit matmuls are generic loops. `flags`: a capability set (default this machine's, read once)."""
    return _native_bf16_here() if flags is None else bool(NATIVE_BF16_FLAGS & {f.lower() for f in flags})


def computes_natively(dtype: torch.dtype, flags: frozenset[str] | set[str] | None = None) -> bool:
    """Whether the CPU multiplies matrices of `dtype` with its own arithmetic: float32 always, bfloat16 where
    `has_native_bf16`, float16 never (PyTorch has no native float16 CPU matmul)."""
    return dtype not in (torch.bfloat16, torch.float16) or (dtype == torch.bfloat16 and has_native_bf16(flags))


@cache
def _native_bf16_here() -> bool:
    return has_native_bf16(cpu_flags())


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo), or the platform's processor string."""
    return _cpuinfo_field("model name") or platform.processor() or "unknown"


def release_free_memory() -> None:
    """Return freed heap memory to the system; glibc otherwise keeps the blocks of freed tensors, and a load
    that frees a float weight per quantized or packed layer would grow by all of them."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _load_libc() -> Any:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


_LIBC = _load_libc()
