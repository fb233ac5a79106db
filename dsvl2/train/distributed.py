"""This process's place in a run: alone, or one rank of the process group that torchrun describes."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch
import torch.distributed as dist

from dsvl2.loading import DeviceError, choose_device
from dsvl2.train.errors import TrainError


@dataclasses.dataclass
class Distributed:
    """This process's place: one process (no process group), or one rank under torchrun."""

    rank: int
    world_size: int
    device: torch.device
    enabled: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            tensor = tensor.to(self.device)
            dist.all_reduce(tensor)
        return tensor.cpu()

    def gather(self, value: Any) -> list[Any]:
        """Every rank's `value`, in rank order, on every rank."""
        if not self.enabled:
            return [value]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, value)
        return out

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def setup_distributed(device_setting: str = "auto") -> Distributed:
    """Join the process group that torchrun describes in the environment; alone without one."""
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    local_rank = int(os.environ.get("LOCAL_RANK", 0)) if launched else 0
    try:
        device = choose_device(device_setting, local_rank)
    except DeviceError as exc:
        raise TrainError(f"training.device: {exc}") from exc
    if not launched:
        return Distributed(0, 1, device, enabled=False)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Distributed(dist.get_rank(), dist.get_world_size(), device, enabled=True)
