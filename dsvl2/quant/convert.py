"""Write a quantized copy of a floating-point checkpoint (`dsvl2 quantize`), one tensor at a time.

Targeted weights are replaced by their canonical quantized tensors (`<linear>.qweight`, `.scales`, `.mins`), every
other tensor is copied as stored, config.json gains `quantization_config` and the other files of the folder (the
processor's and tokenizer's) are copied. Memory holds one output shard at a time.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

from dsvl2.checkpoint import (
    build_model,
    check_names_and_shapes,
    checkpoint_files,
    checkpoint_scheme,
    iter_tensors,
    read_header,
)
from dsvl2.config import ModelFolder
from dsvl2.quant.linear import quantize_weight
from dsvl2.quant.load import plan_targets
from dsvl2.quant.scheme import QuantizationError, QuantScheme

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")


def quantize_checkpoint(folder: ModelFolder, out: Path, scheme: QuantScheme, max_shard_bytes: int = 2 * 10**9,
                        progress: Callable | None = None) -> QuantScheme:
    """Write `folder`'s checkpoint quantized with `scheme` to the new folder `out`; returns the scheme with its
    group size settled. `progress`: wraps the tensor iterator (tqdm-like) when given."""
    stored = checkpoint_scheme(folder)
    if stored is not None:
        raise QuantizationError(f"{folder.path} is already quantized ({stored.name}): quantize the floating-point "
                                "checkpoint it was made from")
    out = Path(out)
    if out.resolve() == folder.path.resolve():
        raise QuantizationError("--out must be another folder than --model")
    if out.exists() and any(out.iterdir()):
        raise QuantizationError(f"{out} exists and is not empty: choose a new folder")
    files = checkpoint_files(folder.path)
    headers = {path: read_header(path) for path in files}
    found = {name: entry["shape"] for entries, _ in headers.values() for name, entry in entries.items()}
    model = build_model(folder.config)
    tied = {"language.lm_head.weight"} if folder.config.language.tie_word_embeddings else set()
    check_names_and_shapes({name: list(p.shape) for name, p in model.named_parameters()}, found, tied)
    scheme, targets = plan_targets(model, scheme)
    del model
    out.mkdir(parents=True, exist_ok=True)
    tensors = iter_tensors(files, headers)
    if progress is not None:
        tensors = progress(tensors, total=len(found))
    writer = ShardWriter(out, max_shard_bytes)
    for name, tensor in tensors:
        layer, _, leaf = name.rpartition(".")
        target = targets.get(layer)
        if target is not None and leaf == "weight":
            for suffix, value in quantize_weight(tensor, target.bits, target.group_size).items():
                writer.add(f"{layer}.{suffix}", value)
        else:
            writer.add(name, tensor)
    writer.finish()
    config = {**folder.raw_config, "quantization_config": scheme.to_config()}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for path in sorted(folder.path.iterdir()):
        if path.is_file() and path.name != "config.json" and not _is_weight_file(path.name):
            shutil.copyfile(path, out / path.name)
    return scheme


def _is_weight_file(name: str) -> bool:
    return name in WEIGHT_FILES or (name.startswith("model-") and name.endswith(".safetensors"))


class ShardWriter:
    """safetensors shards of at most `max_bytes` each (a larger tensor gets a shard of its own), named as the
    Hugging Face layout names them, with an index when there is more than one."""

    def __init__(self, out: Path, max_bytes: int) -> None:
        self.out, self.max_bytes = out, max_bytes
        self.shard: dict[str, torch.Tensor] = {}
        self.size = 0
        self.written: list[tuple[Path, list[str]]] = []
        self.total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.shard and self.size + nbytes > self.max_bytes:
            self._flush()
        self.shard[name] = tensor.contiguous()
        self.size += nbytes
        self.total += nbytes

    def _flush(self) -> None:
        path = self.out / f"shard-{len(self.written):05d}.tmp"
        save_file(self.shard, str(path), metadata={"format": "pt"})
        self.written.append((path, list(self.shard)))
        self.shard, self.size = {}, 0

    def finish(self) -> None:
        if self.shard or not self.written:
            self._flush()
        if len(self.written) == 1:
            self.written[0][0].rename(self.out / "model.safetensors")
            return
        weight_map = {}
        for i, (path, names) in enumerate(self.written):
            final = f"model-{i + 1:05d}-of-{len(self.written):05d}.safetensors"
            path.rename(self.out / final)
            weight_map.update(dict.fromkeys(names, final))
        index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
        (self.out / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))

