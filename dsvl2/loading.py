"""The one boundary between a model folder on disk and a model in memory.

It decides which folder (an explicit one, or the bundled default model), checks that it is a
checkpoint folder, reads its configs once, and chooses the device and dtype; every entry point
(the CLI, the server, the evaluator, `Engine.from_pretrained`, the trainer) asks here, so a
default changes in one line.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dsvl2 import defaults
from dsvl2.checkpoint import load_model
from dsvl2.config import ModelFolder
from dsvl2.errors import InputError
from dsvl2.model import DeepseekVL2
from dsvl2.processor import Processor

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


def choose_dtype(setting: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """`None` or "auto": bfloat16 on a GPU, float32 on a CPU (where half-precision weights are an opt-in)."""
    if isinstance(setting, torch.dtype):
        return setting
    if setting in (None, "", "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
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


def load(
    source: str | Path | ModelFolder | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    progress: bool = False,
) -> tuple[DeepseekVL2, Processor]:
    """The model (in eval mode, on the chosen device and dtype) and processor of a checkpoint folder."""
    folder = model_folder(source)
    device = choose_device(device)
    # The processor first: a missing tokenizer file is reported before the weights are read.
    processor = Processor.from_pretrained(folder)
    model = load_model(folder, dtype=choose_dtype(dtype, device), device=device, progress=progress)
    return model, processor
