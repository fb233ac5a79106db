"""Weight-only quantization schemes: which layers, how many bits, and the canonical quantized tensors.

int8: one symmetric scale per output channel, w ~= qweight * scale with scale = absmax / 127.
int4: asymmetric groups of `group_size` input columns, w ~= q * scale + min with q in 0..15, two values a byte
(low nibble: input column 2j, high nibble: column 2j + 1); scale and min are float16 (min rounded down and scale
up, so that min + 15 * scale still reaches the group's maximum), q chosen against those rounded values.

These are the tensors a quantized checkpoint stores (`<linear>.qweight`, `.scales`, `.mins`) and the kernels'
`prepare_*` functions take (dsvl2.quant.kernels, which also dequantizes them exactly).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from dsvl2.config import ConfigError
from dsvl2.errors import InputError
from dsvl2.quant.kernels import INT4_PARAM_DTYPE, quantize_int4_native, quantize_int8_native

QUANT_METHOD = "dsvl2"
FORMAT_VERSION = 1
CHOICES = ("none", "int8", "int4")
GROUP_SIZES = (32, 64, 128)
DEFAULT_GROUP_SIZE = 64
# Parts quantized on request besides the language model's decoder layers; always int8 (per output channel).
EXTRA_PARTS = ("lm_head", "vision")
# What --quantize int8|int4 quantizes besides the decoder layers unless --quantize-also says otherwise: the
# lm_head is the largest single matrix a decode step reads (Tiny: 0.33 of the 0.57 GB an int4 step reads with it
# in bfloat16), and int8 per output channel moves the bundled model's scores by at most 0.007
# (benchmarks/notes_quantized.md).
DEFAULT_EXTRA = ("lm_head",)
# Rows quantized at a time: float32 temporaries stay near this many elements, not a whole weight's.
BLOCK_ELEMENTS = 1 << 22
TINY = torch.finfo(torch.float32).tiny  # divides an all-zero row or constant group without a NaN

# kv_b_proj stays in floating point: absorbed MLA decoding reads its weight directly, and it is small.
_DECODER_LINEAR = re.compile(r"^language\.model\.layers\.\d+\.(?!self_attn\.kv_b_proj$)")


class QuantizationError(InputError):
    """A quantization option that cannot be applied: an unknown scheme, a bad group size, a conflicting checkpoint."""


@dataclass(frozen=True)
class QuantScheme:
    """`bits` (8 or 4) for the decoder layers' linear layers, `group_size` (int4 only; None until a model settles
    it, see `fit_group_size`), the `extra` parts (lm_head, vision) quantized too, in int8, and the `int8_layers`
    of an int4 scheme whose input dimension no allowed group size divides (none in the released models)."""

    bits: int
    group_size: int | None = None
    extra: tuple[str, ...] = ()
    int8_layers: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise QuantizationError(f"quantization bits must be 4 or 8, got {self.bits}")
        if self.bits == 4 and self.group_size is not None and self.group_size not in GROUP_SIZES:
            raise QuantizationError(
                f"int4 group size must be one of {', '.join(map(str, GROUP_SIZES))}, got {self.group_size}")
        if self.bits == 8 and self.group_size is not None:
            raise QuantizationError("a group size is for int4 only (int8 has one scale per output channel)")
        unknown = [p for p in self.extra if p not in EXTRA_PARTS]
        if unknown:
            raise QuantizationError(
                f"unknown part(s) to quantize: {', '.join(unknown)} (choose from {', '.join(EXTRA_PARTS)})")

    @property
    def name(self) -> str:
        """"int8", "int4-g64", with "+lm_head,vision" when those are quantized too."""
        base = "int8" if self.bits == 8 else f"int4-g{self.group_size or 'auto'}"
        return base + (f"+{','.join(self.extra)}" if self.extra else "")

    def bits_for(self, linear_name: str) -> int | None:
        """The bits of the linear layer `linear_name` (its module path in DeepseekVL2), None: left in float."""
        if _DECODER_LINEAR.match(linear_name):
            return 8 if linear_name in self.int8_layers else self.bits
        if linear_name == "language.lm_head" and "lm_head" in self.extra:
            return 8
        if linear_name.startswith("vision.") and "vision" in self.extra:
            return 8
        return None

    def group_for(self, linear_name: str) -> int | None:
        return self.group_size if self.bits_for(linear_name) == 4 else None

    def to_config(self) -> dict[str, Any]:
        """config.json's `quantization_config`."""
        config: dict[str, Any] = {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION, "bits": self.bits}
        if self.bits == 4:
            config["group_size"] = self.group_size
        config["modules"] = ["decoder_layers", *self.extra]
        if self.int8_layers:
            config["int8_layers"] = list(self.int8_layers)
        return config


def scheme_from_config(raw: dict[str, Any] | None) -> QuantScheme | None:
    """The scheme of a checkpoint's `quantization_config` (None: not quantized), or a ConfigError naming the field
    that no dsvl2 version writes."""
    if raw is None:
        return None
    method, version = raw.get("quant_method"), raw.get("format_version")
    if method != QUANT_METHOD:
        raise ConfigError(f"config.json: quantization_config.quant_method is {method!r}; only {QUANT_METHOD!r} "
                          "checkpoints (written by `dsvl2 quantize`) can be loaded")
    if version != FORMAT_VERSION:
        raise ConfigError(f"config.json: quantization_config.format_version is {version!r}; this dsvl2 reads "
                          f"version {FORMAT_VERSION}")
    modules = list(raw.get("modules", ["decoder_layers"]))
    if "decoder_layers" not in modules:
        raise ConfigError(f"config.json: quantization_config.modules {modules} lacks 'decoder_layers'")
    if raw.get("bits") == 4 and raw.get("group_size") is None:
        raise ConfigError("config.json: quantization_config has bits 4 but no group_size")
    try:
        return QuantScheme(raw.get("bits"), raw.get("group_size"), tuple(m for m in modules if m != "decoder_layers"),
                           tuple(raw.get("int8_layers", ())))
    except QuantizationError as exc:
        raise ConfigError(f"config.json: quantization_config: {exc}") from None


def resolve_scheme(asked: QuantScheme | str | None, stored: QuantScheme | None) -> QuantScheme | None:
    """The scheme a checkpoint loads with: `asked` (a scheme, "none", or None for whatever the checkpoint
    holds) against the checkpoint's own (`stored`); a quantized checkpoint loads only as it was quantized."""
    if asked is None:
        return stored
    if isinstance(asked, str):
        if asked != "none":
            raise QuantizationError(f"unknown quantization {asked!r}: use one of {', '.join(CHOICES)}")
        if stored is not None:
            raise QuantizationError(f"the checkpoint is quantized ({stored.name}) and cannot load unquantized: "
                                    "leave --quantize unset, or load the floating-point checkpoint it was made from")
        return None
    if stored is None:
        return asked
    if asked.bits == stored.bits and asked.extra == stored.extra and asked.group_size in (None, stored.group_size):
        return stored
    raise QuantizationError(f"--quantize {asked.name} was asked for, but the checkpoint is already quantized as "
                            f"{stored.name}: leave --quantize unset, or quantize the floating-point checkpoint")


def parse_scheme(choice: str | QuantScheme | None, group_size: int | None = None,
                 extra: str | tuple[str, ...] | None = None) -> QuantScheme | str | None:
    """What `--quantize CHOICE [--group-size N] [--quantize-also PARTS]` asks for: a scheme, "none" (floating
    point), or None (unset: the checkpoint decides). `extra` None: DEFAULT_EXTRA; "none" or empty: the decoder
    layers only. An int4 scheme without a group size gets one per model (`fit_group_size`)."""
    if isinstance(choice, QuantScheme):
        return choice
    if choice not in (None, "none") and extra is None:
        extra = DEFAULT_EXTRA
    extra = () if extra is None or extra == "none" else extra
    parts = tuple(p.strip() for p in extra.split(",") if p.strip()) if isinstance(extra, str) else tuple(extra)
    if choice not in (None, *CHOICES):
        raise QuantizationError(f"unknown quantization {choice!r}: use one of {', '.join(CHOICES)}")
    if choice in (None, "none"):
        if group_size is not None or parts:
            raise QuantizationError("--group-size and --quantize-also need --quantize int8 or int4")
        return choice
    if choice == "int8":
        if group_size is not None:
            raise QuantizationError("--group-size is for int4 (int8 has one scale per output channel)")
        return QuantScheme(8, None, parts)
    return QuantScheme(4, group_size, parts)


def fit_group_size(scheme: QuantScheme, widths: dict[str, int]) -> QuantScheme:
    """`scheme` with its group size settled for the int4 layers of the given input widths (linear name -> K).

    A chosen group size must divide every such layer's input dimension. Without one, the default is taken, or the
    largest allowed size below it that divides them all; a layer that no allowed size divides (the small test
    models have some, the released models none) is quantized in int8 instead."""
    if scheme.bits != 4:
        return scheme
    if scheme.group_size is not None:
        for name, k in widths.items():
            if k % scheme.group_size:
                raise QuantizationError(f"int4 group size {scheme.group_size} does not divide the input dimension "
                                        f"{k} of {name}: choose another --group-size, or leave it unset")
        return scheme
    int8_layers = {name for name, k in widths.items() if k % min(GROUP_SIZES)}
    rest = [k for name, k in widths.items() if name not in int8_layers]
    size = max(g for g in GROUP_SIZES if g <= DEFAULT_GROUP_SIZE and all(k % g == 0 for k in rest))
    return QuantScheme(4, size, scheme.extra, tuple(sorted(set(scheme.int8_layers) | int8_layers)))


# ------------------------------------------------------------------------------------------ the tensors


def quantized_shapes(bits: int, out_features: int, in_features: int, group_size: int | None) -> dict[str, list[int]]:
    """Shapes of the stored tensors of one linear layer, by suffix."""
    if bits == 8:
        return {"qweight": [out_features, in_features], "scales": [out_features]}
    groups = in_features // group_size
    return {"qweight": [out_features, in_features // 2], "scales": [out_features, groups],
            "mins": [out_features, groups]}


QUANTIZED_DTYPES = {"qweight": {8: torch.int8, 4: torch.uint8}, "scales": {8: torch.float32, 4: INT4_PARAM_DTYPE},
                    "mins": {4: INT4_PARAM_DTYPE}}


def _float32_blocks(weight: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
    """(first row, float32 copy of a block of rows) over `weight`, on the CPU; the copies are the caller's to
    change in place."""
    rows = max(1, BLOCK_ELEMENTS // max(1, weight.shape[1]))
    for start in range(0, weight.shape[0], rows):
        yield start, weight[start:start + rows].detach().to(device="cpu", dtype=torch.float32, copy=True)


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(qweight int8 [N, K], scales float32 [N]) of a float weight [N, K], symmetric per output channel (in C++
    where the extension is used: kernels.quantize_int8_native)."""
    native = quantize_int8_native(weight)
    if native is not None:
        return native
    qweight = torch.empty(weight.shape, dtype=torch.int8)
    scales = torch.empty(weight.shape[0], dtype=torch.float32)
    for start, block in _float32_blocks(weight):
        scale = block.abs().amax(dim=1) / 127
        block.mul_((1 / scale.clamp_min(TINY))[:, None]).round_()  # within -127..127: no clamp needed
        qweight[start:start + len(block)] = block
        scales[start:start + len(block)] = scale
    return qweight, scales


def _float16_toward(x: torch.Tensor, direction: float) -> torch.Tensor:
    """float32 `x` rounded to float16 toward `direction` (-inf: the largest float16 <= x, +inf: the smallest >=)."""
    half = x.to(torch.float16)
    wrong = half.float() > x if direction < 0 else half.float() < x
    return torch.where(wrong, torch.nextafter(half, torch.full_like(half, direction)), half)


def _check_float16_range(scales: torch.Tensor, mins: torch.Tensor) -> None:
    if not (bool(scales.isfinite().all()) and bool(mins.isfinite().all())):
        raise QuantizationError(f"int4: weights beyond float16's range ({torch.finfo(torch.float16).max}) cannot "
                                "have float16 scales and mins; use int8")


def quantize_int4(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(qweight uint8 [N, K/2], scales float16 [N, K/g], mins float16 [N, K/g]) of a float weight [N, K]:
    asymmetric groups of `group_size` input columns, |dequantized - w| <= scale / 2 (plus float32 rounding). The
    C++ extension computes it where it is used (kernels.quantize_int4_native), these PyTorch ops elsewhere."""
    n, k = weight.shape
    if k % group_size:
        raise QuantizationError(f"int4 group size {group_size} does not divide the input dimension {k}")
    native = quantize_int4_native(weight, group_size)
    if native is not None:
        _check_float16_range(native[1], native[2])
        return native
    qweight = torch.empty(n, k // 2, dtype=torch.uint8)
    scales = torch.empty(n, k // group_size, dtype=INT4_PARAM_DTYPE)
    mins = torch.empty_like(scales)
    for start, block in _float32_blocks(weight):
        rows = len(block)
        groups = block.view(rows, -1, group_size)
        low, high = torch.aminmax(groups, dim=-1)
        low16 = _float16_toward(low, -math.inf)
        low = low16.float()
        scale16 = _float16_toward((high - low) / 15, math.inf)
        scale = scale16.float()
        _check_float16_range(scale, low)
        # q = trunc((w - min) / scale + 0.5) against the stored (rounded) scale and min, in one pass; a group of
        # one value (scale 0) gets q = 0 from a zero inverse.
        inverse = torch.where(scale > 0, 1 / scale, 0.0)
        torch.addcmul((0.5 - low * inverse)[..., None], groups, inverse[..., None], out=groups)
        q = block.to(torch.uint8)
        qweight[start:start + rows] = torch.bitwise_or(q[:, 0::2], q[:, 1::2] << 4)
        scales[start:start + rows], mins[start:start + rows] = scale16, low16
    return qweight, scales, mins
