"""Quantized layers installed into a model built on the meta device, one tensor at a time as a checkpoint is read.

A float checkpoint's targeted weight is quantized as it arrives (float32 a block of rows at a time) and its layer
replaced by a QuantizedLinear, so the float model is never materialised; a quantized checkpoint's tensors
(`<linear>.qweight`, `.scales`, `.mins`) are gathered per layer and installed as they are, without re-quantizing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dsvl2.machine import release_free_memory
from dsvl2.quant.linear import QuantizedLinear, quantize_weight
from dsvl2.quant.scheme import QUANTIZED_DTYPES, QuantScheme, fit_group_size, quantized_shapes

# Bytes read between two returns of freed heap memory to the system: glibc keeps the freed blocks of the transient
# copies (float weights, the kernels' conversions) between the quantized tensors, so the heap would grow by all.
TRIM_EVERY_BYTES = 32 * 2**20


@dataclass(frozen=True)
class Target:
    """One linear layer to quantize."""

    bits: int
    group_size: int | None
    out_features: int
    in_features: int

    def shapes(self) -> dict[str, list[int]]:
        return quantized_shapes(self.bits, self.out_features, self.in_features, self.group_size)


def plan_targets(model: nn.Module, scheme: QuantScheme) -> tuple[QuantScheme, dict[str, Target]]:
    """The scheme with its group size settled for `model`, and the linear layers it quantizes by name."""
    linears = {name: m for name, m in model.named_modules() if type(m) is nn.Linear}
    if getattr(model, "cfg", None) is not None and model.cfg.language.tie_word_embeddings:
        linears.pop("language.lm_head", None)  # it is the embedding matrix, which stays in floating point
    scheme = fit_group_size(scheme, {name: m.in_features for name, m in linears.items() if scheme.bits_for(name) == 4})
    targets = {}
    for name, linear in linears.items():
        bits = scheme.bits_for(name)
        if bits is not None:
            targets[name] = Target(bits, scheme.group_size if bits == 4 else None, linear.out_features,
                                   linear.in_features)
    return scheme, targets


class QuantizingLoader:
    """Takes the tensors of targeted layers as a checkpoint is read and installs each layer once it has them.

    `prequantized`: the checkpoint holds the canonical quantized tensors; otherwise it holds float weights."""

    def __init__(self, model: nn.Module, targets: dict[str, Target], prequantized: bool, dtype: torch.dtype,
                 device: str | torch.device) -> None:
        self.model, self.targets, self.prequantized = model, targets, prequantized
        self.dtype, self.device = dtype, device
        self.pending: dict[str, dict[str, torch.Tensor]] = {}
        self.since_trim = 0

    def expected_shapes(self) -> dict[str, list[int]]:
        """Every tensor name the checkpoint must hold, with its shape."""
        expected = {name: list(p.shape) for name, p in self.model.named_parameters()}
        if self.prequantized:
            for name, target in self.targets.items():
                del expected[f"{name}.weight"]
                expected.update({f"{name}.{suffix}": shape for suffix, shape in target.shapes().items()})
        return expected

    def dtype_problems(self, found: dict[str, torch.dtype | None]) -> list[str]:
        """'name (checkpoint dtype, expected dtype)' for each quantized tensor stored in another dtype."""
        if not self.prequantized:
            return []
        problems = []
        for name, target in self.targets.items():
            for suffix in target.shapes():
                want = QUANTIZED_DTYPES[suffix][target.bits]
                have = found.get(f"{name}.{suffix}")
                if have is not None and have != want:
                    problems.append(f"{name}.{suffix} (checkpoint {_dtype_name(have)}, expected {_dtype_name(want)})")
        return problems

    def take(self, name: str, tensor: torch.Tensor) -> bool:
        """Use `name`'s tensor if it belongs to a targeted layer's weight (True), else leave it to the caller."""
        layer, _, leaf = name.rpartition(".")
        target = self.targets.get(layer)
        if target is None or leaf == "bias":
            return False
        self.since_trim += tensor.numel() * tensor.element_size()
        if not self.prequantized:
            self._install(layer, target, quantize_weight(tensor, target.bits, target.group_size))
        else:
            parts = self.pending.setdefault(layer, {})
            parts[leaf] = tensor
            if len(parts) == len(target.shapes()):
                self._install(layer, target, self.pending.pop(layer))
        if self.since_trim >= TRIM_EVERY_BYTES:
            release_free_memory()
            self.since_trim = 0
        return True

    def _install(self, layer: str, target: Target, tensors: dict[str, torch.Tensor]) -> None:
        parent_name, _, leaf = layer.rpartition(".")
        parent = self.model.get_submodule(parent_name) if parent_name else self.model
        old = parent._modules[leaf]
        # The bias may be loaded already or still on the meta device (the checkpoint loader sets it when it comes).
        parent._modules[leaf] = QuantizedLinear.from_tensors(tensors, target.bits, target.group_size, old.bias,
                                                             self.dtype, self.device)

    def finish(self) -> None:
        if self.pending:
            raise RuntimeError(f"quantized layers left incomplete: {', '.join(sorted(self.pending))}")



def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
