"""Weight-only int8 and int4 matmul kernels: one `Prepared` module per quantized weight.

The canonical quantized tensors (what dsvl2.quant's scheme writes and checkpoints hold):

- int8: `qweight` int8 [N, K] and `scales` float32 [N]: w = qweight * scale (per output channel).
- int4: `qweight` uint8 [N, K // 2], two values per byte (low nibble = input column 2j, high nibble =
  column 2j + 1, q in 0..15), `scales` and `mins` float16 [N, K // g]: w = q * scale + min for each
  group of g input columns (computed in float32).

`prepare_int8` and `prepare_int4` convert them once into the layout of the kernel that will run them
and return a `Prepared` module: `forward(x)` for x [..., K] in float32, bfloat16 or float16 returns
[..., N] in x's dtype, `dequantize()` gives the float32 [N, K] weight exactly, and `kernel` names the
kernel. Which kernel runs is decided in one place, the `_choose_*` functions (with the row limits
STOCK_MAX_ROWS_CPU and EXTENSION_MAX_ROWS_CPU); the environment variable DSVL2_QUANT_KERNEL forces a path:

- `auto` (default): the fastest measured path for the device (see benchmarks/NOTES_quant_kernels.md).
- `extension`: the AVX2 C++ kernels in csrc/qmatmul.cpp (built at first use and cached; `stock` when they
  cannot be built, with the reason in `extension()[1]` and in this module's log at INFO level).
- `stock`: PyTorch's own weight-only kernels (`_weight_int8pack_mm`, `_weight_int4pack_mm[_for_cpu]`).
- `dequantize`: dequantize the weight at each call and run F.linear (works for every device and shape).

Shapes that a kernel does not cover fall back to `dequantize`. This module is below the engine: it
imports only torch and dsvl2.machine.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import logging
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import threading
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dsvl2.machine import cpu_flags

log = logging.getLogger(__name__)

ENV_KERNEL = "DSVL2_QUANT_KERNEL"
MODES = ("auto", "extension", "stock", "dequantize")
GROUP_SIZES = (32, 64, 128)
# Where each CPU path stops and dequantize-then-F.linear takes over (benchmarks/NOTES_quant_kernels.md):
# PyTorch's stock int8 kernel reads the weight once per row of x, and loses to the dense float32 matmul from
# between 32 and 256 rows; the C++ kernels won or tied at every row count measured (1 to 256), so they take all.
STOCK_MAX_ROWS_CPU = 128
EXTENSION_MAX_ROWS_CPU: int | None = None


def kernel_mode() -> str:
    """The DSVL2_QUANT_KERNEL setting (auto when unset)."""
    mode = os.environ.get(ENV_KERNEL, "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"{ENV_KERNEL}={mode!r}: expected one of {', '.join(MODES)}")
    return mode


# ---------------------------------------------------------------------------------------------------
# Canonical scheme: checks and the exact dequantization


def check_int8(qweight: torch.Tensor, scales: torch.Tensor) -> None:
    if qweight.dtype != torch.int8 or qweight.dim() != 2:
        raise ValueError(f"int8 qweight must be a 2-d int8 tensor, got {qweight.dtype} {tuple(qweight.shape)}")
    if scales.shape != (qweight.shape[0],):
        raise ValueError(f"int8 scales must be [{qweight.shape[0]}], got {tuple(scales.shape)}")


# int4 scales and mins are float16: float32 ones cost 1 bit per weight with groups of 64 (llama.cpp, GPTQ and AWQ
# store float16 too); prepare_int4 rounds other float dtypes to it.
INT4_PARAM_DTYPE = torch.float16


def check_int4(qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, group_size: int) -> None:
    if qweight.dtype != torch.uint8 or qweight.dim() != 2:
        raise ValueError(f"int4 qweight must be a 2-d uint8 tensor, got {qweight.dtype} {tuple(qweight.shape)}")
    if group_size not in GROUP_SIZES:
        raise ValueError(f"int4 group size must be one of {GROUP_SIZES}, got {group_size}")
    n, k = qweight.shape[0], qweight.shape[1] * 2
    if k % group_size:
        raise ValueError(f"int4 group size {group_size} does not divide the input dimension {k}")
    expected = (n, k // group_size)
    if tuple(scales.shape) != expected or tuple(mins.shape) != expected:
        raise ValueError(f"int4 scales and mins must be {list(expected)}, got {tuple(scales.shape)} "
                         f"and {tuple(mins.shape)}")


def unpack_int4(qweight: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K // 2] (low nibble = column 2j) -> uint8 [N, K] of values 0..15."""
    return torch.stack((qweight & 0x0F, qweight >> 4), dim=-1).reshape(qweight.shape[0], -1)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K] of values 0..15 -> uint8 [N, K // 2] (low nibble = column 2j)."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def dequantize_int8(qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return qweight.to(torch.float32) * scales.to(torch.float32)[:, None]


def dequantize_int4_values(q: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, group_size: int) -> torch.Tensor:
    """q [N, K] (0..15, any integer dtype) -> float32 [N, K] = q * scale + min per group."""
    n, k = q.shape
    grouped = q.to(torch.float32).view(n, k // group_size, group_size)
    w = grouped * scales.to(torch.float32)[..., None] + mins.to(torch.float32)[..., None]
    return w.view(n, k)


def dequantize_int4(qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, group_size: int) -> torch.Tensor:
    return dequantize_int4_values(unpack_int4(qweight), scales, mins, group_size)


# ---------------------------------------------------------------------------------------------------
# The module


class Prepared(nn.Module):
    """A quantized weight in its kernel's layout; `forward(x)` = x @ W.T with W = `dequantize()`."""

    kernel: str = "?"

    def __init__(self, out_features: int, in_features: int, bits: int, group_size: int | None = None):
        super().__init__()
        self.out_features = out_features
        self.in_features = in_features
        self.bits = bits
        self.group_size = group_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Lean on purpose: a decode step runs a few hundred of these (per-call overhead, see the notes).
        k = self.in_features
        if x.shape[-1] != k:
            raise ValueError(f"quantized linear expects {k} input features, got {x.shape[-1]}")
        x2 = x if x.dim() == 2 else x.reshape(-1, k)
        if x2.shape[0] == 0:
            return x.new_empty(*x.shape[:-1], self.out_features)
        out = self._matmul(x2)
        if out.dtype != x.dtype:
            out = out.to(x.dtype)
        return out if x.dim() == 2 else out.view(*x.shape[:-1], self.out_features)

    def _apply(self, fn, recurse=True):
        """Module.to / .half() / .cuda() convert buffers; the kernel's layout has fixed dtypes and a device of
        its own, so only a same-device no-op is allowed (prepare again for another device)."""
        for buffer in self._buffers.values():
            if buffer is None:
                continue
            moved = fn(buffer)
            if moved.device != buffer.device:
                raise RuntimeError(f"a prepared quantized weight ({self.kernel}) cannot move from {buffer.device} "
                                   f"to {moved.device}: prepare it for that device")
        return self

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:  # x [M, K] -> [M, N] (any float dtype)
        raise NotImplementedError

    def dequantize(self) -> torch.Tensor:
        raise NotImplementedError

    def _dense(self, x: torch.Tensor) -> torch.Tensor:
        """Dequantize-then-matmul: float32 on CPU (MKL), x's dtype elsewhere."""
        w = self.dequantize()
        if x.device.type == "cpu":
            return F.linear(x.to(torch.float32), w)
        return F.linear(x, w.to(x.dtype))

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.group_size else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}{group}, "
                f"kernel={self.kernel}")


class Int8Dequantize(Prepared):
    """int8 weight, dequantized to float at each call (the fallback for every device and shape)."""

    kernel = "int8-dequantize"

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor):
        super().__init__(qweight.shape[0], qweight.shape[1], 8)
        self.register_buffer("qweight", qweight.contiguous())
        self.register_buffer("scales", scales.to(torch.float32).contiguous())

    def dequantize(self) -> torch.Tensor:
        return dequantize_int8(self.qweight, self.scales)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        return self._dense(x)


class Int8Stock(Int8Dequantize):
    """int8 weight through `aten._weight_int8pack_mm` (bfloat16 activations and scales) for few rows,
    dequantize-then-matmul above `max_rows`."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, max_rows: int, name: str):
        super().__init__(qweight, scales)
        self.max_rows = max_rows
        self.kernel = name
        self.register_buffer("scales_bf16", self.scales.to(torch.bfloat16))

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > self.max_rows:
            return self._dense(x)
        return torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16).contiguous(), self.qweight, self.scales_bf16)


class Int4Dequantize(Prepared):
    """int4 weight in the canonical layout, dequantized at each call."""

    kernel = "int4-dequantize"

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, group_size: int):
        super().__init__(qweight.shape[0], qweight.shape[1] * 2, 4, group_size)
        self.register_buffer("qweight", qweight.contiguous())
        self.register_buffer("scales", scales.to(INT4_PARAM_DTYPE).contiguous())
        self.register_buffer("mins", mins.to(INT4_PARAM_DTYPE).contiguous())

    def dequantize(self) -> torch.Tensor:
        return dequantize_int4(self.qweight, self.scales, self.mins, self.group_size)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        return self._dense(x)


def _int4_scales_and_zeros(scales: torch.Tensor, mins: torch.Tensor) -> torch.Tensor:
    """PyTorch's int4pack kernels compute (q - 8) * scale + zero: zero = min + 8 * scale, laid out
    [K // g, N, 2] in bfloat16."""
    scales = scales.to(torch.float32)
    return torch.stack((scales, mins.to(torch.float32) + 8 * scales), dim=-1).transpose(0, 1).contiguous().to(
        torch.bfloat16)


class Int4StockCPU(Prepared):
    """int4 weight through `aten._weight_int4pack_mm_for_cpu` (its packed layout, bfloat16 activations).

    The op needs bfloat16 scales and zeros; the float16 scales and mins are kept beside them for an exact
    `dequantize()`; the 4-bit values are read back through the kernel itself (an identity matmul with scale 1
    and zero 8 gives q exactly)."""

    kernel = "int4-stock-cpu"

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, group_size: int):
        super().__init__(qweight.shape[0], qweight.shape[1] * 2, 4, group_size)
        q = unpack_int4(qweight).to(torch.int32)
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), 1))
        self.register_buffer("scales", scales.to(INT4_PARAM_DTYPE).contiguous())
        self.register_buffer("mins", mins.to(INT4_PARAM_DTYPE).contiguous())
        self.register_buffer("scales_and_zeros", _int4_scales_and_zeros(scales, mins))

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.to(torch.bfloat16).contiguous(), self.packed, self.group_size, self.scales_and_zeros)

    def _values(self) -> torch.Tensor:
        n, k, g = self.out_features, self.in_features, self.group_size
        unit = torch.stack((torch.ones(k // g, n), torch.full((k // g, n), 8.0)), dim=-1).to(torch.bfloat16)
        chunks = []
        for start in range(0, k, 256):
            eye = torch.eye(k, dtype=torch.bfloat16)[start:start + 256]
            chunks.append(torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.packed, g, unit))
        return torch.cat(chunks).t().round().to(torch.uint8)  # [N, K], values 0..15 exactly

    def dequantize(self) -> torch.Tensor:
        return dequantize_int4_values(self._values(), self.scales, self.mins, self.group_size)


# ---------------------------------------------------------------------------------------------------
# The C++ extension (csrc/qmatmul.cpp): built once per machine with flags chosen from the CPU, loaded via ctypes

SOURCE = Path(__file__).with_name("csrc") / "qmatmul.cpp"
ABI_VERSION = 5
TILE = 4  # output rows per tile of the C++ kernels' weight layout (dsvl2_qmatmul_tile)
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_extension_lock = threading.Lock()
_extension: tuple[object | None, str] | None = None



def isa_options(flags: frozenset[str]) -> tuple[list[str], str] | None:
    """Compiler flags and a name for the widest instruction set the kernels use on a CPU with `flags`;
    None where the CPU lacks AVX2, FMA or F16C."""
    base = ["-mavx2", "-mfma", "-mf16c"]
    if not {"avx2", "fma", "f16c"} <= flags:
        return None
    if "avx_vnni" in flags:
        return [*base, "-mavxvnni", "-DDSVL2_VNNI=1"], "avx2-vnni"
    if {"avx512f", "avx512vl", "avx512bw", "avx512_vnni"} <= flags:
        return [*base, "-mavx512f", "-mavx512vl", "-mavx512bw", "-mavx512vnni", "-DDSVL2_VNNI=2"], "avx512vl-vnni"
    return base, "avx2"


def _cache_dir() -> Path:
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root:
        return Path(root) / "dsvl2_qmatmul"
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "torch_extensions" / "dsvl2_qmatmul"


def _build(isa: list[str]) -> tuple[Path, bool]:
    """The shared library for this source, compiler and flags, from the cache or compiled into it, and whether
    it is a CPython module (where Python's headers are there) rather than a plain library for ctypes."""
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not compiler:
        raise RuntimeError("no C++ compiler (c++ or g++) on PATH")
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    options = ["-O3", "-shared", "-fPIC", "-fopenmp", "-std=c++17", *isa]
    include = sysconfig.get_paths().get("include") or ""
    python = bool(include) and (Path(include) / "Python.h").is_file()
    if python:
        options += ["-DDSVL2_PYTHON", f"-I{include}"]
    key = hashlib.sha256("\0".join([SOURCE.read_text(), version, sys.version, *options]).encode()).hexdigest()[:16]
    folder = _cache_dir()
    target = folder / f"qmatmul-{key}.so"
    if target.is_file():
        return target, python
    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / f".qmatmul-{key}-{os.getpid()}.so"
    done = subprocess.run([compiler, *options, str(SOURCE), "-o", str(partial)], capture_output=True, text=True,
                          timeout=600)
    if done.returncode:
        partial.unlink(missing_ok=True)
        first = next((line for line in done.stderr.splitlines() if "error" in line), done.stderr.strip()[:200])
        raise RuntimeError(f"compiling {SOURCE.name} failed: {first}")
    os.replace(partial, target)  # atomic: a concurrent build of the same key lands the same bytes
    return target, python


def _bind(path: Path, python: bool):
    """The kernels' entry points: the CPython module's functions, or the plain library's through ctypes (same
    arguments: integers, data pointers included)."""
    if python:
        spec = importlib.util.spec_from_file_location("dsvl2_qmatmul", path)
        lib = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(lib)
    else:
        lib = ctypes.CDLL(str(path))
        i64, ptr, c_int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
        lib.dsvl2_q8_matmul.argtypes = [ptr, c_int, i64, i64, ptr, ptr, i64, ptr, c_int]
        lib.dsvl2_q4_matmul.argtypes = [ptr, c_int, i64, i64, ptr, ptr, ptr, i64, i64, ptr, c_int]
        lib.dsvl2_q8_matmul.restype = lib.dsvl2_q4_matmul.restype = c_int
        lib.dsvl2_moe.argtypes = [ptr, c_int, i64, i64, ptr, i64, ptr, ptr, ptr, i64, ptr, c_int]
        lib.dsvl2_moe.restype = c_int
        for layout in (lib.dsvl2_q8_layout, lib.dsvl2_q4_layout, lib.dsvl2_group_tiles):
            layout.argtypes, layout.restype = [ptr, i64, i64, ptr, c_int], None
        lib.dsvl2_q4_quantize.argtypes = [ptr, c_int, i64, i64, i64, ptr, ptr, ptr, c_int]
        lib.dsvl2_q4_quantize.restype = None
        lib.dsvl2_q8_quantize.argtypes = [ptr, c_int, i64, i64, ptr, ptr, c_int]
        lib.dsvl2_q8_quantize.restype = None
    if lib.dsvl2_qmatmul_abi() != ABI_VERSION or lib.dsvl2_qmatmul_tile() != TILE:
        raise RuntimeError(f"{path.name} is a stale build")
    return lib


def _self_check(lib, isa_name: str) -> None:
    """Both kernels against dequantize-then-matmul on a small probe (they are built for CPUs that the tests
    may never have run on)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 192, generator=g)
    q8, s8 = torch.randint(-127, 128, (12, 192), generator=g, dtype=torch.int8), torch.rand(12, generator=g)
    q4 = torch.randint(0, 16, (12, 192), generator=g, dtype=torch.uint8)
    s4, m4 = ((torch.rand(12, 3, generator=g) - t).to(INT4_PARAM_DTYPE) for t in (0.0, 0.5))
    probes = ((Int8Extension(lib, isa_name, q8, s8, 0), dequantize_int8(q8, s8)),
              (Int4Extension(lib, isa_name, pack_int4(q4), s4, m4, 64, 0), dequantize_int4_values(q4, s4, m4, 64)))
    for module, w in probes:
        got, want = module._extension_matmul(x), F.linear(x, w)
        bound = F.linear(x.abs(), w.abs())
        if not bool(((got - want).abs() <= 0.02 * bound + 1e-4).all()):
            raise RuntimeError(f"{module.kernel} gave wrong results on this CPU")


def extension() -> tuple[object | None, str]:
    """The loaded kernels (or None) and one line saying which, or why not (for --verbose)."""
    global _extension
    with _extension_lock:
        if _extension is None:
            _extension = _load_extension()
            log.info("quant kernels: %s", _extension[1])
        return _extension


def _load_extension() -> tuple[object | None, str]:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None, f"no C++ kernels for {platform.machine()} CPUs: PyTorch's stock int8/int4 kernels"
    isa = isa_options(cpu_flags())
    if isa is None:
        return None, "the CPU lacks AVX2/FMA/F16C: PyTorch's stock int8/int4 kernels"
    try:
        lib = _bind(*_build(isa[0]))
        _self_check(lib, isa[1])
    except (OSError, RuntimeError, subprocess.SubprocessError, AttributeError) as error:
        return None, f"C++ kernels unavailable ({error}): PyTorch's stock int8/int4 kernels"
    return lib, f"C++ kernels built for {isa[1]} ({SOURCE.name})"


def _native_quantizer(weight: torch.Tensor) -> tuple[object, int] | None:
    """(extension, dtype code) where the C++ quantizers take `weight`: a CPU float weight, DSVL2_QUANT_KERNEL auto or
    extension, the extension built."""
    code = _DTYPE_CODES.get(weight.dtype)
    if code is None or weight.device.type != "cpu" or weight.dim() != 2 or kernel_mode() not in ("auto", "extension"):
        return None
    lib, _ = extension()
    return None if lib is None else (lib, code)


def quantize_int8_native(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(qweight, scales) of a CPU float weight [N, K] from the C++ quantizer (scheme.py's PyTorch path's values, one
    pass), or None where it is not used (see quantize_int4_native)."""
    native = _native_quantizer(weight)
    if native is None:
        return None
    lib, code = native
    n, k = weight.shape
    weight = weight.detach().contiguous()
    qweight = torch.empty(n, k, dtype=torch.int8)
    scales = torch.empty(n, dtype=torch.float32)
    lib.dsvl2_q8_quantize(weight.data_ptr(), code, n, k, qweight.data_ptr(), scales.data_ptr(), torch.get_num_threads())
    return qweight, scales


def quantize_int4_native(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, ...] | None:
    """(qweight, scales, mins) of a CPU float weight [N, K] from the C++ quantizer (the same values as scheme.py's
    PyTorch path, one pass), or None where the extension is not used (DSVL2_QUANT_KERNEL stock or dequantize, not
    built) or does not take the weight (another device or dtype, K not a multiple of the group)."""
    n, k = weight.shape
    native = None if k % group_size or group_size not in GROUP_SIZES else _native_quantizer(weight)
    if native is None:
        return None
    lib, code = native
    weight = weight.detach().contiguous()
    qweight = torch.empty(n, k // 2, dtype=torch.uint8)
    scales = torch.empty(n, k // group_size, dtype=INT4_PARAM_DTYPE)
    mins = torch.empty_like(scales)
    lib.dsvl2_q4_quantize(weight.data_ptr(), code, n, k, group_size, qweight.data_ptr(), scales.data_ptr(),
                          mins.data_ptr(), torch.get_num_threads())
    return qweight, scales, mins


class _ExtensionMixin:
    """forward through the C++ kernel up to `max_rows` rows of x (None: always), dequantize-then-matmul above."""

    max_rows: int | None

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.max_rows is not None and x.shape[0] > self.max_rows:
            return self._dense(x)
        return self._extension_matmul(x)

    def _extension_matmul(self, x: torch.Tensor) -> torch.Tensor:
        code = _DTYPE_CODES.get(x.dtype)
        if code is None:
            x, code = x.to(torch.float32), 0
        if not x.is_contiguous():
            x = x.contiguous()
        out = torch.empty((x.shape[0], self.out_features), dtype=x.dtype)
        if self._call(x, code, out):
            raise RuntimeError(f"{self.kernel}: the C++ kernel refused the shape {tuple(x.shape)}")
        return out


def _extension_name(bits: str, isa_name: str, max_rows: int | None) -> str:
    if max_rows is None:
        return f"{bits}-{isa_name}"
    return f"{bits}-{isa_name}(rows<={max_rows}), dequantize-f32 above"


def _padded(t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """`t` [N, C] padded with zeros to [rows, cols] (itself when it has that shape)."""
    if tuple(t.shape) == (rows, cols):
        return t
    return F.pad(t, (0, cols - t.shape[1], 0, rows - t.shape[0]))


def _native(lib: object | None, t: torch.Tensor) -> bool:
    """Whether the extension `lib` converts the CPU tensor `t` (else PyTorch ops do, the same bytes)."""
    return lib is not None and t.device.type == "cpu"


def to_int8_kernel_layout(qweight: torch.Tensor, lib: object | None = None) -> torch.Tensor:
    """int8 [N, K] -> [Np / 4, Kp / 32, 4, 32]: tiles of 4 rows (N padded with zero rows), their 32-column
    chunks interleaved, K padded with zeros to Kp (a multiple of 32). `lib`: the extension, to do it in C++."""
    n, k = qweight.shape
    tiles, chunks = -(-n // TILE), -(-k // 32)
    if _native(lib, qweight):
        out = torch.empty(tiles, chunks, TILE, 32, dtype=torch.int8)
        lib.dsvl2_q8_layout(qweight.contiguous().data_ptr(), n, k, out.data_ptr(), torch.get_num_threads())
        return out
    q = _padded(qweight, tiles * TILE, chunks * 32)
    return q.view(tiles, TILE, chunks, 32).permute(0, 2, 1, 3).contiguous()


def from_int8_kernel_layout(tiled: torch.Tensor, n: int, k: int) -> torch.Tensor:
    return tiled.permute(0, 2, 1, 3).reshape(-1, tiled.shape[1] * 32)[:n, :k]


def to_int4_kernel_layout(qweight: torch.Tensor, lib: object | None = None) -> torch.Tensor:
    """Canonical uint8 [N, K // 2] (K a multiple of 32) -> [Np / 4, Kp / 64, 4, 32] (Kp = K rounded up to 64):
    tiles of 4 rows, their 32-byte chunks interleaved; byte i of chunk s holds column 64s + i (low nibble) and
    64s + 32 + i (high). `lib`: the extension, to do it in C++."""
    n, half = qweight.shape
    if half % 16:
        raise ValueError(f"the int4 kernel layout needs K a multiple of 32, got {half * 2}")
    tiles, chunks = -(-n // TILE), -(-half // 32)
    if _native(lib, qweight):
        out = torch.empty(tiles, chunks, TILE, 32, dtype=torch.uint8)
        lib.dsvl2_q4_layout(qweight.contiguous().data_ptr(), n, half * 2, out.data_ptr(), torch.get_num_threads())
        return out
    # On bytes, without unpacking: a chunk's canonical bytes a (16) and b (16) hold its columns 0..31 and 32..63;
    # its byte 2j is lo(a_j) | lo(b_j) << 4 and byte 2j + 1 is hi(a_j) | hi(b_j) << 4.
    ab = _padded(qweight, tiles * TILE, chunks * 32).view(tiles, TILE, chunks, 2, 16).transpose(1, 2)
    a, b = ab[:, :, :, 0], ab[:, :, :, 1]
    out = torch.empty(tiles, chunks, TILE, 16, 2, dtype=torch.uint8, device=qweight.device)
    torch.bitwise_or(a & 0x0F, b << 4, out=out[..., 0])
    torch.bitwise_or(a >> 4, b & 0xF0, out=out[..., 1])
    return out.view(tiles, chunks, TILE, 32)


def from_int4_kernel_layout(tiled: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """The kernel's layout -> uint8 [N, K] of values 0..15."""
    chunks = tiled.permute(0, 2, 1, 3)  # [Np / 4, 4, Kp / 64, 32]
    q = torch.stack((chunks & 0x0F, chunks >> 4), dim=3)  # [Np / 4, 4, Kp / 64, 2, 32]
    return q.reshape(-1, tiled.shape[1] * 64)[:n, :k]


def to_group_tiles(t: torch.Tensor, lib: object | None = None) -> torch.Tensor:
    """Per-group scales or mins [N, G] -> [Np / 4, G, 4] float16 (the 4 rows of a tile side by side). `lib`: the
    extension, to do it in C++."""
    t = t.to(INT4_PARAM_DTYPE)
    n, groups = t.shape
    tiles = -(-n // TILE)
    if _native(lib, t):
        out = torch.empty(tiles, groups, TILE, dtype=INT4_PARAM_DTYPE)
        lib.dsvl2_group_tiles(t.contiguous().data_ptr(), n, groups, out.data_ptr(), torch.get_num_threads())
        return out
    return _padded(t, tiles * TILE, groups).view(tiles, TILE, groups).transpose(1, 2).contiguous()


def from_group_tiles(tiled: torch.Tensor, n: int) -> torch.Tensor:
    return tiled.transpose(1, 2).reshape(-1, tiled.shape[1])[:n]


class Int8Extension(_ExtensionMixin, Prepared):
    """int8 weight in the C++ kernel's tiled layout (to_int8_kernel_layout) through dsvl2_q8_matmul."""

    def __init__(self, lib, isa_name: str, qweight: torch.Tensor, scales: torch.Tensor, max_rows: int | None):
        n, k = qweight.shape
        super().__init__(n, k, 8)
        self._lib, self.max_rows = lib, max_rows
        self.kernel = _extension_name("int8", isa_name, max_rows)
        self.register_buffer("qweight", to_int8_kernel_layout(qweight, lib))
        self.register_buffer("scales", F.pad(scales.to(torch.float32), (0, -n % TILE)).contiguous())

    def dequantize(self) -> torch.Tensor:
        q = from_int8_kernel_layout(self.qweight, self.out_features, self.in_features)
        return dequantize_int8(q, self.scales[: self.out_features])

    def _call(self, x: torch.Tensor, code: int, out: torch.Tensor) -> int:
        return self._lib.dsvl2_q8_matmul(x.data_ptr(), code, x.shape[0], self.in_features,
                                         self.qweight.data_ptr(), self.scales.data_ptr(), self.out_features,
                                         out.data_ptr(), torch.get_num_threads())


class Int4Extension(_ExtensionMixin, Prepared):
    """int4 weight in the C++ kernel's tiled layout (to_int4_kernel_layout) through dsvl2_q4_matmul."""

    def __init__(self, lib, isa_name: str, qweight: torch.Tensor, scales: torch.Tensor,
                 mins: torch.Tensor, group_size: int, max_rows: int | None):
        super().__init__(qweight.shape[0], qweight.shape[1] * 2, 4, group_size)
        self._lib, self.max_rows = lib, max_rows
        self.kernel = _extension_name("int4", isa_name, max_rows)
        self.register_buffer("qweight", to_int4_kernel_layout(qweight, lib))
        self.register_buffer("scales", to_group_tiles(scales, lib))
        self.register_buffer("mins", to_group_tiles(mins, lib))

    def dequantize(self) -> torch.Tensor:
        n = self.out_features
        q = from_int4_kernel_layout(self.qweight, n, self.in_features)
        return dequantize_int4_values(q, from_group_tiles(self.scales, n), from_group_tiles(self.mins, n),
                                      self.group_size)

    def _call(self, x: torch.Tensor, code: int, out: torch.Tensor) -> int:
        return self._lib.dsvl2_q4_matmul(x.data_ptr(), code, x.shape[0], self.in_features,
                                         self.qweight.data_ptr(), self.scales.data_ptr(), self.mins.data_ptr(),
                                         self.group_size, self.out_features, out.data_ptr(), torch.get_num_threads())


# ---------------------------------------------------------------------------------------------------
# The choice: one place per device


def _choose_int8_cpu(qweight, scales, mode):
    if mode in ("auto", "extension"):
        lib, _ = extension()
        if lib is not None:
            return Int8Extension(lib, _isa_name(), qweight, scales, EXTENSION_MAX_ROWS_CPU)
    # PyTorch 2.13's _weight_int8pack_mm reads past the row for K not a multiple of 8 with several rows
    # of x (wrong results, reproduced); K a multiple of 32 is what the models have.
    if mode == "dequantize" or qweight.shape[1] % 32:
        return Int8Dequantize(qweight, scales)
    return Int8Stock(qweight, scales, STOCK_MAX_ROWS_CPU,
                     f"int8-stock-cpu(rows<={STOCK_MAX_ROWS_CPU}), dequantize-f32 above")


def _choose_int4_cpu(qweight, scales, mins, group_size, mode):
    if mode in ("auto", "extension"):
        lib, _ = extension()
        if lib is not None:
            return Int4Extension(lib, _isa_name(), qweight, scales, mins, group_size, EXTENSION_MAX_ROWS_CPU)
    if mode == "dequantize" or qweight.shape[0] % 16:
        return Int4Dequantize(qweight, scales, mins, group_size)
    return Int4StockCPU(qweight, scales, mins, group_size)


def _isa_name() -> str:
    isa = isa_options(cpu_flags())
    return isa[1] if isa else "cpu"


def prepare_int8(qweight: torch.Tensor, scales: torch.Tensor, device: torch.device | str | None = None) -> Prepared:
    """A module that multiplies by the int8 weight `qweight * scales[:, None]` on `device`."""
    check_int8(qweight, scales)
    device = torch.device(device if device is not None else qweight.device)
    qweight, scales = qweight.to(device), scales.to(device=device, dtype=torch.float32)
    mode = kernel_mode()
    if device.type == "cpu":
        return _choose_int8_cpu(qweight, scales, mode)
    return _choose_int8_cuda(qweight, scales, mode)


def prepare_int4(qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, group_size: int,
                 device: torch.device | str | None = None) -> Prepared:
    """A module that multiplies by the int4 weight (q * scale + min per group of `group_size` columns); scales
    and mins of another float dtype than float16 are rounded to it."""
    check_int4(qweight, scales, mins, group_size)
    device = torch.device(device if device is not None else qweight.device)
    qweight = qweight.to(device)
    scales, mins = (t.to(device=device, dtype=INT4_PARAM_DTYPE) for t in (scales, mins))
    mode = kernel_mode()
    if device.type == "cpu":
        return _choose_int4_cpu(qweight, scales, mins, group_size, mode)
    return _choose_int4_cuda(qweight, scales, mins, group_size, mode)


# ---------------------------------------------------------------------------------------------------
# CUDA (untested here: no GPU on the development machines)


class Int8StockCUDA(Int8Dequantize):
    """int8 weight through `aten._weight_int8pack_mm` on CUDA (activations and scales in x's 16-bit dtype)."""

    kernel = "int8-stock-cuda"

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
        return torch.ops.aten._weight_int8pack_mm(x.to(dtype).contiguous(), self.qweight, self.scales.to(dtype))


class Int4StockCUDA(Prepared):
    """int4 weight through `aten._weight_int4pack_mm` (tinygemm: bfloat16, sm80+); canonical tensors kept
    beside the packed one for `dequantize()` and the rows-heavy fallback."""

    kernel = "int4-stock-cuda"
    INNER_K_TILES = 8

    def __init__(self, qweight, scales, mins, group_size):
        super().__init__(qweight.shape[0], qweight.shape[1] * 2, 4, group_size)
        self.register_buffer("scales", scales.contiguous())
        self.register_buffer("mins", mins.contiguous())
        q = unpack_int4(qweight)
        # The CUDA packer takes uint8 [N, K // 2] with the even column in the high nibble.
        swapped = ((q[:, 0::2] << 4) | q[:, 1::2]).contiguous()
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack(swapped, self.INNER_K_TILES))
        self.register_buffer("scales_and_zeros", _int4_scales_and_zeros(scales, mins))
        self.register_buffer("qweight", qweight.contiguous())

    def dequantize(self) -> torch.Tensor:
        return dequantize_int4(self.qweight, self.scales, self.mins, self.group_size)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm(x.to(torch.bfloat16).contiguous(), self.packed, self.group_size,
                                                  self.scales_and_zeros)


def _verified(module: Prepared, fallback) -> Prepared:
    """`module` if it runs and matches dequantize-then-matmul on a small probe, else `fallback()`."""
    try:
        x = torch.randn(2, module.in_features, device=module.dequantize().device, dtype=torch.bfloat16)
        got = module._matmul(x).float()
        want = F.linear(x.float(), module.dequantize())
        tol = 0.02 * want.abs().max().item() + 1e-3
        if (got - want).abs().max().item() <= tol:
            return module
        log.info("quant kernels: %s gave wrong results on this device; using dequantize-then-matmul", module.kernel)
    except (RuntimeError, NotImplementedError) as error:
        log.info("quant kernels: %s unavailable (%s); using dequantize-then-matmul", module.kernel,
                 str(error).splitlines()[0][:120])
    return fallback()


def _choose_int8_cuda(qweight, scales, mode):
    fallback = lambda: Int8Dequantize(qweight, scales)  # noqa: E731
    if mode == "dequantize" or qweight.device.type != "cuda":
        return fallback()
    return _verified(Int8StockCUDA(qweight, scales), fallback)


def _choose_int4_cuda(qweight, scales, mins, group_size, mode):
    fallback = lambda: Int4Dequantize(qweight, scales, mins, group_size)  # noqa: E731
    n, k = qweight.shape[0], qweight.shape[1] * 2
    if mode == "dequantize" or qweight.device.type != "cuda" or n % 8 or k % (Int4StockCUDA.INNER_K_TILES * 16):
        return fallback()
    try:
        module = Int4StockCUDA(qweight, scales, mins, group_size)
    except (RuntimeError, NotImplementedError) as error:
        log.info("quant kernels: int4-stock-cuda unavailable (%s)", str(error).splitlines()[0][:120])
        return fallback()
    return _verified(module, fallback)
