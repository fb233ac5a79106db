"""Adapters in peft's layout: round trip, an adapter written with peft's own names loads, mismatches are named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from dsvl2.adapters.lora import AdapterError, LoraSettings, apply_lora, lora_layers, selection_of
from dsvl2.adapters.peft_format import CONFIG_FILE, WEIGHTS_FILE, load_adapter, read_adapter, save_adapter
from dsvl2.checkpoint import load_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _logits(model, adapter: str | None = "default") -> torch.Tensor:
    with torch.no_grad(), selection_of(model).use(adapter):
        return model(input_ids=torch.arange(3, 19).view(2, 8)).logits


def _trained_adapter(conf_dir: Path, out: Path, variant: str = "small_like", **settings) -> tuple[Path, torch.Tensor]:
    model = load_model(conf_dir / variant)
    lora = LoraSettings(**{"r": 4, "alpha": 8.0, "target_modules": ("q_proj", "kv_b_proj", "down_proj"), **settings})
    apply_lora(model, lora)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.adapters["default"].lora_B.weight.normal_(0, 0.05, generator=generator)
    save_adapter(model, out, lora, model.cfg, base_model_name_or_path=str(conf_dir / variant))
    return out, _logits(model)


def test_saving_and_loading_round_trips(conf_dir: Path, tmp_path: Path) -> None:
    folder, logits = _trained_adapter(conf_dir, tmp_path / "adapter")
    config = json.loads((folder / CONFIG_FILE).read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8.0
    assert config["target_modules"] == ["down_proj", "kv_b_proj", "q_proj"] and config["bias"] == "none"
    _, tensors, dims = read_adapter(folder)
    assert "base_model.model.language.model.layers.0.self_attn.q_proj.lora_A.weight" in tensors
    assert all(k.startswith("base_model.model.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in tensors)
    assert dims["language.hidden_size"] == 64
    model = load_model(conf_dir / "small_like")
    load_adapter(model, model.cfg, folder)
    torch.testing.assert_close(_logits(model), logits, atol=1e-5, rtol=1e-5)


def test_an_adapter_written_with_peft_names_loads(conf_dir: Path, tmp_path: Path) -> None:
    """What peft's save_pretrained writes for this architecture: its config fields, its key names, and
    no metadata of ours."""
    model = load_model(conf_dir / "tiny_like")
    layers = [f"language.model.layers.{i}.self_attn.{p}" for i in range(3) for p in ("q_proj", "v_proj")]
    generator = torch.Generator().manual_seed(1)
    tensors = {}
    for layer in layers:
        module = model.get_submodule(layer)
        tensors[f"base_model.model.{layer}.lora_A.weight"] = torch.randn(8, module.in_features, generator=generator)
        tensors[f"base_model.model.{layer}.lora_B.weight"] = torch.randn(module.out_features, 8, generator=generator)
    folder = tmp_path / "peft"
    folder.mkdir()
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    (folder / CONFIG_FILE).write_text(json.dumps({
        "alpha_pattern": {}, "auto_mapping": None, "base_model_name_or_path": "deepseek-ai/deepseek-vl2-tiny",
        "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
        "layer_replication": None, "layers_pattern": None, "layers_to_transform": None, "loftq_config": {},
        "lora_alpha": 16, "lora_dropout": 0.05, "megatron_config": None, "megatron_core": "megatron.core",
        "modules_to_save": None, "peft_type": "LORA", "r": 8, "rank_pattern": {}, "revision": None,
        "target_modules": ["v_proj", "q_proj"], "task_type": "CAUSAL_LM", "use_dora": False, "use_rslora": False,
    }))
    base = load_model(conf_dir / "tiny_like")
    for layer in layers:  # the update peft computes: W + (alpha / r) B A
        module = base.get_submodule(layer)
        delta = tensors[f"base_model.model.{layer}.lora_B.weight"] @ tensors[f"base_model.model.{layer}.lora_A.weight"]
        module.weight.data += delta * 16 / 8
    with torch.no_grad():
        expected = base(input_ids=torch.arange(3, 19).view(2, 8)).logits
    load_adapter(model, model.cfg, folder)
    assert len(list(lora_layers(model))) == len(layers)
    torch.testing.assert_close(_logits(model), expected, atol=1e-4, rtol=1e-4)


def _edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / CONFIG_FILE).read_text())
    (folder / CONFIG_FILE).write_text(json.dumps({**config, **changes}))


def test_mismatched_adapters_are_refused_by_name(conf_dir: Path, tmp_path: Path) -> None:
    folder, _ = _trained_adapter(conf_dir, tmp_path / "adapter")
    fresh = lambda variant="small_like": load_model(conf_dir / variant)  # noqa: E731
    with pytest.raises(AdapterError, match=r"trained on another base model: .*language.q_lora_rank None \(model: 48\)"):
        model = fresh("base_like")
        load_adapter(model, model.cfg, folder)
    _edit_config(folder, r=8)
    with pytest.raises(AdapterError, match=r"rank mismatch at language\.model\.layers\.\d\.\S+: adapter_config.json "
                                           r"says r=8, the weights have lora_A \[4, "):
        model = fresh()
        load_adapter(model, model.cfg, folder)
    _edit_config(folder, r=4, target_modules=["q_proj", "down_proj"])
    with pytest.raises(AdapterError, match="has weights for layers target_modules does not name: .*kv_b_proj"):
        model = fresh()
        load_adapter(model, model.cfg, folder)
    _edit_config(folder, target_modules=["q_proj", "kv_b_proj", "down_proj", "o_proj"])
    with pytest.raises(AdapterError, match="name layers without weights in adapter_model.safetensors: .*o_proj"):
        model = fresh()
        load_adapter(model, model.cfg, folder)
    _edit_config(folder, target_modules=["q_proj", "kv_b_proj", "down_proj"], use_dora=True)
    with pytest.raises(AdapterError, match="use_dora is True; dsvl2 loads only adapters with use_dora False"):
        read_adapter(folder)
    with pytest.raises(AdapterError, match="is not an adapter directory"):
        read_adapter(conf_dir / "small_like")


def test_a_peft_adapter_for_another_model_is_refused_without_our_metadata(conf_dir: Path, tmp_path: Path) -> None:
    """No dsvl2_base metadata (written by peft): the layer widths still tell."""
    folder, _ = _trained_adapter(conf_dir, tmp_path / "adapter", "tiny_like", target_modules=("q_proj",))
    _, tensors, _ = read_adapter(folder)
    save_file({k: torch.cat([v, v], dim=1) if ".lora_A." in k else v for k, v in tensors.items()},
              str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    model = load_model(conf_dir / "tiny_like")
    with pytest.raises(AdapterError, match=r"q_proj is 128 -> \d+ in the adapter but 64 -> \d+ in this model"):
        load_adapter(model, model.cfg, folder)
    assert not list(lora_layers(model))  # nothing was applied
