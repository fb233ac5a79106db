"""Which CPU kernels run each part of the work: chosen once at load from the CPU's capability flags.

Three paths, each a way to multiply the model's matrices:

- `native`: the weights' own dtype. For bfloat16 on a CPU with avx512_bf16 or AMX this is PyTorch's
  oneDNN bfloat16 matmul; for float32 models and GPUs it is the only path.
- `float32`: 16-bit weights, float32 arithmetic: each weight upcast as it is used (the vision tower's
  activations stay float32 throughout; prefill's attention and unpacked layers cast back), see
  dsvl2.engine.cpu.Float32Compute.
- `float16-packed`: the language model's linear layers packed for FBGEMM (float16 weights, float32
  arithmetic), see dsvl2.engine.cpu.pack_linear_layers.

The parts: the vision tower, prefill chunks, decode at small and at large batch, the lm_head, and the weights
absorbed MLA attention reads directly (kv_b_proj: `float32` holds them in float32, since PyTorch's 16-bit batched
matmuls are generic loops where the CPU has no 16-bit arithmetic; the activations are cast to meet them). The
language model's weights are held once (one copy keeps memory near the checkpoint's size), so decode at
small and large batch share a path; a `native` prefill over packed weights unpacks each large matmul's
weight to bfloat16 as it runs (dsvl2.engine.cpu.PackedFp16Linear.native_rows).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

from dsvl2.engine.cpu import HALF_DTYPES
from dsvl2.errors import InputError
from dsvl2.machine import computes_natively, cpu_flags, has_native_bf16

NATIVE, FLOAT32, PACKED = "native", "float32", "float16-packed"
PATHS = (NATIVE, FLOAT32, PACKED)
PARTS = ("vision", "prefill", "decode_small", "decode_large", "lm_head", "attention")
# Which paths each part can run; decode in float32 would upcast every weight at every step.
ALLOWED = {"vision": (NATIVE, FLOAT32), "prefill": (NATIVE, FLOAT32), "decode_small": (NATIVE, PACKED),
           "decode_large": (NATIVE, PACKED), "lm_head": (NATIVE, PACKED), "attention": (NATIVE, FLOAT32)}
# Option names that set several parts at once.
GROUPS = {"decode": ("decode_small", "decode_large"), "all": PARTS}
# Packed layers of a native prefill compute a matmul of at least this many rows in bfloat16; fewer rows
# (decode, a routed expert's share of a chunk) stay on FBGEMM, where unpacking would cost more than it saves.
NATIVE_PREFILL_ROWS = 64


class KernelChoiceError(InputError):
    """A --kernels value that names an unknown part or path, or a path the part cannot run."""


@dataclass(frozen=True)
class KernelPlan:
    """The path of each part of the work (see the module docstring) and why it was chosen."""

    vision: str
    prefill: str
    decode_small: str
    decode_large: str
    lm_head: str
    attention: str = NATIVE
    reason: str = ""

    @property
    def packs_language(self) -> bool:
        """Whether the language model's linear layers are packed for FBGEMM."""
        return PACKED in (self.decode_small, self.decode_large, self.lm_head)

    def describe(self) -> str:
        """One line for logs and --verbose: each part's path and the reason."""
        parts = ", ".join(f"{name}={getattr(self, name)}" for name in PARTS)
        return f"kernels: {parts} ({self.reason})" if self.reason else f"kernels: {parts}"

    def as_dict(self) -> dict[str, str]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def choose_kernels(flags: frozenset[str] | set[str], device: torch.device, dtype: torch.dtype,
                   fbgemm_fp16: bool = True) -> KernelPlan:
    """The automatic plan for a model of `dtype` on `device`, on a CPU with capability `flags`.

    Pure: the flags, the device, the dtype and whether this PyTorch has FBGEMM's float16 kernels decide."""
    if device.type != "cpu" or dtype not in HALF_DTYPES:
        return KernelPlan(NATIVE, NATIVE, NATIVE, NATIVE, NATIVE, reason=f"{dtype_name(dtype)} on {device.type}")
    # FBGEMM's float16 packing reads half the bytes of float32 and runs at bandwidth: the fastest decode
    # measured on every CPU (with or without native bfloat16).
    decode = PACKED if fbgemm_fp16 else NATIVE
    if computes_natively(dtype, flags):
        # The CPU multiplies bfloat16 natively (oneDNN): twice float32's arithmetic for compute-bound parts.
        return KernelPlan(NATIVE, NATIVE, decode, decode, decode, reason="the CPU computes bfloat16 natively")
    # Without native 16-bit arithmetic PyTorch's 16-bit matmuls are generic loops: compute in float32.
    return KernelPlan(FLOAT32, FLOAT32, decode, decode, decode, FLOAT32, "no native 16-bit arithmetic on this CPU")


def keeps_half_weights(flags: frozenset[str] | set[str], fbgemm_fp16: bool) -> bool:
    """Whether a 16-bit checkpoint should stay 16-bit on this CPU: some path then computes it fast."""
    return fbgemm_fp16 or has_native_bf16(flags)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def override(plan: KernelPlan, text: str | None) -> KernelPlan:
    """`plan` with the parts a --kernels value names changed: "auto" (or empty) keeps it, a path name
    ("native") sets every part the path can run, "part=path,..." sets parts ("decode" = both decode
    parts, "all" = every part)."""
    text = (text or "auto").strip()
    if text == "auto":
        return plan
    changes: dict[str, str] = {}
    if text in PATHS:
        changes = {part: text for part in PARTS if text in ALLOWED[part]}
    else:
        for entry in text.split(","):
            name, sep, path = (s.strip() for s in entry.partition("="))
            if not sep or (name not in PARTS and name not in GROUPS):
                raise KernelChoiceError(
                    f"--kernels: {entry.strip()!r} is not PART=PATH (parts: {', '.join((*PARTS, *GROUPS))})")
            for part in GROUPS.get(name, (name,)):
                changes[part] = path
    if changes.get("prefill") == NATIVE and "attention" not in changes:
        changes["attention"] = NATIVE  # a native prefill multiplies by kv_b_proj too: it keeps its dtype
    for part, path in changes.items():
        if path not in ALLOWED[part]:
            raise KernelChoiceError(f"--kernels: {part} cannot run {path!r} (it runs {' or '.join(ALLOWED[part])})")
    return validate(replace(plan, **changes, reason=f"--kernels {text}"))


def check_option(text: str | None) -> None:
    """Raise KernelChoiceError for a --kernels value that no model could run (checked before loading weights)."""
    override(KernelPlan(FLOAT32, FLOAT32, PACKED, PACKED, PACKED, FLOAT32), text)


def validate(plan: KernelPlan) -> KernelPlan:
    """`plan`, checked to be runnable with one copy of the language model's weights."""
    if plan.decode_small != plan.decode_large:
        raise KernelChoiceError("--kernels: decode at small and large batch must share a path "
                                "(the language model's weights are held once)")
    if plan.attention == FLOAT32 and plan.prefill != FLOAT32:
        raise KernelChoiceError("--kernels: attention=float32 needs prefill=float32 (prefill multiplies by the "
                                "same kv_b_proj weights, then held in float32)")
    return plan


def resolve_kernels(setting: str | KernelPlan | None, device: torch.device, dtype: torch.dtype,
            flags: frozenset[str] | None = None, fbgemm_fp16: bool = True) -> KernelPlan:
    """The plan an engine runs: `setting` itself when it is a plan, else the automatic choice for this
    CPU with the --kernels value `setting` applied. Paths other than native need 16-bit weights on a CPU."""
    if isinstance(setting, KernelPlan):
        plan = validate(setting)
    else:
        automatic = choose_kernels(cpu_flags() if flags is None else flags, device, dtype, fbgemm_fp16)
        plan = override(automatic, setting)
    needs_half = any(getattr(plan, part) != NATIVE for part in PARTS)
    if needs_half and (device.type != "cpu" or dtype not in HALF_DTYPES):
        raise KernelChoiceError(f"--kernels {setting}: float32 and float16-packed paths are for bfloat16 or "
                                f"float16 weights on a CPU; this model is {dtype_name(dtype)} on {device.type}")
    if plan.packs_language and not fbgemm_fp16:
        raise KernelChoiceError("--kernels: float16-packed needs FBGEMM's float16 kernels, which this PyTorch "
                                "build does not have")
    return plan
