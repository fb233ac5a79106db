"""Adapter runs: only the adapter learns and is saved, the loss falls, a killed run resumes with equal losses,
and two torchrun processes (DDP, gloo) train like one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from dsvl2.adapters.lora import selection_of
from dsvl2.adapters.peft_format import CONFIG_FILE, WEIGHTS_FILE, load_adapter, read_adapter
from dsvl2.checkpoint import load_model
from dsvl2.train.checkpoints import list_checkpoints
from dsvl2.train.errors import TrainError
from dsvl2.train.recipe import RecipeError, load_recipe, recipe_from_dict
from dsvl2.train.trainer import Trainer
from tests.conformance_data import REPO
from tests.train.interrupt import crash_during_step

pytestmark = pytest.mark.usefixtures("one_thread")

ADAPTER = {"r": 4, "alpha": 16, "dropout": 0.1,
           "target_modules": ["q_proj", "kv_b_proj", "o_proj", "shared_experts.up_proj"]}


def _raw(conf_dir: Path, data: Path, out: str, steps: int = 6, **sections) -> dict:
    raw = {
        "stage": "sft", "seed": 3,
        "model": {"checkpoint": str(conf_dir / "small_like")},
        "data": {"sources": [{"name": "g", "paths": [str(data)]}], "shuffle_buffer": 4},
        "optimizer": {"lr": 1e-2, "weight_decay": 0.0},
        "schedule": {"kind": "constant"},
        "training": {"steps": steps, "micro_batch_size": 2},
        "output": {"dir": out, "save_every": 2, "log_every": 1, "progress": False},
        "adapter": ADAPTER,
    }
    for key, value in sections.items():
        raw[key] = {**raw[key], **value}
    return raw


def _write(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw))
    return path


def test_adapter_run_lowers_the_loss_and_saves_only_the_adapter(conf_dir: Path, grounding_dir: Path,
                                                                tmp_path: Path) -> None:
    recipe = load_recipe(_write(tmp_path / "r.yaml", _raw(conf_dir, grounding_dir, "out", steps=12,
                                                          output={"save_every": 100})))
    trainer = Trainer(recipe)
    base = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if not p.requires_grad}
    history = trainer.train()
    assert history[-1]["loss"] < 0.8 * history[0]["loss"]
    assert list(history[0]["lr"]) == ["adapter"]
    assert all(torch.equal(p, base[n]) for n, p in trainer.model.named_parameters() if n in base)  # base frozen
    folder = tmp_path / "out" / "checkpoint-0000012"
    assert not (folder / "model.safetensors").exists()
    assert {CONFIG_FILE, WEIGHTS_FILE, "trainer_state.pt"} <= {p.name for p in folder.iterdir()}
    state = torch.load(folder / "trainer_state.pt", weights_only=True)
    n_adapter = sum(1 for p in trainer.model.parameters() if p.requires_grad)
    assert len(state["optimizer"]["state"]) == n_adapter  # the optimiser holds the adapter alone
    # The checkpoint is an adapter folder: loaded onto the base, it gives the trained model's logits.
    model = load_model(conf_dir / "small_like")
    load_adapter(model, model.cfg, folder)
    ids = torch.arange(3, 19).view(2, 8)
    trainer.model.eval()
    with torch.no_grad(), selection_of(model).use("default"):
        torch.testing.assert_close(model(input_ids=ids).logits, trainer.model(input_ids=ids).logits)



def test_killed_adapter_run_resumes_with_equal_losses(conf_dir: Path, grounding_dir: Path, tmp_path: Path) -> None:
    straight_recipe = _write(tmp_path / "straight.yaml", _raw(conf_dir, grounding_dir, "straight"))
    straight = Trainer(load_recipe(straight_recipe)).train()
    path = _write(tmp_path / "killed.yaml", _raw(conf_dir, grounding_dir, "killed"))
    first = crash_during_step(Trainer(load_recipe(path)), 4)
    with pytest.raises(KeyboardInterrupt):
        first.train()
    assert [c.name for _, c in list_checkpoints(tmp_path / "killed")] == ["checkpoint-0000002"]
    with pytest.raises(TrainError, match="pass --resume"):
        Trainer(load_recipe(path))
    second = Trainer(load_recipe(path), resume=True).train()
    assert [r["step"] for r in second] == [3, 4, 5, 6]
    logged = [json.loads(line) for line in (tmp_path / "killed" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == list(range(1, 7))
    # dropout 0.1: equal losses need the RNG states restored too
    assert [r["loss"] for r in logged] == pytest.approx([r["loss"] for r in straight], abs=1e-6, rel=0)
    _, ours, _ = read_adapter(tmp_path / "killed" / "checkpoint-0000006")
    _, theirs, _ = read_adapter(tmp_path / "straight" / "checkpoint-0000006")
    assert ours.keys() == theirs.keys()
    assert all(torch.allclose(ours[k], theirs[k], atol=1e-6) for k in ours)


def test_resuming_with_another_adapter_is_refused(conf_dir: Path, grounding_dir: Path, tmp_path: Path) -> None:
    raw = _raw(conf_dir, grounding_dir, "out", steps=2)
    Trainer(load_recipe(_write(tmp_path / "a.yaml", raw))).train()
    raw["adapter"] = {**ADAPTER, "alpha": 8}
    with pytest.raises(TrainError, match=r"another adapter than the recipe's: lora_alpha 16.0 \(recipe: 8.0\)"):
        Trainer(load_recipe(_write(tmp_path / "a.yaml", raw)), resume=True)


def test_adapter_recipe_errors_name_the_key(conf_dir: Path, grounding_dir: Path, tmp_path: Path) -> None:
    def parse(**adapter) -> None:
        raw = _raw(conf_dir, grounding_dir, "out")
        raw["adapter"] = {**ADAPTER, **adapter}
        recipe_from_dict(raw, tmp_path)

    with pytest.raises(RecipeError, match="adapter: unknown key.*rank"):
        parse(rank=4)
    with pytest.raises(RecipeError, match="adapter: LoRA rank r must be >= 1"):
        parse(r=0)
    with pytest.raises(RecipeError, match="adapter.quantize is 'int3'"):
        parse(quantize="int3")
    with pytest.raises(RecipeError, match="needs training.dtype bfloat16"):
        parse(base_dtype="bfloat16")
    raw = _raw(conf_dir, grounding_dir, "out", training={"strategy": "fsdp"})
    with pytest.raises(RecipeError, match="fsdp does not take an adapter"):
        recipe_from_dict(raw, tmp_path)
    raw = _raw(conf_dir, grounding_dir, "out")
    raw["adapter"] = {**ADAPTER, "target_modules": ["q_proj", "wq"]}
    with pytest.raises(TrainError, match=r"\['wq'\] match no linear layer"):
        Trainer(recipe_from_dict(raw, tmp_path))


def test_bfloat16_base_with_activation_checkpointing_trains(conf_dir: Path, grounding_dir: Path,
                                                            tmp_path: Path) -> None:
    raw = _raw(conf_dir, grounding_dir, "out", steps=3, training={"dtype": "bfloat16",
                                                                  "activation_checkpointing": True})
    raw["adapter"] = {**ADAPTER, "base_dtype": "bfloat16"}
    trainer = Trainer(recipe_from_dict(raw, tmp_path))
    assert trainer.model.language.model.layers[0].mlp.gate_proj.weight.dtype == torch.bfloat16
    history = trainer.train()
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in history) and history[-1]["grad_norm"] > 0


def test_ddp_adapter_run_matches_one_process(conf_dir: Path, grounding_dir: Path, tmp_path: Path) -> None:
    """Two gloo processes with one micro-batch each = one process accumulating two (dropout off: each rank
    draws its own masks)."""
    adapter = {**ADAPTER, "dropout": 0.0, "target_modules": ["q_proj", "o_proj", "experts.0.up_proj"]}
    single = _raw(conf_dir, grounding_dir, "single", steps=3, training={"micro_batch_size": 1, "grad_accum": 2})
    single["adapter"] = adapter
    reference = [r["loss"] for r in Trainer(load_recipe(_write(tmp_path / "single.yaml", single))).train()]
    ddp = _raw(conf_dir, grounding_dir, "ddp", steps=3, training={"micro_batch_size": 1})
    ddp["adapter"] = adapter
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "dsvl2.train.trainer", str(_write(tmp_path / "ddp.yaml", ddp))]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "ddp" / "log.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in records] == pytest.approx(reference, abs=1e-5, rel=0)
    _, ours, _ = read_adapter(tmp_path / "ddp" / "checkpoint-0000003")
    _, theirs, _ = read_adapter(tmp_path / "single" / "checkpoint-0000003")
    assert all(torch.allclose(ours[k], theirs[k], atol=1e-5) for k in ours)
