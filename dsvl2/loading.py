"""The one place that decides where a model runs: its device and its dtype.

Every entry point (the CLI, the server, the evaluator, `Engine.from_pretrained`, the trainer) asks here,
so a default changes in one line.
"""

from __future__ import annotations

import torch

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
