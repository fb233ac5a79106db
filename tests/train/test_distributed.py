"""`torchrun --nproc_per_node 2` on the CPU (gloo): DDP and FSDP2 train like one process on the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from dsvl2.checkpoint import load_model
from dsvl2.train.data import MixtureStream, ShardStream, find_shards
from dsvl2.train.recipe import load_recipe
from dsvl2.train.synthetic import generate_dataset
from dsvl2.train.trainer import Trainer
from tests.conformance_data import REPO

STEPS = 3
SEED = 1
WEIGHTS = (0.3, 0.7)  # vl, text
SHUFFLE_BUFFER = 4


def _recipe(conf_dir: Path, data: Path, out: str, micro_batch_size: int, grad_accum: int, strategy: str) -> dict:
    return {
        "stage": "pretrain",
        "seed": SEED,
        "model": {"checkpoint": str(conf_dir / "base_like")},
        "data": {"sources": [{"name": "vl", "paths": [str(data / "vl")], "weight": WEIGHTS[0]},
                             {"name": "text", "paths": [str(data / "text")], "weight": WEIGHTS[1]}],
                 "shuffle_buffer": SHUFFLE_BUFFER},
        "optimizer": {"lr": 2e-3},
        "schedule": {"warmup_steps": 1},
        "training": {"steps": STEPS, "micro_batch_size": micro_batch_size, "grad_accum": grad_accum,
                     "strategy": strategy, "bias_update_rate": 0.01},
        "output": {"dir": out, "save_every": 100, "log_every": 1, "progress": False},
    }


def _write(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw))
    return path


def _torchrun(recipe_path: Path, log: Path, *options: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "dsvl2.train.trainer", str(recipe_path), *options]
    with open(log, "a") as handle:
        result = subprocess.run(command, cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT, timeout=300)
    assert result.returncode == 0, f"torchrun {recipe_path.name} {options} failed:\n{log.read_text()[-4000:]}"


def _some_rank_micro_batch_has_no_image(data: Path) -> bool:
    """Replays the recipe's mixture draws: chunks of 2 records go to rank 0, rank 1, rank 0, ..."""
    streams = [ShardStream("vl", find_shards([data / "vl"]), SEED, 0, SHUFFLE_BUFFER),
               ShardStream("text", find_shards([data / "text"]), SEED, 1, SHUFFLE_BUFFER)]
    mixture = MixtureStream(streams, WEIGHTS, seed=SEED)
    sources = [mixture.next().source for _ in range(4 * STEPS)]
    return any(sources[i:i + 2] == [1, 1] for i in range(0, len(sources), 2))


@pytest.mark.usefixtures("one_thread")
def test_ddp_and_fsdp2_match_one_process(conf_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    generate_dataset(data / "vl", 4, seed=2, tasks=["grounding", "caption"])
    generate_dataset(data / "text", 12, seed=2, tasks=["text"])
    # A rank with a text-only micro-batch must still give (zero) vision gradients for DDP and FSDP2.
    assert _some_rank_micro_batch_has_no_image(data)
    # One process, 2 samples x 2 accumulated micro-batches = the global batch of 2 ranks x 2 samples.
    single = load_recipe(_write(tmp_path / "single.yaml", _recipe(conf_dir, data, "single", 2, 2, "ddp")))
    reference = [r["loss"] for r in Trainer(single).train()]
    _torchrun(_write(tmp_path / "ddp.yaml", _recipe(conf_dir, data, "ddp", 2, 1, "ddp")), tmp_path / "ddp.log")
    # FSDP2 stops after step 2 and resumes: its sharded optimiser state must round-trip too.
    fsdp = _write(tmp_path / "fsdp.yaml", _recipe(conf_dir, data, "fsdp", 2, 1, "fsdp"))
    _torchrun(fsdp, tmp_path / "fsdp.log", "--stop-at", "2")
    _torchrun(fsdp, tmp_path / "fsdp.log", "--resume")
    for strategy in ("ddp", "fsdp"):
        records = [json.loads(line) for line in (tmp_path / strategy / "log.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records] == list(range(1, STEPS + 1))
        assert [r["samples"] for r in records] == [4] * STEPS
        assert [r["loss"] for r in records] == pytest.approx(reference, abs=1e-5, rel=0), strategy
        ours = load_model(tmp_path / strategy / f"checkpoint-{STEPS:07d}")
        theirs = load_model(tmp_path / "single" / f"checkpoint-{STEPS:07d}")
        for (name, a), (_, b) in zip(ours.named_parameters(), theirs.named_parameters(), strict=True):
            assert torch.allclose(a, b, atol=1e-5), f"{strategy}: {name}"
