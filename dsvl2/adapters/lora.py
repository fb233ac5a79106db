"""LoRA: a low-rank update `scaling * B(A(dropout(x)))` added to a frozen linear layer's output.

The model's modules stay as they are: `apply_lora` replaces each targeted layer (any module with
`in_features`, `out_features` and a forward: `nn.Linear`, or a quantized linear layer, which makes
QLoRA the same code) by a `LoraLinear` that holds the original as `base`. Parameter names of the base
weights gain `.base` (`...q_proj.base.weight`); checkpoints never see them (`dsvl2.adapters.peft_format`
writes only the adapter, `merge_lora` puts the original modules back).

A layer may hold several named adapters over one copy of the base weights. Which one runs is decided by
one `AdapterSelection` shared by every LoRA layer of a model: the engine sets it for each forward, and
runs sequences of different adapters in separate forwards (a routed expert sees a gathered subset of
rows, so a per-row choice inside one forward could not follow its tokens).
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dsvl2.errors import InputError

# peft's shorthand for every linear layer but the output layer.
ALL_LINEAR = "all-linear"
OUTPUT_LAYER = "language.lm_head"
# Every attention projection of the language model, multi-head or latent.
ATTENTION = r"language\.model\.layers\.\d+\.self_attn\.\w+"


class AdapterError(InputError):
    """An adapter cannot be applied to, or loaded into, this model; the message names the mismatch."""


@dataclass(frozen=True)
class LoraSettings:
    """What an adapter is: rank `r`, `alpha` (scaling alpha/r, or alpha/sqrt(r) with `use_rslora`),
    input `dropout`, and the layers it targets (`target_modules`: names matched as peft matches them)."""

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] | str = ATTENTION
    use_rslora: bool = False

    def __post_init__(self) -> None:
        if self.r < 1:
            raise AdapterError(f"LoRA rank r must be >= 1, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise AdapterError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise AdapterError("LoRA target_modules is empty: name the layers the adapter changes")
        if isinstance(self.target_modules, str) and self.target_modules != ALL_LINEAR:
            try:
                re.compile(self.target_modules)
            except re.error as exc:
                raise AdapterError(f"LoRA target_modules {self.target_modules!r} is not a regular expression: "
                                   f"{exc}") from None

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


def is_linear_like(module: nn.Module) -> bool:
    """A layer LoRA can wrap: it declares its input and output widths and maps [..., in] -> [..., out]."""
    return (isinstance(getattr(module, "in_features", None), int)
            and isinstance(getattr(module, "out_features", None), int) and not isinstance(module, LoraLinear))


def matches(target_modules: Sequence[str] | str, name: str) -> bool:
    """peft's rule: a string is a regular expression the whole module name must match; a list matches a
    name equal to an entry or ending in "." + an entry."""
    if target_modules == ALL_LINEAR:
        return name != OUTPUT_LAYER
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == key or name.endswith("." + key) for key in target_modules)


def linear_layer_names(model: nn.Module) -> list[str]:
    """Module paths of the layers LoRA can wrap, a wrapped layer under its original path."""
    names: list[str] = []
    inside: tuple[str, ...] = ()
    for name, module in model.named_modules():
        if not name or (inside and name.startswith(inside)):
            continue
        if isinstance(module, LoraLinear):
            names.append(name)
            inside = (*inside, name + ".")
        elif is_linear_like(module):
            names.append(name)
    return names


def target_names(linear: Sequence[str], target_modules: Sequence[str] | str) -> list[str]:
    """The layers among `linear` an adapter with these targets changes; an error when it is none, or
    when a listed name matches no layer (a typo or another architecture's name)."""
    found = [name for name in linear if matches(target_modules, name)]
    if not isinstance(target_modules, str):
        unused = [key for key in target_modules if not any(matches([key], name) for name in linear)]
        if unused:
            endings = sorted({n.rsplit(".", 1)[-1] for n in linear})
            raise AdapterError(f"target_modules {unused} match no linear layer of this model (its linear layers "
                               f"are named {', '.join(endings)})")
    if not found:
        raise AdapterError(f"target_modules {target_modules!r} match no linear layer of this model")
    return found


class AdapterSelection:
    """The adapter the LoRA layers of one model run (None: none, the base model alone)."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.active: str | None = None

    @contextlib.contextmanager
    def use(self, name: str | None) -> Iterator[None]:
        if name is not None and name not in self.names:
            raise AdapterError(f"no adapter named {name!r}; loaded: {', '.join(self.names) or 'none'}")
        before, self.active = self.active, name
        try:
            yield
        finally:
            self.active = before


class LoraPair(nn.Module):
    """One adapter of one layer: `lora_A` [r, in] and `lora_B` [out, r] (peft's names), B zero at the start."""

    def __init__(self, in_features: int, out_features: int, settings: LoraSettings,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.lora_A = nn.Linear(in_features, settings.r, bias=False, dtype=dtype, device=device)
        self.lora_B = nn.Linear(settings.r, out_features, bias=False, dtype=dtype, device=device)
        self.scaling = settings.scaling
        self.dropout = nn.Dropout(settings.dropout) if settings.dropout > 0 else nn.Identity()
        # peft's default start: A as nn.Linear initialises it (Kaiming-uniform, a=sqrt(5)), B zero.
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.lora_A.weight, self.lora_B.weight
        # The adapter computes in its own dtype whatever the base's (under autocast, in autocast's).
        hidden = F.linear(self.dropout(x).to(a.dtype), a)
        return F.linear(hidden, b) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A [out, in], in float32."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling


class LoraLinear(nn.Module):
    """A frozen `base` layer plus the selected adapter's low-rank update."""

    def __init__(self, base: nn.Module, selection: AdapterSelection) -> None:
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.adapters = nn.ModuleDict()
        self._selection = selection  # shared with every LoRA layer of the model, not a submodule
        self.train(base.training)  # a model in eval mode must not start dropping adapter inputs

    def add(self, name: str, settings: LoraSettings, dtype: torch.dtype = torch.float32) -> LoraPair:
        device = next((t.device for t in self.base.parameters()), None) or next(
            (t.device for t in self.base.buffers()), torch.device("cpu"))
        pair = LoraPair(self.in_features, self.out_features, settings, dtype=dtype, device=device)
        pair.train(self.training)
        self.adapters[name] = pair
        return pair

    def _active(self) -> LoraPair | None:
        name = self._selection.active
        return self.adapters[name] if name is not None and name in self.adapters else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        pair = self._active()
        if pair is None:
            return out
        return out + pair(x).to(out.dtype)

    @property
    def weight(self) -> torch.Tensor:
        """The effective weight under the selected adapter, for code that reads weights directly
        (absorbed MLA reads kv_b_proj's)."""
        base = self.base.weight
        pair = self._active()
        return base if pair is None else (base.float() + pair.delta_weight()).to(base.dtype)

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base, "bias", None)

    def extra_repr(self) -> str:
        return f"adapters={list(self.adapters)}"


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLinear]]:
    """(module path of the original layer, its LoRA wrapper) for every wrapped layer."""
    for name, module in model.named_modules():
        if isinstance(module, LoraLinear):
            yield name, module


def selection_of(model: nn.Module) -> AdapterSelection | None:
    """The model's adapter selection (None: no adapter applied)."""
    return getattr(model, "_dsvl2_adapter_selection", None)


def apply_lora(model: nn.Module, settings: LoraSettings, name: str = "default",
               dtype: torch.dtype = torch.float32) -> list[str]:
    """Add adapter `name` to every layer `settings.target_modules` matches (wrapping layers not yet
    wrapped); returns the module paths. The model's other parameters are left as they are: callers freeze."""
    selection = selection_of(model)
    if selection is None:
        selection = AdapterSelection()
        model._dsvl2_adapter_selection = selection
    if name in selection.names:
        raise AdapterError(f"the model already has an adapter named {name!r}")
    wrapped = dict(lora_layers(model))
    found = target_names(linear_layer_names(model), settings.target_modules)
    for path in found:
        layer = wrapped.get(path)
        if layer is None:
            parent_name, _, leaf = path.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            layer = LoraLinear(getattr(parent, leaf), selection)
            setattr(parent, leaf, layer)
        layer.add(name, settings, dtype=dtype)
    selection.names.append(name)
    return found


def lora_parameters(model: nn.Module, name: str = "default") -> list[tuple[str, nn.Parameter]]:
    """The parameters of adapter `name`, with their names in the model."""
    marker = f".adapters.{name}."
    return [(n, p) for n, p in model.named_parameters() if marker in n]


def freeze_all_but_adapter(model: nn.Module, name: str = "default") -> list[tuple[str, nn.Parameter]]:
    """Make adapter `name` the only trainable parameters; returns them."""
    trainable = lora_parameters(model, name)
    keep = {id(p) for _, p in trainable}
    for param in model.parameters():
        param.requires_grad_(id(param) in keep)
    if not trainable:
        raise AdapterError(f"the model has no adapter named {name!r}")
    return trainable


@torch.no_grad()
def merge_lora(model: nn.Module, name: str = "default") -> int:
    """Fold adapter `name` into its layers' weights and put the original layers back (other adapters of
    those layers are dropped); returns the number of layers merged. Needs float base weights."""
    merged = 0
    for path, layer in list(lora_layers(model)):
        pair = layer.adapters[name] if name in layer.adapters else None
        base = layer.base
        if pair is not None:
            weight = getattr(base, "weight", None)
            if not isinstance(weight, nn.Parameter) or not weight.is_floating_point():
                raise AdapterError(f"{path}: a quantized base layer cannot take a merged adapter; merge into the "
                                   "unquantized checkpoint instead")
            weight.copy_((weight.float() + pair.delta_weight().to(weight.device)).to(weight.dtype))
            merged += 1
        parent_name, _, leaf = path.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, leaf, base)
    if hasattr(model, "_dsvl2_adapter_selection"):
        del model._dsvl2_adapter_selection
    return merged
