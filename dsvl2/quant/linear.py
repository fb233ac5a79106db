"""A linear layer with weight-only quantized weights, and the function that quantizes a loaded module's layers.

The layer holds the kernel's prepared weights (dsvl2.quant.kernels) as a child and nothing else of the weight, so
the canonical tensors are not kept twice. Gradients flow to the input (adapters trained over a quantized layer
need them), never to the weight.
"""

from __future__ import annotations

import torch
from torch import nn

from dsvl2.quant import kernels
from dsvl2.quant.scheme import QuantScheme, fit_group_size, quantize_int4, quantize_int8


def prepare(tensors: dict[str, torch.Tensor], bits: int, group_size: int | None,
            device: str | torch.device) -> nn.Module:
    """The kernel's prepared module of canonical tensors (qweight, scales and, for int4, mins)."""
    if bits == 8:
        return kernels.prepare_int8(tensors["qweight"], tensors["scales"], device)
    return kernels.prepare_int4(tensors["qweight"], tensors["scales"], tensors["mins"], group_size, device)


def quantize_weight(weight: torch.Tensor, bits: int, group_size: int | None) -> dict[str, torch.Tensor]:
    """The canonical tensors of a float weight [N, K]."""
    if bits == 8:
        return dict(zip(("qweight", "scales"), quantize_int8(weight), strict=True))
    return dict(zip(("qweight", "scales", "mins"), quantize_int4(weight, group_size), strict=True))


class _QuantizedMatmul(torch.autograd.Function):
    """y = x W^T with W quantized; backward gives the input's gradient from the dequantized weight."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, prepared: nn.Module) -> torch.Tensor:  # noqa: ANN001 - autograd's ctx
        ctx.prepared = prepared
        return prepared(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # noqa: ANN001
        from dsvl2 import machine

        compute = grad.dtype
        if grad.device.type == "cpu" and not machine.computes_natively(compute):
            compute = torch.float32  # a CPU without native 16-bit arithmetic runs 16-bit matmuls as generic loops
        weight = ctx.prepared.dequantize().to(device=grad.device, dtype=compute)
        return (grad.to(compute) @ weight).to(grad.dtype), None


class QuantizedLinear(nn.Module):
    """y = x W^T + b with W stored as int8 or int4 (see dsvl2.quant.scheme); the output has x's dtype.

    `weight_dtype`: the dtype the float layer had, that of `weight` (dequantized on each read)."""

    def __init__(self, prepared: nn.Module, in_features: int, out_features: int, bits: int,
                 group_size: int | None = None, bias: torch.Tensor | None = None,
                 weight_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        self.weight_dtype = weight_dtype
        self.quantized = prepared
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=bias.requires_grad)

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], bits: int, group_size: int | None = None,
                     bias: torch.Tensor | None = None, weight_dtype: torch.dtype = torch.float32,
                     device: str | torch.device = "cpu") -> QuantizedLinear:
        """A layer of canonical tensors (as a quantized checkpoint stores them)."""
        out_features, packed = tensors["qweight"].shape
        in_features = packed if bits == 8 else packed * 2
        return cls(prepare(tensors, bits, group_size, device), in_features, out_features, bits, group_size, bias,
                   weight_dtype)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bits: int, group_size: int | None = None,
                    bias: torch.Tensor | None = None, device: str | torch.device | None = None) -> QuantizedLinear:
        """A layer quantizing the float `weight` [N, K] (converted to float32 a block of rows at a time)."""
        device = weight.device if device is None else device
        return cls.from_tensors(quantize_weight(weight, bits, group_size), bits, group_size, bias, weight.dtype,
                                device)

    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme: QuantScheme) -> QuantizedLinear:
        """`linear` quantized with `scheme`'s bits and group size (an unset int4 group size fitted to the layer)."""
        scheme = fit_group_size(scheme, {"the layer": linear.in_features} if scheme.bits == 4 else {})
        bias = None if linear.bias is None else linear.bias.detach()
        return cls.from_weight(linear.weight.detach(), scheme.bits, scheme.group_size, bias)

    @property
    def kernel(self) -> str:
        """The name of the kernel computing the product (for --verbose and benchmarks)."""
        return self.quantized.kernel

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight [N, K] in `weight_dtype`: slow, for code that reads weights directly."""
        return self.quantized.dequantize().to(self.weight_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            out = _QuantizedMatmul.apply(x, self.quantized)
        else:
            out = self.quantized(x)
        return out if self.bias is None else out + self.bias.to(out.dtype)

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001, ANN202 - nn.Module's signature
        """Moves follow `fn` (.to(device), .cuda()); dtype conversions (.float(), .half(), .to(dtype)) reach
        the bias only: the quantized tensors keep the dtypes their kernel needs."""
        if self.bias is not None:
            self.bias.data = fn(self.bias.data)

        def move_only(t: torch.Tensor) -> torch.Tensor:
            moved = fn(t)
            return moved if moved.dtype == t.dtype else t.to(device=moved.device)

        self.quantized._apply(move_only, recurse)
        return self

    def extra_repr(self) -> str:
        scheme = "int8" if self.bits == 8 else f"int4, group size {self.group_size}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"{scheme}, kernel={self.kernel}")


def quantize_module(module: nn.Module, scheme: QuantScheme, prefix: str = "") -> int:
    """Replace, in place, the nn.Linear layers under `module` that `scheme` quantizes by QuantizedLinear; returns
    how many. `prefix`: `module`'s path in DeepseekVL2 ("" for the whole model, "language" for its language model),
    which the scheme's choice of layers reads. One layer at a time: each float weight is freed as its layer is
    replaced."""
    bits_of = {name: scheme.bits_for(name) for name, _ in _linears(module, prefix)}
    scheme = fit_group_size(scheme, {name: child.in_features for name, child in _linears(module, prefix)
                                     if bits_of[name] == 4})
    count = 0
    for name in [name for name, bits in bits_of.items() if bits is not None]:  # names only: layers are freed
        bits = bits_of[name]
        parent_name, _, leaf = name[len(prefix) + 1 if prefix else 0:].rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        linear = parent._modules[leaf]
        bias = None if linear.bias is None else linear.bias.detach()
        group = scheme.group_size if bits == 4 else None
        parent._modules[leaf] = QuantizedLinear.from_weight(linear.weight.detach(), bits, group, bias)
        del linear
        count += 1
    return count


def _linears(module: nn.Module, prefix: str) -> list[tuple[str, nn.Linear]]:
    """(path in DeepseekVL2, layer) of every nn.Linear under `module`."""
    return [(f"{prefix}.{name}" if prefix else name, child) for name, child in module.named_modules()
            if type(child) is nn.Linear]


def describe_quantization(model: nn.Module) -> str:
    """One line for --verbose: how many layers are quantized how, and the kernels that run them."""
    schemes: dict[str, int] = {}
    kernel_names: dict[str, int] = {}
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            scheme = "int8" if module.bits == 8 else f"int4 (group size {module.group_size})"
            schemes[scheme] = schemes.get(scheme, 0) + 1
            kernel_names[module.kernel] = kernel_names.get(module.kernel, 0) + 1
    if not schemes:
        return "not quantized"
    layers = ", ".join(f"{count} {scheme}" for scheme, count in schemes.items())
    used = ", ".join(f"{name} ({count})" for name, count in kernel_names.items())
    return f"quantized linear layers: {layers}; quantized kernels: {used}"
