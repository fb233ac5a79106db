"""Fast paths for 16-bit (bfloat16/float16) models on CPUs (dsvl2.engine.kernels chooses which runs where).

On CPUs without native 16-bit arithmetic (AVX2 machines, AVX-512 without BF16) PyTorch multiplies
bfloat16 matrices with slow generic loops: a few GB/s for one row (decode at batch 1) and far less for
a handful of rows.
Two remedies, both computing in float32 while the weights stay 16-bit in memory:

- `pack_linear_layers`: the language model's linear layers become FBGEMM packed-float16 layers
  (weights converted once, float32 activations and accumulation). bfloat16 -> float16 is exact
  for every weight between 6e-5 and 65504 in magnitude, so this is the bfloat16 model computed
  in float32. Used for decoding and prefill.
- `Float32Compute`: a torch-function mode that runs linear layers, convolutions, layer norms and
  attention in float32, upcasting each 16-bit weight as it is used; for compute-bound work on
  layers that were not packed: prefill's attention, and the vision tower (whose weights stay 16-bit,
  so memory stays near the checkpoint's size, while its activations are float32 throughout).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from dsvl2.machine import release_free_memory

HALF_DTYPES = (torch.bfloat16, torch.float16)


class Float32Compute(TorchFunctionMode):
    """Within this mode, F.linear, F.conv2d, F.layer_norm and attention with a 16-bit argument compute in
    float32. `keep_float32` False: the result is cast back to the input's dtype, so the model sees the dtype
    it expects; True: a 16-bit input's result stays float32, so every later layer computes on float32
    activations as a float32 copy of the model would (at the cost of one weight upcast per call)."""

    UPCAST = frozenset({F.linear, F.conv2d, F.layer_norm, F.scaled_dot_product_attention})

    def __init__(self, keep_float32: bool = False) -> None:
        super().__init__()
        self.keep_float32 = keep_float32

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func in self.UPCAST and any(_is_half(a) for a in (*args, *kwargs.values())):
            dtype = getattr(args[0], "dtype", None)
            out = func(*(_upcast(a) for a in args), **{k: _upcast(v) for k, v in kwargs.items()})
            return out if self.keep_float32 or dtype not in HALF_DTYPES else out.to(dtype)
        return func(*args, **kwargs)


def _is_half(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.dtype in HALF_DTYPES


def _upcast(value: Any) -> Any:
    return value.float() if _is_half(value) else value


def float32_compute(enabled: bool, keep_float32: bool = False) -> Any:
    """A context running 16-bit matrix work in float32 when `enabled` (see Float32Compute)."""
    return Float32Compute(keep_float32) if enabled else nullcontext()


def fbgemm_fp16_available() -> bool:
    try:
        torch.ops.quantized.linear_prepack_fp16(torch.zeros(8, 8), None)
    except (RuntimeError, AttributeError):
        return False
    return True


class PackedFp16Linear(nn.Module):
    """A linear layer with FBGEMM packed float16 weights; float32 compute, output in `out_dtype`.

    A large weight (the lm_head) is packed in blocks of output rows, so packing it needs a float32 copy of
    one block at a time rather than of the whole matrix.
    `native_rows` (None: never): a matmul of at least this many rows computes in `out_dtype` with the weight
    unpacked for it, for CPUs whose native bfloat16 arithmetic beats FBGEMM on compute-bound prefill."""

    native_rows: int | None = None
    BLOCK_ELEMENTS = 2**24

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.out_dtype = linear.weight.dtype
        rows = max(1, self.BLOCK_ELEMENTS // self.in_features)
        weight, bias = linear.weight.detach(), linear.bias
        self.blocks = [
            torch.ops.quantized.linear_prepack_fp16(
                weight[start:start + rows].float(), None if bias is None else bias.detach()[start:start + rows].float())
            for start in range(0, self.out_features, rows)
        ]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        if self.native_rows is not None and flat.shape[0] >= self.native_rows:
            dtype = self.out_dtype
            outs = [F.linear(flat.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))
                    for weight, bias in map(torch.ops.quantized.linear_unpack_fp16, self.blocks)]
        else:
            outs = [torch.ops.quantized.linear_dynamic_fp16(flat.float(), block) for block in self.blocks]
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
        return out.view(*x.shape[:-1], self.out_features).to(x.dtype)

    @property
    def weight(self) -> torch.Tensor:
        """The (float16-rounded) weight, unpacked: slow, for code that reads weights directly."""
        return torch.cat([torch.ops.quantized.linear_unpack_fp16(block)[0] for block in self.blocks]).to(self.out_dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, packed float16 "
                f"in {len(self.blocks)} block(s)")


class PackedFp16MLP(nn.Module):
    """DeepSeek's SwiGLU MLP with gate and up projections packed as one float16 matrix; the whole
    block computes in float32 (in `x`'s 16-bit dtype from `native_rows` rows, as PackedFp16Linear) and returns
    `x`'s dtype."""

    native_rows: int | None = None

    def __init__(self, mlp: nn.Module) -> None:
        super().__init__()
        self.hidden = mlp.gate_proj.in_features
        self.intermediate = mlp.gate_proj.out_features
        self.out_dtype = mlp.gate_proj.weight.dtype
        # One float32 copy at a time (gate and up written into it, no concatenation of two more copies).
        gate_up = torch.empty(2 * self.intermediate, self.hidden)
        gate_up[:self.intermediate].copy_(mlp.gate_proj.weight.detach())
        gate_up[self.intermediate:].copy_(mlp.up_proj.weight.detach())
        self.gate_up = torch.ops.quantized.linear_prepack_fp16(gate_up, None)
        del gate_up
        self.down = torch.ops.quantized.linear_prepack_fp16(mlp.down_proj.weight.detach().float(), None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.hidden)
        if self.native_rows is not None and flat.shape[0] >= self.native_rows:
            return self._native(flat).view(x.shape).to(x.dtype)
        gate, up = torch.ops.quantized.linear_dynamic_fp16(flat.float(), self.gate_up).split(self.intermediate, dim=-1)
        out = torch.ops.quantized.linear_dynamic_fp16(F.silu(gate) * up, self.down)
        return out.view(x.shape).to(x.dtype)

    def _native(self, flat: torch.Tensor) -> torch.Tensor:
        dtype = self.out_dtype
        gate_up = torch.ops.quantized.linear_unpack_fp16(self.gate_up)[0].to(dtype)
        gate, up = F.linear(flat.to(dtype), gate_up).split(self.intermediate, dim=-1)
        return F.linear(F.silu(gate) * up, torch.ops.quantized.linear_unpack_fp16(self.down)[0].to(dtype))


def set_native_rows(module: nn.Module, rows: int | None) -> None:
    """Set `native_rows` on every packed layer under `module` (None: FBGEMM for every matmul)."""
    for child in module.modules():
        if isinstance(child, (PackedFp16Linear, PackedFp16MLP)):
            child.native_rows = rows


def _is_swiglu_mlp(module: nn.Module) -> bool:
    names = {name for name, _ in module.named_children()}
    return names == {"gate_proj", "up_proj", "down_proj"} and all(
        type(getattr(module, n)) is nn.Linear and getattr(module, n).bias is None for n in names
    )


def pack_linear_layers(module: nn.Module, skip: tuple[str, ...] = ("kv_b_proj",)) -> int:
    """Replace, in place, the 16-bit SwiGLU MLPs under `module` by PackedFp16MLP and the other 16-bit
    nn.Linear layers (except those named in `skip`, whose weights are read directly, e.g. by absorbed
    MLA) by PackedFp16Linear; returns the number of modules replaced.

    Module by module, handing each freed 16-bit weight back to the system, so memory peaks near the
    packed model's size rather than at twice it."""
    count = 0
    for name in list(module._modules):  # names only: a list of the children would keep every old one alive
        child = module._modules[name]
        if _is_swiglu_mlp(child) and child.gate_proj.weight.dtype in HALF_DTYPES:
            setattr(module, name, PackedFp16MLP(child))
            count += 1
        elif type(child) is nn.Linear and name not in skip and child.weight.dtype in HALF_DTYPES:
            setattr(module, name, PackedFp16Linear(child))
            count += 1
        else:
            count += pack_linear_layers(child, skip)
            continue
        del child
        # Packed weights are larger than the holes the freed 16-bit ones leave (FBGEMM pads the input
        # dimension to a multiple of 512): without a trim after each layer the heap grows by all of them.
        release_free_memory()
    return count


def pack_language(language: nn.Module, decoder: bool, lm_head: bool) -> int:
    """Pack the decoder layers' linear layers (`decoder`) and the lm_head (`lm_head`) of a 16-bit language
    model for FBGEMM, in place; returns the number of modules replaced."""
    count = 0
    head = language.lm_head
    # The lm_head first: its packing holds two copies of it, best done before the padded packed layers grow.
    if lm_head and type(head) is nn.Linear and head.weight.dtype in HALF_DTYPES:
        language.lm_head = PackedFp16Linear(head)
        count += 1
    del head
    release_free_memory()
    return count + (pack_linear_layers(language.model) if decoder else 0)



def float32_attention(language: nn.Module) -> int:
    """The attention part's float32 path (dsvl2.engine.kernels), in place: multi-head layers compute attention in
    float32, and MLA layers hold kv_b_proj (read directly by absorbed decoding) in float32; returns how many layers.
    An MLA layer whose kv_b_proj an adapter wraps keeps its dtype."""
    count = 0
    for module in language.modules():
        if hasattr(module, "compute_dtype"):
            module.compute_dtype = torch.float32
            count += 1
        layer = getattr(module, "kv_b_proj", None)
        if type(layer) is nn.Linear and layer.weight.dtype in HALF_DTYPES:
            layer.weight.data = layer.weight.data.float()
            count += 1
    release_free_memory()
    return count
