"""`dsvl2 merge --model DIR --adapter DIR --out DIR`: a checkpoint with a LoRA adapter folded into its weights.

The merged checkpoint has the released layout: the same tensor names, each in the dtype the base
checkpoint stores it in, sharded like the base, with config.json and the tokenizer and processor files
copied. The base is read whole in its stored dtype (Tiny: 6.7 GB in bfloat16), and each adapted weight
is computed as W + scaling * B A in float32 before it is rounded back.
"""

from __future__ import annotations

import argparse
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch

from dsvl2.adapters.lora import AdapterError, merge_lora
from dsvl2.adapters.peft_format import load_adapter, read_adapter
from dsvl2.checkpoint import (
    SAFETENSORS_DTYPES,
    checkpoint_files,
    checkpoint_scheme,
    load_model,
    read_header,
    save_model,
)
from dsvl2.config import ModelFolder
from dsvl2.errors import InputError
from dsvl2.loading import model_folder

WEIGHT_NAMES = ("model.safetensors", "model.safetensors.index.json")


class _Tensors:
    """Named tensors `save_model` can write (it only calls `named_parameters`)."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def named_parameters(self) -> Iterator[tuple[str, torch.Tensor]]:
        return iter(self.tensors.items())


def _stored_layout(folder: ModelFolder) -> tuple[dict[str, torch.dtype], int | None]:
    """Each tensor's stored dtype, and the largest shard's size (None: one file)."""
    files = checkpoint_files(folder.path)
    dtypes = {}
    for path in files:
        entries, _ = read_header(path)
        dtypes.update({name: SAFETENSORS_DTYPES[entry["dtype"]] for name, entry in entries.items()})
    shard = max(path.stat().st_size for path in files) if len(files) > 1 else None
    return dtypes, shard


def merge_checkpoint(model_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path) -> Path:
    """Write `out_dir`: the checkpoint `model_dir` with the adapter `adapter_dir` merged into its weights."""
    folder = model_folder(model_dir)
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise InputError(f"{out_dir} exists and is not empty: choose a new --out folder")
    if out_dir.resolve() == folder.path.resolve():
        raise InputError("--out must not be the --model folder")
    if checkpoint_scheme(folder) is not None:
        raise AdapterError(f"{folder.path} is quantized: merge the adapter into the unquantized checkpoint (a "
                           "quantized weight cannot take the update exactly)")
    read_adapter(adapter_dir)  # a bad adapter folder is reported before the weights are read
    dtypes, shard = _stored_layout(folder)
    floating = [d for d in dtypes.values() if d.is_floating_point]
    model = load_model(folder, dtype=max(set(floating), key=floating.count) if floating else torch.float32)
    load_adapter(model, folder.config, adapter_dir)
    merge_lora(model)
    tensors = {name: param.detach().to(dtypes.get(name, param.dtype)) for name, param in model.named_parameters()}
    out_dir.mkdir(parents=True, exist_ok=True)
    save_model(_Tensors(tensors), out_dir, folder.raw_config, max_shard_bytes=shard)
    for path in folder.path.iterdir():
        if path.is_file() and path.name not in WEIGHT_NAMES and path.suffix != ".safetensors" \
                and not (out_dir / path.name).exists():
            shutil.copyfile(path, out_dir / path.name)
    return out_dir


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, default=None,
                        help="base checkpoint directory (default: the bundled default model)")
    parser.add_argument("--adapter", type=Path, required=True,
                        help="LoRA adapter folder in peft's format (adapter_config.json, adapter_model.safetensors)")
    parser.add_argument("--out", type=Path, required=True, help="new folder for the merged checkpoint")


def run(args: argparse.Namespace) -> int:
    from dsvl2.cli_common import guarded_run

    return guarded_run(_merge, args)


def _merge(args: argparse.Namespace) -> int:
    out = merge_checkpoint(args.model, args.adapter, args.out)
    print(f"merged {args.adapter} into {out}")
    return 0
