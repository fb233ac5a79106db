"""Trainer: what each stage trains, learning, exact resume, checkpoints that load and generate, MoE balance."""

from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from dsvl2.checkpoint import load_model
from dsvl2.engine.cache import KVCache
from dsvl2.model import DeepseekVL2
from dsvl2.processor import Processor
from dsvl2.train import checkpoints as checkpoints_module
from dsvl2.train.checkpoints import list_checkpoints
from dsvl2.train.errors import TrainError
from dsvl2.train.recipe import load_recipe, recipe_from_dict
from dsvl2.train.stages import WarmupCosine, correction_bias_deltas, expert_counts, moe_layers, update_correction_bias
from dsvl2.train.synthetic import generate_dataset
from dsvl2.train.trainer import Trainer, add_arguments, run
from tests.train.interrupt import crash_during_step

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """Small synthetic sets: vl/ (images, every visual task) and text/ (text facts)."""
    root = tmp_path_factory.mktemp("data")
    generate_dataset(root / "vl", 6, seed=3, tasks=["grounding", "ocr", "caption"])
    generate_dataset(root / "text", 12, seed=3, tasks=["text"])
    return root


def _recipe(conf_dir: Path, data_dir: Path, out: Path, variant: str = "tiny_like", **sections):
    raw = {
        "stage": "sft",
        "seed": 0,
        "model": {"checkpoint": str(conf_dir / variant)},
        "data": {"sources": [{"name": "vl", "paths": [str(data_dir / "vl")], "weight": 0.5},
                             {"name": "text", "paths": [str(data_dir / "text")], "weight": 0.5}],
                 "shuffle_buffer": 4},
        "optimizer": {"lr": 1e-3},
        "schedule": {"warmup_steps": 1},
        "training": {"steps": 2, "micro_batch_size": 2},
        "output": {"dir": str(out), "save_every": 100, "progress": False},
    }
    for key, value in sections.items():
        raw[key] = {**raw[key], **value} if isinstance(value, dict) else value
    return recipe_from_dict(raw, out.parent)


def _parameters(model: DeepseekVL2) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


# --------------------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("stage", "variant"), [("align", "base_like"), ("pretrain", "tiny_like"),
                                                ("sft", "small_like")])
def test_stage_changes_exactly_its_parameters(conf_dir: Path, data_dir: Path, tmp_path: Path, stage: str,
                                              variant: str) -> None:
    only_images = {"sources": [{"name": "vl", "paths": [str(data_dir / "vl")]}]}
    recipe = _recipe(conf_dir, data_dir, tmp_path / "out", variant, stage=stage, data=only_images)
    before = _parameters(load_model(conf_dir / variant))
    trainer = Trainer(recipe)
    trainer.train()
    changed = {n for n, p in trainer.model.named_parameters() if not torch.equal(p.detach(), before[n])}
    if stage == "align":
        expected = {n for n in before if n.startswith(("projector.", "image_newline", "view_seperator"))}
    else:  # everything but the pooling head the model never uses
        expected = {n for n in before if not n.startswith("vision.attn_pool.")}
    assert changed == expected
    if variant == "base_like":  # noaux_tc: the language model is frozen, so its routing bias stays too
        assert not any(n.endswith("e_score_correction_bias") for n in changed)


def test_freeze_option_keeps_a_group_fixed(conf_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    recipe = _recipe(conf_dir, data_dir, tmp_path / "out", training={"freeze": ["vision"], "steps": 1})
    before = _parameters(load_model(conf_dir / "tiny_like"))
    trainer = Trainer(recipe)
    trainer.train()
    changed = {n for n, p in trainer.model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert not any(n.startswith("vision.") for n in changed) and any(n.startswith("language.") for n in changed)


def test_module_learning_rates_and_schedule(conf_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    recipe = _recipe(conf_dir, data_dir, tmp_path / "out",
                     optimizer={"lr": 1e-3, "module_lr": {"vision": 1e-5, "projector": "2e-3"}},
                     schedule={"warmup_steps": 2, "min_lr_ratio": 0.1}, training={"steps": 6})
    trainer = Trainer(recipe)
    history = trainer.train(stop_at=4)
    lrs = [(r["lr"]["vision"], r["lr"]["projector"], r["lr"]["language_no_decay"]) for r in history]
    factors = [WarmupCosine(2, 6, 0.1)(i) for i in range(4)]
    for (vision, projector, language), factor in zip(lrs, factors, strict=True):
        assert vision == pytest.approx(1e-5 * factor) and projector == pytest.approx(2e-3 * factor)
        assert language == pytest.approx(1e-3 * factor)
    assert factors[:3] == [0.5, 1.0, 1.0] and WarmupCosine(2, 6, 0.1)(5) == pytest.approx(0.1)
    assert factors[3] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 3)))


# --------------------------------------------------------------------------------------------------
# Learning and loss
# --------------------------------------------------------------------------------------------------


def test_loss_falls_on_a_small_overfit_set(conf_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    visual = (data_dir / "vl" / "train.jsonl").read_text().splitlines()
    smallest = min(visual, key=lambda line: math.prod(json.loads(line)["image_size"]))  # the cheapest to run
    lines = [smallest, *(data_dir / "text" / "train.jsonl").read_text().splitlines()[:3]]
    small = tmp_path / "small"
    small.mkdir()
    (small / "train.jsonl").write_text("\n".join(lines) + "\n")
    (small / "images").symlink_to(data_dir / "vl" / "images")
    recipe = _recipe(conf_dir, data_dir, tmp_path / "out", "base_like",
                     data={"sources": [{"name": "four", "paths": [str(small)]}], "shuffle_buffer": 1},
                     optimizer={"lr": 5e-3, "weight_decay": 0.0}, schedule={"kind": "constant"},
                     training={"steps": 20, "micro_batch_size": 2, "grad_accum": 2})
    history = Trainer(recipe).train()
    assert all(r["samples"] == 4 and r["tokens"] > 421 for r in history)  # all four, the image included
    losses = [r["loss"] for r in history]
    assert losses[-1] < 0.25 * losses[0], losses
    assert max(losses[-3:]) < 1.5


def test_loss_is_the_token_mean_over_the_whole_global_batch(conf_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    """2 samples in one micro-batch or 1 sample in each of 2 accumulated micro-batches: the same
    step losses (the loss is normalised by the global token count, not averaged per micro-batch)."""
    common = {"data": {"shuffle_buffer": 1}, "optimizer": {"lr": 1e-3}}
    one = _recipe(conf_dir, data_dir, tmp_path / "one", "base_like", training={"steps": 3, "micro_batch_size": 2},
                  **common)
    two = _recipe(conf_dir, data_dir, tmp_path / "two", "base_like",
                  training={"steps": 3, "micro_batch_size": 1, "grad_accum": 2}, **common)
    first = Trainer(one).train()
    second = Trainer(two).train()
    assert [r["loss_tokens"] for r in first] == [r["loss_tokens"] for r in second]
    assert [r["loss"] for r in first] == pytest.approx([r["loss"] for r in second], abs=1e-5)
    # And step 1's loss is the model's own mean loss on those samples.
    trainer = Trainer(_recipe(conf_dir, data_dir, tmp_path / "three", "base_like", training={"steps": 1},
                              **common))
    batch = next(trainer.loader)
    model = load_model(conf_dir / "base_like")
    with torch.no_grad():
        reference = model(input_ids=batch.input_ids, images=batch.images, images_seq_mask=batch.images_seq_mask,
                          images_spatial_crop=batch.images_spatial_crop, attention_mask=batch.attention_mask,
                          labels=batch.labels).loss
    assert first[0]["loss"] == pytest.approx(float(reference), abs=1e-5)


def test_aux_loss_is_averaged_over_the_accumulated_micro_batches(conf_dir: Path, tmp_path: Path) -> None:
    """2 samples in one micro-batch or 1 in each of 2 accumulated ones, with the MoE balance loss (per sequence,
    seq_aux) on and strong: the same losses and weights, since each micro-batch's aux loss counts 1/2."""
    model = tmp_path / "aux_model"
    shutil.copytree(conf_dir / "tiny_like", model)
    config = json.loads((model / "config.json").read_text())
    config["language_config"].update(aux_loss_alpha=0.5, seq_aux=True)
    (model / "config.json").write_text(json.dumps(config))
    tokenizer = Processor.from_pretrained(model).tokenizer
    texts = [f"The number {n} is {word}." for n in range(10, 60) for word in ("odd", "even", "small")]
    length = len(tokenizer.encode(texts[0]))
    same = [text for text in texts if len(tokenizer.encode(text)) == length][:8]  # no padding in a micro-batch
    assert len(same) == 8
    (tmp_path / "text.jsonl").write_text("".join(json.dumps({"text": text}) + "\n" for text in same))
    data = {"sources": [{"name": "t", "paths": [str(tmp_path / "text.jsonl")]}], "shuffle_buffer": 1,
            "shuffle_shards": False}

    def train(name: str, micro_batch_size: int, grad_accum: int) -> list[dict]:
        recipe = _recipe(conf_dir, tmp_path, tmp_path / name, str(model), data=data,
                         training={"steps": 3, "micro_batch_size": micro_batch_size, "grad_accum": grad_accum})
        return Trainer(recipe).train()

    one, two = train("one", 2, 1), train("two", 1, 2)
    assert all(r["aux_loss"] > 0.01 for r in one)
    assert [r["aux_loss"] for r in two] == pytest.approx([r["aux_loss"] for r in one], abs=1e-6)
    # Counted twice (not divided by the 2 micro-batches), the balance loss moves the router further: 0.01-0.1.
    assert [r["loss"] for r in two] == pytest.approx([r["loss"] for r in one], abs=1e-5)


def test_activation_checkpointing_and_bfloat16(conf_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    def losses(name: str, **training) -> list[float]:
        recipe = _recipe(conf_dir, data_dir, tmp_path / name, "small_like", training={"steps": 2, **training})
        return [r["loss"] for r in Trainer(recipe).train()]

    plain = losses("plain")
    # Recomputing activations in the backward pass changes memory, not numbers.
    assert losses("checkpointed", activation_checkpointing=True) == pytest.approx(plain, abs=1e-6, rel=0)
    half = losses("bf16", dtype="bfloat16")
    assert half != plain and half == pytest.approx(plain, abs=0.05)


# --------------------------------------------------------------------------------------------------
# Resume and checkpoints
# --------------------------------------------------------------------------------------------------


def _write_yaml(path: Path, recipe_raw: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe_raw))
    return path



def test_resume_after_interruption_gives_the_same_losses(conf_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    raw = {
        "stage": "pretrain", "seed": 7,
        "model": {"checkpoint": str(conf_dir / "base_like")},
        "data": {"sources": [{"name": "vl", "paths": [str(data_dir / "vl")], "weight": 0.4},
                             {"name": "text", "paths": [str(data_dir / "text" / "train.jsonl")], "weight": 0.6}],
                 "shuffle_buffer": 5},
        "optimizer": {"lr": "2e-3"},
        "schedule": {"warmup_steps": 2},
        "training": {"steps": 6, "micro_batch_size": 1, "grad_accum": 2, "bias_update_rate": 0.01},
        "output": {"dir": "straight", "save_every": 2, "log_every": 1, "progress": False},
    }
    straight = Trainer(load_recipe(_write_yaml(tmp_path / "straight.yaml", raw))).train()
    raw["output"]["dir"] = "interrupted"
    path = _write_yaml(tmp_path / "interrupted.yaml", raw)
    first = crash_during_step(Trainer(load_recipe(path)), 4)  # between the checkpoints of steps 2 and 4
    with pytest.raises(KeyboardInterrupt):
        first.train()
    log = tmp_path / "interrupted" / "log.jsonl"
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2, 3]
    assert [c.name for _, c in list_checkpoints(tmp_path / "interrupted")] == ["checkpoint-0000002"]
    with pytest.raises(TrainError, match="pass --resume"):
        Trainer(load_recipe(path))
    second = Trainer(load_recipe(path), resume=True).train()  # trains step 3 again, then 4 to 6
    assert [r["step"] for r in first.history + second] == [1, 2, 3, 3, 4, 5, 6]
    logged = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in logged] == list(range(1, 7))  # every step exactly once: step 3 trimmed and redone
    assert [r["loss"] for r in logged] == pytest.approx([r["loss"] for r in straight], abs=1e-6, rel=0)
    assert [r["expert_load"] for r in logged] == [r["expert_load"] for r in straight]
    final_straight = load_model(tmp_path / "straight" / "checkpoint-0000006")
    final_resumed = load_model(tmp_path / "interrupted" / "checkpoint-0000006")
    for (name, a), (_, b) in zip(final_straight.named_parameters(), final_resumed.named_parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), name


def test_checkpoint_loads_and_generates(conf_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    trainer = Trainer(_recipe(conf_dir, data_dir, tmp_path / "out", "small_like"))
    trainer.train()
    folder = tmp_path / "out" / "checkpoint-0000002"
    assert {p.name for p in folder.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json",
                                                  "processor_config.json", "trainer_state.pt"}
    model = load_model(folder)
    for (name, saved), (_, trained) in zip(model.named_parameters(), trainer.model.named_parameters(), strict=True):
        assert torch.equal(saved, trained.detach()), name
    processor = Processor.from_pretrained(folder)
    conversation = [{"role": "user", "content": "<image>\nDescribe the image."}]
    sample = processor.encode(conversation, [data_dir / "vl" / "images" / "train-000000.png"])
    batch = processor.batch([sample])
    with torch.no_grad():
        embeds = model.embed_inputs(batch.input_ids, batch.images, batch.images_seq_mask, batch.images_spatial_crop)
        length = embeds.shape[1]
        cache = KVCache(model.cfg.language, max_slots=1, max_len=length + 8)
        slots = torch.tensor([0])
        logits = model.decode_step(embeds, torch.arange(length)[None], cache, slots)
        cached = []
        for step in range(5):
            token = int(logits[0, -1].argmax())
            cached.append(token)
            token_embed = model.language.model.embed_tokens(torch.tensor([[token]]))
            logits = model.decode_step(token_embed, torch.tensor([[length + step]]), cache, slots)
        ids = batch.input_ids
        recomputed = []
        for _ in range(5):  # the same greedy tokens by full forwards without a cache
            full = model(input_ids=ids, images=batch.images, images_seq_mask=torch.nn.functional.pad(
                batch.images_seq_mask, (0, ids.shape[1] - length)), images_spatial_crop=batch.images_spatial_crop)
            recomputed.append(int(full.logits[0, -1].argmax()))
            ids = torch.cat([ids, torch.tensor([[recomputed[-1]]])], dim=1)
    assert cached == recomputed


def test_crash_while_saving_keeps_the_last_good_checkpoint(conf_dir: Path, data_dir: Path, tmp_path: Path,
                                                           monkeypatch) -> None:
    recipe = _recipe(conf_dir, data_dir, tmp_path / "out", training={"steps": 4},
                     output={"save_every": 1, "keep_last": 2})
    real_save = checkpoints_module.save_model
    calls = []

    def crashing_save(model, folder, config):
        calls.append(folder)
        real_save(model, folder, config)
        if len(calls) == 3:
            with open(Path(folder) / "model.safetensors", "r+b") as handle:
                handle.truncate(100)  # half-written weights, then the process dies
            raise KeyboardInterrupt("killed while saving")

    monkeypatch.setattr(checkpoints_module, "save_model", crashing_save)
    with pytest.raises(KeyboardInterrupt):
        Trainer(recipe).train()
    out = tmp_path / "out"
    assert [c.name for _, c in list_checkpoints(out)] == ["checkpoint-0000001", "checkpoint-0000002"]
    assert (out / ".tmp-checkpoint-0000003").exists()  # the torn save never became a checkpoint
    load_model(out / "checkpoint-0000002")
    monkeypatch.setattr(checkpoints_module, "save_model", real_save)
    resumed = Trainer(recipe, resume=True)
    assert resumed.step == 2 and not (out / ".tmp-checkpoint-0000003").exists()
    resumed.train()
    assert [c.name for _, c in list_checkpoints(out)] == ["checkpoint-0000003", "checkpoint-0000004"]  # keep_last


# --------------------------------------------------------------------------------------------------
# MoE balance
# --------------------------------------------------------------------------------------------------


def test_noaux_bias_moves_toward_underloaded_experts(conf_dir: Path) -> None:
    model = load_model(conf_dir / "base_like")
    ids = torch.randint(0, 1000, (4, 64), generator=torch.Generator().manual_seed(0))

    def load() -> torch.Tensor:
        with torch.no_grad():
            return expert_counts(model(input_ids=ids).expert_indices, 8)

    counts = load()
    start = [m.gate.e_score_correction_bias.detach().clone() for m in moe_layers(model)]
    update_correction_bias(model, counts, 0.01)
    for layer, (moe, before) in enumerate(zip(moe_layers(model), start, strict=True)):
        step = moe.gate.e_score_correction_bias.detach() - before
        mean = counts[layer].mean()
        assert torch.allclose(step[counts[layer] < mean], torch.tensor(0.01))  # under-loaded: up
        assert torch.allclose(step[counts[layer] > mean], torch.tensor(-0.01))  # over-loaded: down
    imbalance = (counts.max(dim=1).values / counts.mean(dim=1)).max()
    for _ in range(30):
        update_correction_bias(model, load(), 0.01)
    balanced = load()
    assert (balanced.max(dim=1).values / balanced.mean(dim=1)).max() < 0.8 * imbalance
    assert torch.equal(correction_bias_deltas(torch.tensor([[1.0, 3.0, 2.0]]), 0.5), torch.tensor([[0.5, -0.5, 0.0]]))


def test_training_moves_noaux_bias_and_logs_expert_load(conf_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    recipe = _recipe(conf_dir, data_dir, tmp_path / "out", "base_like", stage="pretrain",
                     training={"steps": 1, "bias_update_rate": 0.5})
    trainer = Trainer(recipe)
    before = [m.gate.e_score_correction_bias.detach().clone() for m in moe_layers(trainer.model)]
    record = trainer.train()[0]
    load = torch.tensor(record["expert_load"])
    assert load.shape == (2, 8) and torch.allclose(load.sum(1), torch.ones(2, dtype=load.dtype))
    for moe, old, fractions in zip(moe_layers(trainer.model), before, load, strict=True):
        step = moe.gate.e_score_correction_bias.detach() - old
        expected = 0.5 * torch.sign(fractions.mean() - fractions).float()
        assert torch.allclose(step, expected)
    assert record["aux_loss"] == 0.0  # noaux_tc gates have no auxiliary loss


# --------------------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------------------


def test_command_line_trains_and_reports_bad_recipes(conf_dir: Path, data_dir: Path, tmp_path: Path,
                                                     capsys) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    recipe = {"stage": "align", "model": {"checkpoint": str(conf_dir / "tiny_like")},
              "data": {"sources": [{"name": "vl", "paths": ["data/vl"]}]},
              "training": {"steps": 1}, "output": {"dir": "runs/align", "progress": False}}
    (tmp_path / "data").symlink_to(data_dir)
    path = _write_yaml(tmp_path / "align.yaml", recipe)
    assert run(parser.parse_args([str(path)])) == 0
    assert (tmp_path / "runs" / "align" / "checkpoint-0000001" / "model.safetensors").is_file()
    assert run(parser.parse_args([str(path)])) == 2  # checkpoints exist and --resume is missing
    assert "pass --resume" in capsys.readouterr().err
    bad = _write_yaml(tmp_path / "bad.yaml", {**recipe, "stage": "warmup"})
    assert run(parser.parse_args([str(bad)])) == 2
    assert "stage is 'warmup'" in capsys.readouterr().err


