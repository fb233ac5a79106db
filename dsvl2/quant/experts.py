"""Every selected routed expert and the shared experts of a MoE layer in one call of the C++ kernels.

A decode step of Tiny makes about 280 quantized matmuls; through `run_experts` each routed expert costs three
Python calls, three parallel regions and the gathering and scattering of its rows. `FusedExperts` hands the
layer's routing (indices and weights) and a table of its experts' prepared weights to `dsvl2_moe`, which runs
gate and up of every selected expert in one parallel loop, then every down, and sums the weighted outputs.
It applies where the experts' layers are quantized with the extension's kernels and nothing needs gradients;
elsewhere the MoE runs as written in dsvl2.language.moe.
"""

from __future__ import annotations

import torch
from torch import nn

from dsvl2.language.moe import MoE
from dsvl2.quant.kernels import _DTYPE_CODES, Int4Extension, Int8Extension, extension
from dsvl2.quant.linear import QuantizedLinear

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def _describe(mlp: nn.Module) -> list[int] | None:
    """The kernel's 12 integers for one SwiGLU MLP (bits, group, intermediate size, then weight, scales and mins
    of gate, up and down), or None when its layers are not all extension-quantized alike."""
    layers = [mlp._modules.get(name) for name in PROJECTIONS]
    if not all(type(layer) is QuantizedLinear and layer.bias is None for layer in layers):
        return None
    prepared = [layer.quantized for layer in layers]
    kinds = {type(p) for p in prepared}
    if len(kinds) != 1 or not kinds <= {Int4Extension, Int8Extension} or any(p.max_rows is not None for p in prepared):
        return None
    first = prepared[0]
    if {p.group_size for p in prepared} != {first.group_size}:
        return None
    desc = [first.bits, first.group_size or 0, first.out_features]
    for p in prepared:
        desc += [p.qweight.data_ptr(), p.scales.data_ptr(), p.mins.data_ptr() if p.bits == 4 else 0]
    return desc


class FusedExperts:
    """The routed experts (`experts`) and shared experts (`shared`, or None) of one MoE layer as the C++ kernels'
    tables. Not a module: it holds no weights of its own, only their addresses, and checks before each call that
    the layers it describes are still in place (an adapter wrapping one, say, hands the layer back to Python)."""

    def __init__(self, lib: object, experts: nn.ModuleList, shared: nn.Module | None, table: list[list[int]],
                 shared_desc: list[int] | None) -> None:
        self._lib = lib
        self._layers = [(mlp._modules, tuple(mlp._modules[name] for name in PROJECTIONS))
                        for mlp in [*experts, *([shared] if shared is not None else [])]]
        self.table = torch.tensor(table, dtype=torch.int64)
        self.shared = None if shared_desc is None else torch.tensor(shared_desc, dtype=torch.int64)

    @classmethod
    def build(cls, experts: nn.ModuleList, shared: nn.Module | None) -> FusedExperts | None:
        """The fused call for these experts, or None where it does not apply (see the module docstring)."""
        lib, _ = extension()
        if lib is None or not hasattr(lib, "dsvl2_moe"):
            return None
        table = [_describe(mlp) for mlp in experts]
        shared_desc = _describe(shared) if shared is not None else None
        if any(d is None for d in table) or (shared is not None and shared_desc is None):
            return None
        return cls(lib, experts, shared, table, shared_desc)

    def applies(self, x: torch.Tensor) -> bool:
        """Whether this call can run fused: CPU, no gradient wanted, the described layers unchanged."""
        if x.device.type != "cpu" or (torch.is_grad_enabled() and x.requires_grad) or x.dtype not in _DTYPE_CODES:
            return False
        return all(modules["gate_proj"] is layers[0] and modules["up_proj"] is layers[1]
                   and modules["down_proj"] is layers[2] for modules, layers in self._layers)

    def __call__(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """x [M, D], the gate's weights and indices [M, k] -> the routed plus shared experts' output [M, D]."""
        x = x.contiguous()
        indices = indices.to(torch.int64).contiguous()
        weights = weights.to(torch.float32).contiguous()
        out = torch.empty_like(x)
        shared = self.shared.data_ptr() if self.shared is not None else 0
        rc = self._lib.dsvl2_moe(x.data_ptr(), _DTYPE_CODES[x.dtype], x.shape[0], x.shape[1], self.table.data_ptr(),
                                 self.table.shape[0], shared, indices.data_ptr(), weights.data_ptr(), indices.shape[1],
                                 out.data_ptr(), torch.get_num_threads())
        if rc:
            raise RuntimeError(f"the fused experts kernel refused its input (code {rc})")
        return out


def fuse_experts(model: nn.Module) -> int:
    """Attach a FusedExperts to every MoE layer of `model` whose experts it can run; returns how many."""
    count = 0
    for module in model.modules():
        if isinstance(module, MoE):
            module.fused = FusedExperts.build(module.experts, module.shared_experts)
            count += module.fused is not None
    return count
