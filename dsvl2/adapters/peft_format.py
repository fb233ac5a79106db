"""LoRA adapters on disk in peft's layout, so that tools reading peft adapters read ours and ours load theirs.

A folder holds `adapter_config.json` (peft's LoraConfig fields) and `adapter_model.safetensors` with
peft's tensor names, `base_model.model.<module path>.lora_A.weight` and `.lora_B.weight` (no adapter
name). Our module paths are the released checkpoints' (`language.model.layers.3.self_attn.q_proj`),
which are the paths peft gives DeepSeek-VL2's layers. Besides peft's `{"format": "pt"}` the file's
metadata records the base model's dimensions (`dsvl2_base`), so an adapter for another model is refused
by name before any layer is touched.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from dsvl2.adapters.lora import (
    ALL_LINEAR,
    AdapterError,
    LoraLinear,
    LoraSettings,
    apply_lora,
    linear_layer_names,
    lora_layers,
    target_names,
)
from dsvl2.config import ModelConfig

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."
_KEY = re.compile(r"^base_model\.model\.(?P<path>.+)\.lora_(?P<part>[AB])\.weight$")
# LoraConfig fields whose non-default values change what the adapter computes, which we do not implement.
_UNSUPPORTED = {"use_dora": False, "fan_in_fan_out": False, "bias": "none", "layers_to_transform": None,
                "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}, "modules_to_save": None,
                "layer_replication": None, "megatron_config": None}
_BASE_DIMS = {
    "language": ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "num_key_value_heads", "n_routed_experts", "n_shared_experts",
                 "kv_lora_rank", "q_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim",
                 "first_k_dense_replace", "use_mla"),
    "vision": ("width", "layers", "image_size", "patch_size"),
    "projector": ("projector_type", "input_dim", "n_embed", "depth"),
}


def base_dims(config: ModelConfig) -> dict[str, Any]:
    """The dimensions of a base model that decide which adapters fit it."""
    return {f"{part}.{key}": getattr(getattr(config, part), key) for part, keys in _BASE_DIMS.items() for key in keys}


def peft_config(settings: LoraSettings, base_model_name_or_path: str | None) -> dict[str, Any]:
    """adapter_config.json for `settings`: peft's LoraConfig fields, ours filled in, the rest peft's defaults."""
    targets = settings.target_modules
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "auto_mapping": None,
        "base_model_name_or_path": base_model_name_or_path, "revision": None, "inference_mode": True,
        "r": settings.r, "lora_alpha": settings.alpha, "lora_dropout": settings.dropout,
        "target_modules": targets if isinstance(targets, str) else sorted(targets),
        "use_rslora": settings.use_rslora, "init_lora_weights": True, "loftq_config": {},
        "megatron_core": "megatron.core", **_UNSUPPORTED,
    }


def settings_from_config(raw: Any, where: str) -> LoraSettings:
    """The LoraSettings of an adapter_config.json mapping; an error naming the field for anything else."""
    if not isinstance(raw, dict):
        raise AdapterError(f"{where} is not a JSON object")
    if raw.get("peft_type") != "LORA":
        raise AdapterError(f"{where}: peft_type is {raw.get('peft_type')!r}; only LORA adapters load")
    for key, default in _UNSUPPORTED.items():
        value = raw.get(key, default)
        if value != default and not (default is None and value in ([], {})) and not (default == {} and value is None):
            raise AdapterError(f"{where}: {key} is {value!r}; dsvl2 loads only adapters with {key} {default!r}")
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in raw:
            raise AdapterError(f"{where} has no {key}")
    targets = raw["target_modules"]
    if isinstance(targets, list):
        if not all(isinstance(t, str) for t in targets):
            raise AdapterError(f"{where}: target_modules must be names, got {targets!r}")
        targets = tuple(targets)
    elif not isinstance(targets, str):
        raise AdapterError(f"{where}: target_modules must be a list of names or a regular expression")
    r, alpha = raw["r"], raw["lora_alpha"]
    if isinstance(r, bool) or not isinstance(r, int):
        raise AdapterError(f"{where}: r must be an integer, got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise AdapterError(f"{where}: lora_alpha must be a number, got {alpha!r}")
    try:
        return LoraSettings(r=r, alpha=float(alpha), dropout=float(raw.get("lora_dropout") or 0.0),
                            target_modules=targets, use_rslora=bool(raw.get("use_rslora", False)))
    except AdapterError as exc:
        raise AdapterError(f"{where}: {exc}") from None


def adapter_state(model: nn.Module, name: str = "default") -> dict[str, torch.Tensor]:
    """Adapter `name`'s tensors under peft's names."""
    state = {}
    for path, layer in lora_layers(model):
        if name in layer.adapters:
            pair = layer.adapters[name]
            state[f"{KEY_PREFIX}{path}.lora_A.weight"] = pair.lora_A.weight.detach().contiguous().cpu()
            state[f"{KEY_PREFIX}{path}.lora_B.weight"] = pair.lora_B.weight.detach().contiguous().cpu()
    if not state:
        raise AdapterError(f"the model has no adapter named {name!r}")
    return state


def save_adapter(model: nn.Module, out_dir: str | Path, settings: LoraSettings, config: ModelConfig,
                 base_model_name_or_path: str | None = None, name: str = "default",
                 state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write adapter `name` of `model` (or the given `state`, peft's names) to `out_dir` in peft's layout."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = adapter_state(model, name) if state is None else state
    metadata = {"format": "pt", "dsvl2_base": json.dumps(base_dims(config))}
    save_file(state, str(out_dir / WEIGHTS_FILE), metadata=metadata)
    (out_dir / CONFIG_FILE).write_text(json.dumps(peft_config(settings, base_model_name_or_path), indent=2) + "\n")
    return out_dir


def read_adapter(path: str | Path) -> tuple[LoraSettings, dict[str, torch.Tensor], dict[str, Any] | None]:
    """(settings, tensors by peft name, the base dimensions it records or None) of an adapter folder."""
    path = Path(path)
    if not path.is_dir():
        raise AdapterError(f"adapter directory {path} does not exist")
    config_path, weights_path = path / CONFIG_FILE, path / WEIGHTS_FILE
    if not config_path.is_file():
        raise AdapterError(f"{path} is not an adapter directory (no {CONFIG_FILE})")
    if not weights_path.is_file():
        extra = " (adapter_model.bin, pickled weights, is not read: convert it to safetensors)" if (
            path / "adapter_model.bin").is_file() else ""
        raise AdapterError(f"{path} has no {WEIGHTS_FILE}{extra}")
    try:
        raw = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterError(f"{config_path} is not valid JSON: {exc}") from None
    settings = settings_from_config(raw, str(config_path))
    try:
        with safe_open(str(weights_path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 - not a dict
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types for corrupt files
        raise AdapterError(f"{weights_path} cannot be read: {exc}") from None
    dims = json.loads(metadata["dsvl2_base"]) if "dsvl2_base" in metadata else None
    return settings, tensors, dims


def _layer_tensors(tensors: dict[str, torch.Tensor], where: Path) -> dict[str, dict[str, torch.Tensor]]:
    by_layer: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.match(key)
        if match is None:
            raise AdapterError(f"{where}: tensor {key!r} is not a LoRA weight in peft's naming "
                               f"({KEY_PREFIX}<module>.lora_A.weight / .lora_B.weight)")
        by_layer.setdefault(match["path"], {})[match["part"]] = tensor
    for layer, parts in by_layer.items():
        if set(parts) != {"A", "B"}:
            raise AdapterError(f"{where}: layer {layer} has lora_{''.join(parts)} but not both lora_A and lora_B")
    return by_layer


def check_adapter(model: nn.Module, config: ModelConfig, settings: LoraSettings,
                  tensors: dict[str, torch.Tensor], dims: dict[str, Any] | None, where: Path) -> list[str]:
    """Check an adapter against the model; returns the layers it changes. Errors name the mismatch: the
    base model's dimensions, layers the model lacks, target modules, rank, or a layer's width."""
    if dims is not None:
        ours = base_dims(config)
        differ = [f"{k} {dims[k]} (model: {ours.get(k)})" for k in sorted(dims) if dims[k] != ours.get(k)]
        if differ:
            raise AdapterError(f"{where} was trained on another base model: " + ", ".join(differ))
    by_layer = _layer_tensors(tensors, where)
    linear = linear_layer_names(model)
    missing = sorted(set(by_layer) - set(linear))
    if missing:
        raise AdapterError(f"{where} changes layers this model does not have (another base model?): "
                           f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    try:
        targeted = target_names(linear, settings.target_modules)
    except AdapterError as exc:
        raise AdapterError(f"{where}: {exc}") from None
    if set(targeted) != set(by_layer):
        extra = sorted(set(by_layer) - set(targeted))
        absent = sorted(set(targeted) - set(by_layer))
        parts = []
        if absent:
            parts.append(f"target_modules {settings.target_modules!r} name layers without weights in "
                         f"{WEIGHTS_FILE}: {', '.join(absent[:5])}{' ...' if len(absent) > 5 else ''}")
        if extra:
            parts.append(f"{WEIGHTS_FILE} has weights for layers target_modules does not name: "
                         f"{', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''}")
        raise AdapterError(f"{where}: target modules do not match the weights: " + "; ".join(parts))
    for layer in targeted:
        a, b = by_layer[layer]["A"], by_layer[layer]["B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != settings.r or b.shape[1] != settings.r:
            raise AdapterError(f"{where}: rank mismatch at {layer}: {CONFIG_FILE} says r={settings.r}, the weights "
                               f"have lora_A {list(a.shape)} and lora_B {list(b.shape)}")
        module = model.get_submodule(layer)
        if a.shape[1] != module.in_features or b.shape[0] != module.out_features:
            raise AdapterError(f"{where}: {layer} is {a.shape[1]} -> {b.shape[0]} in the adapter but "
                               f"{module.in_features} -> {module.out_features} in this model (another base model?)")
    return targeted


def load_adapter(model: nn.Module, config: ModelConfig, path: str | Path, name: str = "default",
                 dtype: torch.dtype | None = None) -> LoraSettings:
    """Check the adapter folder `path` against `model`, then add it as adapter `name` (in its stored dtype, or
    `dtype`); returns its settings. Nothing is changed when a check fails."""
    path = Path(path)
    settings, tensors, dims = read_adapter(path)
    targeted = check_adapter(model, config, settings, tensors, dims, path)
    # apply_lora matches a regular expression itself; a list is given as the layers checked above.
    exact = settings.target_modules if settings.target_modules == ALL_LINEAR or isinstance(
        settings.target_modules, str) else tuple(targeted)
    first = tensors[f"{KEY_PREFIX}{targeted[0]}.lora_A.weight"]
    apply_lora(model, dataclasses.replace(settings, target_modules=exact), name, dtype=dtype or first.dtype)
    with torch.no_grad():
        for layer in targeted:
            module = model.get_submodule(layer)
            assert isinstance(module, LoraLinear)
            pair = module.adapters[name]
            pair.lora_A.weight.copy_(tensors[f"{KEY_PREFIX}{layer}.lora_A.weight"])
            pair.lora_B.weight.copy_(tensors[f"{KEY_PREFIX}{layer}.lora_B.weight"])
    return settings
