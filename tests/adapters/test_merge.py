"""`dsvl2 merge`: the merged checkpoint has the base's layout and gives the logits of base plus adapter."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from dsvl2.adapters.lora import LoraSettings, apply_lora, lora_layers, selection_of
from dsvl2.adapters.peft_format import save_adapter
from dsvl2.checkpoint import checkpoint_files, load_model, read_header, save_model
from dsvl2.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")
IDS = torch.arange(3, 19).view(2, 8)


def _adapter(base: Path, out: Path) -> tuple[Path, torch.Tensor]:
    model = load_model(base)
    settings = LoraSettings(r=4, alpha=8, target_modules=("q_proj", "kv_b_proj", "experts.3.down_proj", "up_proj"))
    apply_lora(model, settings)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.adapters["default"].lora_B.weight.normal_(0, 0.05, generator=generator)
        with selection_of(model).use("default"):
            logits = model(input_ids=IDS).logits
    return save_adapter(model, out, settings, model.cfg), logits


def _layout(folder: Path) -> dict[str, tuple[str, list[int]]]:
    return {name: (entry["dtype"], entry["shape"]) for path in checkpoint_files(folder)
            for name, entry in read_header(path)[0].items()}


def test_merged_checkpoint_gives_base_plus_adapter(conf_dir: Path, tmp_path: Path, capsys) -> None:
    base = conf_dir / "small_like"
    adapter, logits = _adapter(base, tmp_path / "adapter")
    assert main(["merge", "--model", str(base), "--adapter", str(adapter), "--out", str(tmp_path / "merged")]) == 0
    merged = tmp_path / "merged"
    assert _layout(merged) == _layout(base)
    assert {p.name for p in base.iterdir() if p.suffix != ".safetensors"} <= {p.name for p in merged.iterdir()}
    with torch.no_grad():
        torch.testing.assert_close(load_model(merged)(input_ids=IDS).logits, logits, atol=1e-4, rtol=1e-4)
    assert main(["merge", "--model", str(base), "--adapter", str(adapter), "--out", str(merged)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err


def test_merge_keeps_stored_dtypes_and_shards(conf_dir: Path, tmp_path: Path) -> None:
    """A bfloat16 checkpoint in several shards (routers in float32, as load_model keeps them) stays one."""
    source = conf_dir / "small_like"
    base = tmp_path / "bf16"
    save_model(load_model(source, dtype=torch.bfloat16), base, json.loads((source / "config.json").read_text()),
               max_shard_bytes=200_000)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "processor_config.json"):
        shutil.copyfile(source / name, base / name)
    assert len(checkpoint_files(base)) > 1
    adapter, _ = _adapter(base, tmp_path / "adapter")
    assert main(["merge", "--model", str(base), "--adapter", str(adapter), "--out", str(tmp_path / "merged")]) == 0
    assert _layout(tmp_path / "merged") == _layout(base)
    assert len(checkpoint_files(tmp_path / "merged")) > 1
    before = load_model(base, dtype=torch.bfloat16)
    after = load_model(tmp_path / "merged", dtype=torch.bfloat16)
    changed = {n for (n, a), (_, b) in zip(before.named_parameters(), after.named_parameters(), strict=True)
               if not torch.equal(a, b)}
    assert changed and all(n.endswith(("q_proj.weight", "kv_b_proj.weight", "experts.3.down_proj.weight",
                                       "up_proj.weight")) for n in changed)


def test_merge_refuses_a_mismatched_adapter(conf_dir: Path, tmp_path: Path, capsys) -> None:
    adapter, _ = _adapter(conf_dir / "small_like", tmp_path / "adapter")
    out = tmp_path / "merged"
    assert main(["merge", "--model", str(conf_dir / "base_like"), "--adapter", str(adapter), "--out", str(out)]) == 2
    assert "trained on another base model" in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())
