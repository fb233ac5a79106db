"""The one boundary between a model folder on disk and a model in memory.

It decides which folder (an explicit one, or the bundled default model), checks that it is a
checkpoint folder, reads its configs once, and chooses the device and dtype; every entry point
(the CLI, the server, the evaluator, `Engine.from_pretrained`, the trainer) asks here, so a
default changes in one line.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from dsvl2 import defaults
from dsvl2.adapters.peft_format import load_adapter, read_adapter
from dsvl2.checkpoint import SAFETENSORS_DTYPES, checkpoint_files, checkpoint_scheme, load_model, read_header
from dsvl2.config import ModelFolder
from dsvl2.errors import InputError
from dsvl2.model import DeepseekVL2
from dsvl2.processor import Processor
from dsvl2.quant.memory import available_bytes, check_fits, engine_float32_layers, kv_cache_bytes
from dsvl2.quant.scheme import QUANTIZED_DTYPES, QuantScheme, parse_scheme, resolve_scheme

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class DeviceError(ValueError):
    """The requested device does not exist on this machine."""


def choose_device(setting: str | torch.device | None = None, local_rank: int = 0) -> torch.device:
    """`None` or "auto": this rank's GPU when CUDA is available, else the CPU. "cuda" means this rank's GPU."""
    if isinstance(setting, torch.device):
        return setting
    if setting in (None, "", "auto"):
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if setting.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError(f"device {setting} was asked for, but CUDA is not available on this machine")
    if setting == "cuda":
        return torch.device(f"cuda:{local_rank}")
    try:
        return torch.device(setting)
    except RuntimeError as exc:
        raise DeviceError(f"unknown device {setting!r}: use cpu, cuda or cuda:N") from exc


def choose_dtype(setting: str | torch.dtype | None, device: torch.device, stored: torch.dtype | None = None,
                 cpu_half: bool = False) -> torch.dtype:
    """`None` or "auto": bfloat16 on a GPU; on a CPU the checkpoint's `stored` 16-bit dtype when `cpu_half`
    (the engine's kernels compute it fast on this CPU, see dsvl2.engine.kernels), else float32."""
    if isinstance(setting, torch.dtype):
        return setting
    if setting in (None, "", "auto"):
        if device.type == "cuda":
            return torch.bfloat16
        return stored if cpu_half and stored in (torch.bfloat16, torch.float16) else torch.float32
    if setting not in DTYPES:
        raise DeviceError(f"unknown dtype {setting!r}: use one of {', '.join(DTYPES)}")
    return DTYPES[setting]


class ModelFolderError(InputError):
    """The model folder does not exist or is not a checkpoint folder."""


def resolve_model_dir(path: str | Path | None = None) -> Path:
    """`path`, or the bundled default model when none is given (no --model on a command line), checked to be
    a checkpoint folder; its weights and tokenizer files are checked by the loaders that read them."""
    if path is None:
        try:
            path = defaults.default_model_dir()
        except FileNotFoundError as exc:
            raise ModelFolderError(f"no --model given and {exc}") from None
    path = Path(path)
    if not path.is_dir():
        raise ModelFolderError(f"model directory {path} does not exist")
    if not (path / "config.json").is_file():
        raise ModelFolderError(f"{path} is not a checkpoint directory (no config.json)")
    return path


def model_folder(source: str | Path | ModelFolder | None = None) -> ModelFolder:
    """The checkpoint folder `resolve_model_dir` chooses, with its configs parsed (once)."""
    if isinstance(source, ModelFolder):
        return source
    return ModelFolder.read(resolve_model_dir(source))


def stored_dtype(folder: ModelFolder) -> torch.dtype | None:
    """The dtype holding most of a checkpoint's floating-point bytes, read from its safetensors headers (a
    quantized checkpoint's scales and mins left out: they are float32 whatever the model's dtype)."""
    quantized_suffixes = tuple(f".{suffix}" for suffix in QUANTIZED_DTYPES)
    totals: dict[torch.dtype, int] = {}
    for path in checkpoint_files(folder.path):
        entries, _ = read_header(path)
        for name, entry in entries.items():
            if name.endswith(quantized_suffixes):
                continue
            dtype = SAFETENSORS_DTYPES.get(entry["dtype"])
            if dtype is not None and dtype.is_floating_point:
                totals[dtype] = totals.get(dtype, 0) + entry["data_offsets"][1] - entry["data_offsets"][0]
    return max(totals, key=totals.__getitem__) if totals else None


def load(
    source: str | Path | ModelFolder | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    progress: bool = False,
    cpu_half: bool = False,
    quantize: str | QuantScheme | None = None,
    group_size: int | None = None,
    quantize_also: str | tuple[str, ...] | None = None,
    check_memory: bool = True,
    cache_slots: int = 0,
    cache_len: int | None = None,
    adapters: Mapping[str, str | Path] | None = None,
) -> tuple[DeepseekVL2, Processor]:
    """The model (in eval mode, on the chosen device and dtype) and processor of a checkpoint folder;
    `cpu_half`: an automatic dtype on a CPU keeps a 16-bit checkpoint's dtype (see `choose_dtype`).

    `quantize`: "int8" or "int4" quantizes the language model's linear layers as they are read (`group_size`:
    int4's, default 64; `quantize_also`: "lm_head", "vision" in int8 too, default the lm_head, "none" neither),
    "none" keeps floating point, None loads
    what the checkpoint holds (a quantized checkpoint loads quantized). `check_memory`: stop before reading any
    weight when the model (with a KV cache of `cache_slots` sequences of `cache_len` tokens, the model's context
    when None) needs more memory than the device has free (dsvl2.quant.memory).

    `adapters`: LoRA adapter folders in peft's layout by name, added over the one copy of the base weights
    (dsvl2.adapters); each is read before the base weights are, and checked against the model before it is added."""
    folder = model_folder(source)
    device = choose_device(device)
    asked = parse_scheme(quantize, group_size, quantize_also)
    # The processor first: a missing tokenizer file is reported before the weights are read.
    processor = Processor.from_pretrained(folder)
    stored = stored_dtype(folder) if cpu_half and device.type == "cpu" else None
    dtype = choose_dtype(dtype, device, stored, cpu_half)
    checkpoint = checkpoint_scheme(folder)
    scheme = resolve_scheme(asked, checkpoint)
    if check_memory:
        where = "the GPU" if device.type == "cuda" else "this machine"
        cache = kv_cache_bytes(folder.config.language, dtype, cache_slots, cache_len)
        check_fits(folder.config, dtype, scheme, available_bytes(device), cache, can_quantize=checkpoint is None,
                   where=where, float32_layers=engine_float32_layers(device, dtype))
    if adapters:
        for path in adapters.values():  # a bad adapter is reported before the weights are read
            read_adapter(path)
    model = load_model(folder, dtype=dtype, device=device, progress=progress, quantize=asked)
    for name, path in (adapters or {}).items():
        load_adapter(model, folder.config, path, name)
    return model, processor
