"""A run's folder: its checkpoints (written atomically, the last `keep_last` kept) and its log.

A checkpoint (`OUTPUT/checkpoint-NNNNNNN/`) has the layout `dsvl2` loads (config.json,
model.safetensors, tokenizer files, processor_config.json), or for an adapter run an adapter folder
(dsvl2.train.adapters), plus `trainer_state.pt`, whatever state the trainer needs to continue. It is
written to a temporary folder, synced to disk and renamed, so a crash while saving leaves the previous
one intact.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from dsvl2.checkpoint import save_model
from dsvl2.train.errors import TrainError

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.pt"
LOG_FILE = "log.jsonl"
PROCESSOR_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "processor_config.json")
_CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")


def list_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (those with a trainer state) in step order."""
    if not output_dir.is_dir():
        return []
    found = []
    for path in output_dir.iterdir():
        match = _CHECKPOINT_NAME.match(path.name)
        if match and path.is_dir() and (path / STATE_FILE).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(output_dir: Path) -> Path | None:
    checkpoints = list_checkpoints(output_dir)
    return checkpoints[-1][1] if checkpoints else None


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit_checkpoint(staging: Path, final: Path) -> None:
    """Make a fully written staging folder the checkpoint `final`, durably and atomically."""
    for file in staging.rglob("*"):
        if file.is_file():
            _fsync_path(file)
    _fsync_path(staging)
    old = final.with_name(f".old-{final.name}")
    if final.exists():  # only when a step is saved twice; the rename below is the atomic switch
        os.rename(final, old)
    os.rename(staging, final)
    _fsync_path(final.parent)
    if old.exists():
        shutil.rmtree(old)


def prune_checkpoints(output_dir: Path, keep_last: int) -> None:
    if keep_last <= 0:
        return
    for _, path in list_checkpoints(output_dir)[:-keep_last]:
        shutil.rmtree(path)


def remove_stale_staging(output_dir: Path) -> None:
    """Folders of saves that crashed before their rename."""
    if output_dir.is_dir():
        for path in output_dir.iterdir():
            if path.is_dir() and path.name.startswith((".tmp-", ".old-")):
                shutil.rmtree(path)


def truncate_log(path: Path, step: int) -> None:
    """Drop log records of steps after the checkpoint, which the resumed run trains again."""
    if not path.exists():
        return
    kept = [line for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def resumable_checkpoint(output_dir: Path, resume: bool) -> Path | None:
    """The checkpoint a run in `output_dir` continues from; an error if one exists and `resume` is off."""
    found = latest_checkpoint(output_dir)
    if found is not None and not resume:
        raise TrainError(f"{output_dir} already holds checkpoints (latest {found.name}); "
                         "pass --resume to continue, or choose another output.dir")
    if resume and found is None:
        logger.info("no checkpoint in %s: starting from step 0", output_dir)
    return found


def write_checkpoint(output_dir: Path, step: int, weights: Any, model_config: dict, processor_source: Path,
                     state: dict[str, Any], keep_last: int, writer: Callable[[Path], None] | None = None) -> Path:
    """Write `checkpoint-<step>` atomically: the weights in the released layout (anything with
    `named_parameters`; or whatever `writer(folder)` writes instead), the processor files of
    `processor_source`, and the training `state`."""
    final = output_dir / f"{CHECKPOINT_PREFIX}{step:07d}"
    staging = output_dir / f".tmp-{final.name}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    if writer is not None:
        writer(staging)
    else:
        save_model(weights, staging, model_config)
    for name in PROCESSOR_FILES:
        if (processor_source / name).is_file():
            shutil.copyfile(processor_source / name, staging / name)
    torch.save(state, staging / STATE_FILE)
    commit_checkpoint(staging, final)
    prune_checkpoints(output_dir, keep_last)
    return final


class NamedTensors:
    """A full state dict that `save_model` can write (it only calls `named_parameters`)."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def named_parameters(self) -> Iterator[tuple[str, torch.Tensor]]:
        return iter(self.tensors.items())
