"""Load and save DeepSeek-VL2 checkpoints in the Hugging Face layout (safetensors, single or sharded).

Loading builds the model on the meta device (no memory), checks every tensor name and shape
against the file headers before reading any data, then reads tensors one at a time straight
into their final storage. Files are read with plain `readinto` rather than memory-mapped, so the
pages of the file never count a second time against the process's memory.

With a quantization scheme (asked for, or the checkpoint's own `quantization_config`), the targeted linear layers
are installed quantized as their tensors arrive (dsvl2.quant.load): memory peaks near the quantized model's size.
"""

from __future__ import annotations

import contextlib
import json
import struct
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import torch
from safetensors.torch import save_file
from torch import nn

from dsvl2.config import ModelConfig, ModelFolder
from dsvl2.model import DeepseekVL2
from dsvl2.quant.load import QuantizingLoader, plan_targets
from dsvl2.quant.scheme import QuantizationError, QuantScheme, resolve_scheme, scheme_from_config

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
# Router parameters stay in float32 whatever dtype the model is loaded in.
FLOAT32_SUFFIXES = (".mlp.gate.weight", ".mlp.gate.e_score_correction_bias")


class CheckpointError(ValueError):
    """A checkpoint directory or file cannot be loaded; the message names the tensors or file."""


def checkpoint_files(model_dir: str | Path) -> list[Path]:
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [model_dir / name for name in sorted(set(weight_map.values()))]
    single = model_dir / "model.safetensors"
    if single.exists():
        return [single]
    raise CheckpointError(f"{model_dir} has neither model.safetensors nor model.safetensors.index.json")


def read_header(path: Path) -> tuple[dict, int]:
    """(tensor entries, byte offset of the data section) of a safetensors file, validated."""
    size = path.stat().st_size
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path} is truncated: {size} bytes, no header")
        (header_len,) = struct.unpack("<Q", raw)
        if header_len > size - 8:
            raise CheckpointError(f"{path} is truncated or corrupt: header of {header_len} bytes in a {size}-byte file")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{path} has an unreadable header: {exc}") from exc
    header.pop("__metadata__", None)
    data_start = 8 + header_len
    end = max((entry["data_offsets"][1] for entry in header.values()), default=0)
    if data_start + end > size:
        raise CheckpointError(f"{path} is truncated: tensors need {data_start + end} bytes, the file has {size}")
    return header, data_start


def _read_tensor(f, entry: dict, data_start: int, path: Path, name: str) -> torch.Tensor:
    if entry["dtype"] not in SAFETENSORS_DTYPES:
        raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {entry['dtype']}")
    tensor = torch.empty(entry["shape"], dtype=SAFETENSORS_DTYPES[entry["dtype"]])
    begin, end = entry["data_offsets"]
    buffer = tensor.reshape(-1).view(torch.uint8).numpy()
    if buffer.nbytes != end - begin:
        raise CheckpointError(f"{path}: tensor {name} has {end - begin} bytes for shape {entry['shape']}")
    f.seek(data_start + begin)
    if f.readinto(memoryview(buffer)) != buffer.nbytes:
        raise CheckpointError(f"{path}: tensor {name} is truncated")
    return tensor


def iter_tensors(files: list[Path], headers: dict[Path, tuple[dict, int]]) -> Iterator[tuple[str, torch.Tensor]]:
    for path in files:
        entries, data_start = headers[path]
        with path.open("rb", buffering=0) as f:
            for name, entry in entries.items():
                yield name, _read_tensor(f, entry, data_start, path, name)


def _describe(names: list[str], limit: int = 20) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" ... ({len(names) - limit} more)" if len(names) > limit else "")


def check_names_and_shapes(expected: dict[str, list[int]], found: dict[str, list[int]], tied: set[str],
                           wrong_dtypes: list[str] = ()) -> None:
    """Raise a CheckpointError naming every missing, unexpected or mis-shaped (or mis-typed) tensor."""
    missing = sorted(n for n in expected if n not in found and n not in tied)
    unexpected = sorted(n for n in found if n not in expected and n not in tied)
    wrong = sorted(
        f"{n} (checkpoint {found[n]}, model {expected[n]})"
        for n in expected if n in found and found[n] != expected[n]
    )
    problems = []
    if missing:
        problems.append(f"missing tensors: {_describe(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {_describe(unexpected)}")
    if wrong:
        problems.append(f"wrong shapes: {_describe(wrong)}")
    if wrong_dtypes:
        problems.append(f"wrong dtypes: {_describe(list(wrong_dtypes))}")
    if problems:
        raise CheckpointError("checkpoint does not match the config: " + "; ".join(problems))


def build_model(cfg: ModelConfig, device: str | torch.device = "meta") -> DeepseekVL2:
    skip = torch.device(device).type == "meta"
    with torch.device(device), (_skipped_init() if skip else contextlib.nullcontext()):
        return DeepseekVL2(cfg)


@contextlib.contextmanager
def _skipped_init() -> Iterator[None]:
    """torch.nn.init's functions as no-ops: meta tensors hold no values, and a meta normal_ would import
    torch._dynamo, whose modules then stay resident for the process's life."""
    names = [name for name in dir(nn.init) if name.endswith("_") and not name.startswith("_")]
    with mock.patch.multiple(nn.init, **{name: _unchanged for name in names}):
        yield


def _unchanged(tensor: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
    return tensor


def _set_parameter(model: nn.Module, name: str, value: torch.Tensor) -> None:
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    module._parameters[leaf] = nn.Parameter(value, requires_grad=module._parameters[leaf].requires_grad)


def checkpoint_scheme(folder: ModelFolder) -> QuantScheme | None:
    """The quantization a checkpoint was written with (its config.json's `quantization_config`), None if none."""
    return scheme_from_config(folder.raw_config.get("quantization_config"))


def load_model(
    source: str | Path | ModelFolder,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    progress: bool = False,
    quantize: QuantScheme | str | None = None,
) -> DeepseekVL2:
    """A DeepseekVL2 in `dtype` on `device` from a checkpoint directory (or its parsed `ModelFolder`), in eval
    mode. `quantize`: a QuantScheme to quantize the weights with as they are read, "none" for floating point
    only, None for what the checkpoint holds (a quantized checkpoint loads quantized)."""
    folder = source if isinstance(source, ModelFolder) else ModelFolder.read(source)
    cfg = folder.config
    stored = checkpoint_scheme(folder)
    scheme = resolve_scheme(quantize, stored)
    files = checkpoint_files(folder.path)
    headers = {path: read_header(path) for path in files}
    entries = {name: entry for found_entries, _ in headers.values() for name, entry in found_entries.items()}
    found = {name: entry["shape"] for name, entry in entries.items()}
    model = build_model(cfg)
    tied = {"language.lm_head.weight"} if cfg.language.tie_word_embeddings else set()
    loader = None
    if scheme is not None:
        try:
            scheme, targets = plan_targets(model, scheme)
        except QuantizationError as exc:
            raise (CheckpointError(f"{folder.path}: {exc}") if stored is not None else exc) from None
        loader = QuantizingLoader(model, targets, stored is not None, dtype, device)
    expected = loader.expected_shapes() if loader else {name: list(p.shape) for name, p in model.named_parameters()}
    wrong_dtypes = loader.dtype_problems({n: SAFETENSORS_DTYPES.get(e["dtype"]) for n, e in entries.items()}) \
        if loader else []
    check_names_and_shapes(expected, found, tied, wrong_dtypes)
    tensors = iter_tensors(files, headers)
    if progress:
        from tqdm import tqdm

        tensors = tqdm(tensors, total=len(found), desc="loading weights", unit="tensor")
    for name, tensor in tensors:
        if name in tied or (loader is not None and loader.take(name, tensor)):
            continue
        target = torch.float32 if name.endswith(FLOAT32_SUFFIXES) or not tensor.is_floating_point() else dtype
        _set_parameter(model, name, tensor.to(device=device, dtype=target))
    if loader is not None:
        loader.finish()
    if cfg.language.tie_word_embeddings:
        model.language.lm_head.weight = model.language.model.embed_tokens.weight
    return model.eval()


def save_model(model: DeepseekVL2, model_dir: str | Path, config: dict, max_shard_bytes: int | None = None) -> None:
    """Write `config.json` and the weights (sharded with an index above `max_shard_bytes`)."""
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    state = {n: p.detach().contiguous().cpu() for n, p in model.named_parameters()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if max_shard_bytes and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(model_dir / fname), metadata={"format": "pt"})
            weight_map.update({name: fname for name in shard})
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
                 "weight_map": weight_map}
        (model_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    (model_dir / "config.json").write_text(json.dumps(config, indent=1))
