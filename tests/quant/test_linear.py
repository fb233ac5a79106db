"""QuantizedLinear and the scheme: the layer equals dequantize-then-matmul for every scheme, group size and
activation dtype, gradients reach the input, quantization errors stay within the scheme's bound, and
quantize_module replaces exactly the layers the scheme names."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dsvl2 import machine
from dsvl2.config import ConfigError
from dsvl2.quant import kernels
from dsvl2.quant.kernels import ENV_KERNEL, dequantize_int4, dequantize_int8, unpack_int4
from dsvl2.quant.linear import QuantizedLinear, describe_quantization, quantize_module
from dsvl2.quant.scheme import (
    QuantizationError,
    QuantScheme,
    fit_group_size,
    parse_scheme,
    quantize_int4,
    quantize_int8,
    resolve_scheme,
    scheme_from_config,
)

SCHEMES = [QuantScheme(8), QuantScheme(4, 32), QuantScheme(4, 64), QuantScheme(4, 128)]
IDS = ["int8", "int4-g32", "int4-g64", "int4-g128"]


def weight(n: int = 48, k: int = 256, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    w[:, 7] *= 10  # an outlier input column, as trained weights have
    return w


def dequantized(layer: QuantizedLinear) -> torch.Tensor:
    return layer.quantized.dequantize()


@pytest.mark.parametrize("scheme", SCHEMES, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("rows", [1, 5, 80])
@pytest.mark.parametrize("kernel", ["auto", "dequantize"])
def test_quantized_linear_equals_dequantize_then_matmul(scheme: QuantScheme, dtype: torch.dtype, rows: int,
                                                        kernel: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_KERNEL, kernel)
    linear = nn.Linear(256, 48)
    with torch.no_grad():
        linear.weight.copy_(weight())
    layer = QuantizedLinear.from_linear(linear, scheme)
    x = torch.randn(2, rows, 256, generator=torch.Generator().manual_seed(rows)).to(dtype)
    out = layer(x)
    assert out.shape == (2, rows, 48) and out.dtype == dtype
    expected = F.linear(x.float(), dequantized(layer), linear.bias.detach())
    # Relative to the output's scale: float32's rounding on the dequantizing path, bfloat16's for bfloat16 outputs;
    # the fast CPU kernels quantize activations to int8 per 32 columns (tests/quant/test_kernels.py bounds that
    # exactly), hence a looser bound for them here.
    tolerance = {"dequantize": 1e-5 if dtype == torch.float32 else 1e-2, "auto": 8e-2}[kernel]
    assert (out.float() - expected).abs().max() <= tolerance * expected.abs().max()


@pytest.mark.parametrize("scheme", SCHEMES, ids=IDS)
def test_gradient_reaches_the_input_as_through_the_dequantized_weight(scheme: QuantScheme) -> None:
    layer = QuantizedLinear.from_linear(nn.Linear(256, 48, bias=False), scheme)
    x = torch.randn(3, 256, requires_grad=True)
    grad_out = torch.randn(3, 48)
    layer(x).backward(grad_out)
    reference = x.detach().clone().requires_grad_(True)
    F.linear(reference, dequantized(layer)).backward(grad_out)
    assert torch.allclose(x.grad, reference.grad, atol=1e-5, rtol=1e-4)
    assert not any(p.requires_grad for p in layer.quantized.parameters())  # the weight gets no gradient


@pytest.mark.parametrize("native_bf16", [False, True], ids=["avx2", "avx512_bf16"])
def test_bfloat16_gradient_is_computed_in_float32_where_the_cpu_has_no_native_bfloat16(
        native_bf16: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(machine, "has_native_bf16", lambda flags=None: native_bf16)
    layer = QuantizedLinear.from_linear(nn.Linear(256, 48, bias=False), QuantScheme(4, 32))
    x = torch.randn(3, 256).to(torch.bfloat16).requires_grad_(True)
    grad_out = torch.randn(3, 48).to(torch.bfloat16)
    layer(x).backward(grad_out)
    assert x.grad.dtype == torch.bfloat16
    if native_bf16:  # bfloat16 arithmetic, the weight rounded to bfloat16 first
        expected = grad_out @ dequantized(layer).to(torch.bfloat16)
    else:  # the float32 product of the float32 dequantized weight, rounded once at the end
        expected = (grad_out.float() @ dequantized(layer)).to(torch.bfloat16)
    assert torch.equal(x.grad, expected)


def test_int8_error_is_small_and_rows_use_their_own_scale() -> None:
    w = weight()
    w[3] *= 100  # one row's large values must not coarsen the others
    q, scales = quantize_int8(w)
    assert q.dtype == torch.int8 and scales.shape == (48,)
    restored = dequantize_int8(q, scales)
    assert (restored - w).abs().max(dim=1).values.le(scales / 2 + 1e-7).all()  # half a step per row
    plain = torch.randn(64, 512) * 0.02  # without outlier columns
    assert (dequantize_int8(*quantize_int8(plain)) - plain).norm() / plain.norm() < 0.01
    assert torch.equal(dequantize_int8(*quantize_int8(torch.zeros(2, 8))), torch.zeros(2, 8))  # no NaN


@pytest.fixture(params=["auto", "stock"], ids=["cpp-quantizer", "pytorch-quantizer"])
def quantizer(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """quantize_int4 through the C++ extension (where it builds) or through PyTorch ops (stock kernels)."""
    monkeypatch.setenv(ENV_KERNEL, request.param)
    return request.param


@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_error_is_at_most_half_a_step_per_group(group: int, quantizer: str) -> None:
    w = weight()
    q, scales, mins = quantize_int4(w, group)
    assert q.dtype == torch.uint8 and q.shape == (48, 128) and scales.shape == mins.shape == (48, 256 // group)
    assert scales.dtype == mins.dtype == torch.float16
    values = unpack_int4(q)
    assert values.max() <= 15
    # Half a step of the stored (float16) scale: q is chosen against the rounded scale and min.
    error = (dequantize_int4(q, scales, mins, group) - w).abs().view(48, -1, group).amax(dim=-1)
    assert (error <= scales.float() / 2 + 1e-6).all()
    # Each group's extremes are represented: its minimum exactly, its maximum at q = 15.
    assert torch.equal(values.view(48, -1, group).amin(dim=-1), torch.zeros(48, 256 // group, dtype=torch.uint8))
    assert (values.view(48, -1, group).amax(dim=-1) == 15).all()


@pytest.mark.parametrize("std", [1.0, 1e-6])
def test_int4_float16_scales_keep_small_and_large_weights_accurate(std: float, quantizer: str) -> None:
    """float16 scales and mins (quantized in float32, then rounded: min down, scale up) cost little against
    float32 ones, also for weights of 1e-6 (scales ~3e-7, float16 subnormals): relative error within 12% of what
    exact float32 scales give, and every value within half a stored step."""
    w = torch.randn(64, 512, generator=torch.Generator().manual_seed(3)) * std
    q, scales, mins = quantize_int4(w, 64)
    restored = dequantize_int4(q, scales, mins, 64)
    low, high = torch.aminmax(w.view(64, -1, 64), dim=-1)
    exact_scale = (high - low) / 15  # float32 scale and min, the reference
    exact = torch.round((w.view(64, -1, 64) - low[..., None]) / exact_scale[..., None])
    exact = (exact * exact_scale[..., None] + low[..., None]).view(64, 512)
    assert (restored - w).norm() <= 1.12 * (exact - w).norm()
    error = (restored - w).abs().view(64, -1, 64).amax(dim=-1)
    assert (error <= scales.float() / 2 * (1 + 1e-5) + 1e-7 * std).all()


def test_int4_constant_groups_and_weights_beyond_float16(quantizer: str) -> None:
    w = torch.zeros(3, 64)
    w[1] = 3.3  # not a float16: min rounds down below it, the scale reaches it
    w[2, 32:] = -1e-9  # under float16's smallest subnormal
    q, scales, mins = quantize_int4(w, 32)
    restored = dequantize_int4(q, scales, mins, 32)
    assert torch.isfinite(restored).all() and (restored - w).abs().max() <= 1e-3 * 3.3
    assert restored[0].eq(0).all() and (restored[2, 32:] - w[2, 32:]).abs().max() < 1e-7
    big = torch.full((1, 32), 1e5)  # beyond float16's 65504: min 65504 and the scale make up the rest
    assert torch.allclose(dequantize_int4(*quantize_int4(big, 32), 32), big, rtol=1e-3)
    with pytest.raises(QuantizationError, match="float16"):
        quantize_int4(torch.full((1, 32), 1e7), 32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_cpp_quantizer_gives_the_pytorch_quantizers_values(dtype: torch.dtype,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Same scales and mins; the same q but at exact ties (w halfway between two levels, common with bfloat16
    weights), where the C++ fma and PyTorch's separate multiply and add may land on either neighbour."""
    if kernels.extension()[0] is None:
        pytest.skip(kernels.extension()[1])
    w = torch.randn(301, 1024, generator=torch.Generator().manual_seed(5)).to(dtype)
    w[7, :64] = 0.25  # a constant group
    for group in (32, 64, 128):
        native = kernels.quantize_int4_native(w, group)
        assert native is not None
        monkeypatch.setenv(ENV_KERNEL, "stock")
        assert kernels.quantize_int4_native(w, group) is None
        reference = quantize_int4(w, group)
        monkeypatch.delenv(ENV_KERNEL)
        assert torch.equal(native[1], reference[1]) and torch.equal(native[2], reference[2])
        differ = unpack_int4(native[0]).int() - unpack_int4(reference[0]).int()
        assert differ.abs().max() <= 1 and differ.ne(0).float().mean() < 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_cpp_int8_quantizer_gives_the_pytorch_quantizers_values_exactly(dtype: torch.dtype,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    if kernels.extension()[0] is None:
        pytest.skip(kernels.extension()[1])
    for k in (100, 1280):  # K not a multiple of 32, and one that is
        w = torch.randn(37, k, generator=torch.Generator().manual_seed(k)).to(dtype)
        w[1] = 0  # an all-zero row
        w[2, 5] = 40.0  # an outlier: its row's scale
        native = kernels.quantize_int8_native(w)
        assert native is not None
        monkeypatch.setenv(ENV_KERNEL, "stock")
        reference = quantize_int8(w)
        monkeypatch.delenv(ENV_KERNEL)
        assert torch.equal(native[0], reference[0]) and torch.equal(native[1], reference[1])


def test_int4_packing_puts_even_columns_in_the_low_nibble() -> None:
    w = torch.tensor([[0.0, 15.0] * 16])  # one group of 32: q = w exactly
    q, scales, mins = quantize_int4(w, 32)
    assert scales.item() == 1.0 and mins.item() == 0.0
    assert q[0, 0].item() == 0xF0


def test_weight_property_and_dtype_conversions_leave_the_quantized_tensors_alone() -> None:
    linear = nn.Linear(256, 48).to(torch.bfloat16)
    layer = QuantizedLinear.from_linear(linear, QuantScheme(4, 64))
    assert layer.weight.dtype == torch.bfloat16 and layer.weight.shape == (48, 256)
    before = {name: t.clone() for name, t in layer.quantized.state_dict().items()}
    layer.float()
    assert layer.bias.dtype == torch.float32
    after = layer.quantized.state_dict()
    assert all(after[name].dtype == t.dtype and torch.equal(after[name], t) for name, t in before.items())
    assert layer(torch.randn(2, 256)).dtype == torch.float32


def tiny_decoder() -> nn.Module:
    """A stand-in with DeepseekVL2's names: two layers' attention and experts, a router gate, an lm_head."""
    block = nn.Module()
    block.self_attn = nn.Module()
    block.self_attn.q_proj = nn.Linear(64, 64, bias=False)
    block.self_attn.kv_b_proj = nn.Linear(32, 64, bias=False)
    block.mlp = nn.Module()
    block.mlp.experts = nn.ModuleList(nn.Linear(64, 32, bias=False) for _ in range(2))
    language = nn.Module()
    language.model = nn.Module()
    language.model.layers = nn.ModuleList([block])
    language.lm_head = nn.Linear(64, 100, bias=False)
    root = nn.Module()
    root.language = language
    root.vision = nn.Module()
    root.vision.fc = nn.Linear(64, 64)
    return root


def test_quantize_module_replaces_the_decoder_layers_but_kv_b_proj() -> None:
    model = tiny_decoder()
    x = torch.randn(1, 64)
    before = model.language.model.layers[0].self_attn.q_proj(x)
    assert quantize_module(model, QuantScheme(8)) == 3
    attn = model.language.model.layers[0].self_attn
    assert isinstance(attn.q_proj, QuantizedLinear) and type(attn.kv_b_proj) is nn.Linear
    assert type(model.language.lm_head) is nn.Linear and type(model.vision.fc) is nn.Linear
    assert (attn.q_proj(x) - before).abs().max() < 0.02 * before.abs().max()
    assert "3 int8" in describe_quantization(model)
    also = tiny_decoder()
    assert quantize_module(also, QuantScheme(4, 32, ("lm_head", "vision"))) == 5
    assert also.language.lm_head.bits == 8 and also.vision.fc.bits == 8 and also.vision.fc.bias is not None
    language = tiny_decoder().language
    assert quantize_module(language, QuantScheme(8), prefix="language") == 3


def test_group_size_choice_and_its_errors() -> None:
    widths = {"language.model.layers.0.mlp.down_proj": 1408, "language.model.layers.0.self_attn.q_proj": 2048}
    assert fit_group_size(QuantScheme(4), widths).group_size == 64  # the default divides both
    assert fit_group_size(QuantScheme(4), {**widths, "a": 96}).group_size == 32  # 64 does not divide 96
    fallback = fit_group_size(QuantScheme(4), {**widths, "language.model.layers.0.self_attn.q_b_proj": 48})
    assert fallback.group_size == 64 and fallback.bits_for("language.model.layers.0.self_attn.q_b_proj") == 8
    with pytest.raises(QuantizationError, match="group size 64 does not divide the input dimension 96 of "
                                                "language.model.layers.1.mlp.down_proj"):
        fit_group_size(QuantScheme(4, 64), {**widths, "language.model.layers.1.mlp.down_proj": 96})
    with pytest.raises(QuantizationError, match="must be one of 32, 64, 128"):
        QuantScheme(4, 48)


def test_options_and_config_parsing() -> None:
    assert parse_scheme(None) is None and parse_scheme("none") == "none"
    assert parse_scheme("int4", 128, "lm_head") == QuantScheme(4, 128, ("lm_head",))
    with pytest.raises(QuantizationError, match="unknown quantization 'int3'"):
        parse_scheme("int3")
    with pytest.raises(QuantizationError, match="unknown part.*: head"):
        parse_scheme("int8", None, "head")
    with pytest.raises(QuantizationError, match="--group-size is for int4"):
        parse_scheme("int8", 64)
    scheme = QuantScheme(4, 64, ("lm_head",), ("language.model.layers.0.self_attn.q_b_proj",))
    assert scheme_from_config(scheme.to_config()) == scheme
    for field, value, message in [("quant_method", "gptq", "quant_method is 'gptq'"),
                                  ("format_version", 2, "format_version is 2"),
                                  ("bits", 3, "bits must be 4 or 8")]:
        with pytest.raises(ConfigError, match=message):
            scheme_from_config({**scheme.to_config(), field: value})


def test_a_quantized_checkpoint_loads_only_with_its_own_scheme() -> None:
    stored = QuantScheme(4, 64)
    assert resolve_scheme(None, stored) is stored and resolve_scheme(QuantScheme(4), stored) is stored
    assert resolve_scheme(QuantScheme(8), None) == QuantScheme(8)
    with pytest.raises(QuantizationError, match="--quantize int8 was asked for, but the checkpoint is already "
                                                "quantized as int4-g64"):
        resolve_scheme(QuantScheme(8), stored)
    with pytest.raises(QuantizationError, match="cannot load unquantized"):
        resolve_scheme("none", stored)
