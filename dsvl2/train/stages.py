"""What each training stage trains, and the optimiser, schedule and MoE balance around it.

Stages (DeepSeek-VL2 paper, section 4, after a `vision` stage of our own for towers trained from scratch):
- `vision`: only the vision encoder and the projector learn, from per-patch labels of synthetic scenes
  (`dense.py`).
- `align`: only the vision-language adaptor learns (projector, image_newline, view_seperator);
  the vision encoder and the language model are frozen.
- `pretrain` and `sft`: every module learns.
Loss masking (our choice, the same in every stage): in conversation records the prompt, the
image tokens and the padding are out of the loss (`mask_prompt` true), so only answers are
learnt; a text record (`{"text": ...}`) keeps every token in the loss. A recipe can override
`data.mask_prompt`.

Never trained in any stage: `vision.attn_pool.*` (part of the checkpoint, never used by the
model, so it would never get a gradient) and `e_score_correction_bias` of `noaux_tc` gates,
which moves by the bias rule of `update_correction_bias`, not by gradients.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from dsvl2.language.moe import MoE
from dsvl2.model import DeepseekVL2
from dsvl2.train.recipe import MODULE_GROUPS, STAGES, OptimizerSection, ScheduleSection

STAGE_TRAINABLE = {"vision": ("vision", "projector"), "align": ("projector",), "pretrain": MODULE_GROUPS,
                   "sft": MODULE_GROUPS}
_PROJECTOR_NAMES = ("projector.", "image_newline", "view_seperator")


def module_group(name: str) -> str | None:
    """The module group (vision, projector, language) of a parameter; None if never trained."""
    if name.startswith("vision.attn_pool.") or name.endswith("e_score_correction_bias"):
        return None
    if name.startswith("vision."):
        return "vision"
    if name.startswith(_PROJECTOR_NAMES):
        return "projector"
    if name.startswith("language."):
        return "language"
    raise ValueError(f"parameter {name} belongs to no module group")


def trainable_groups(stage: str, freeze: Iterable[str] = ()) -> tuple[str, ...]:
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; expected one of {', '.join(STAGES)}")
    frozen = set(freeze)
    return tuple(g for g in STAGE_TRAINABLE[stage] if g not in frozen)


def configure_stage(model: DeepseekVL2, stage: str, freeze: Iterable[str] = ()
                    ) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Set `requires_grad` for the stage; return the trainable parameters by module group."""
    trainable = trainable_groups(stage, freeze)
    groups: dict[str, list[tuple[str, nn.Parameter]]] = {g: [] for g in trainable}
    for name, param in model.named_parameters():
        group = module_group(name)
        param.requires_grad_(group in trainable)
        if group in trainable:
            groups[group].append((name, param))
    return groups


def stage_mask_prompt(stage: str, override: bool | None = None) -> bool:
    """Whether prompts are masked from the loss: the recipe's choice, else true in every stage."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}")
    return True if override is None else override


# --------------------------------------------------------------------------------------------------
# Optimiser and schedule
# --------------------------------------------------------------------------------------------------


def build_optimizer(groups: dict[str, list[tuple[str, nn.Parameter]]], settings: OptimizerSection
                    ) -> torch.optim.AdamW:
    """AdamW with a learning rate per module group; matrices decay, vectors (norms, biases) do not."""
    param_groups = []
    for group, named in groups.items():
        lr = settings.module_lr.get(group, settings.lr)
        decay = [p for _, p in named if p.ndim >= 2]
        no_decay = [p for _, p in named if p.ndim < 2]
        for params, weight_decay, suffix in ((decay, settings.weight_decay, ""), (no_decay, 0.0, "_no_decay")):
            if params:
                param_groups.append({"params": params, "lr": lr, "weight_decay": weight_decay,
                                     "name": group + suffix})
    if not param_groups:
        raise ValueError("nothing to train: every parameter is frozen")
    return torch.optim.AdamW(param_groups, lr=settings.lr, betas=settings.betas, eps=settings.eps)


class WarmupCosine:
    """LR factor of scheduler step i (0-based): linear warmup to 1, then cosine to `min_ratio`.

    A class, not a closure, so `LambdaLR.state_dict()` saves it.
    """

    def __init__(self, warmup_steps: int, total_steps: int, min_ratio: float = 0.1, kind: str = "cosine") -> None:
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.min_ratio = min_ratio
        self.kind = kind

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps  # the first step already learns
        if self.kind == "constant":
            return 1.0
        span = max(1, self.total_steps - self.warmup_steps - 1)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, settings: ScheduleSection, total_steps: int
                    ) -> torch.optim.lr_scheduler.LambdaLR:
    factor = WarmupCosine(settings.warmup_steps, total_steps, settings.min_lr_ratio, settings.kind)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# --------------------------------------------------------------------------------------------------
# Activation checkpointing
# --------------------------------------------------------------------------------------------------


def _checkpointed(module: nn.Module, forward, *args, **kwargs):
    if module.training and torch.is_grad_enabled():
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return forward(*args, **kwargs)


def enable_activation_checkpointing(model: DeepseekVL2) -> None:
    """Recompute each decoder layer and each vision block in the backward pass instead of storing
    their activations. The vision encoder has no switch of its own, so its blocks' `forward` is
    wrapped here; parameter names do not change, so checkpoints are unaffected."""
    model.language.model.gradient_checkpointing = True
    for block in model.vision.blocks:
        if not getattr(block, "_dsvl2_checkpointed", False):
            block.forward = functools.partial(_checkpointed, block, block.forward)
            block._dsvl2_checkpointed = True


# --------------------------------------------------------------------------------------------------
# MoE balance
# --------------------------------------------------------------------------------------------------


def moe_layers(model: DeepseekVL2) -> list[MoE]:
    """The MoE modules in layer order (the order of `ModelOutput.expert_indices`)."""
    return [layer.mlp for layer in model.language.model.layers if isinstance(layer.mlp, MoE)]


def expert_counts(expert_indices: list[torch.Tensor], n_experts: int, token_mask: torch.Tensor | None = None
                  ) -> torch.Tensor:
    """Token-slots routed to each expert, [moe_layers, n_experts] float64; `token_mask` [B, T]
    leaves out padding (padding positions are routed too, but are no load of real data)."""
    if not expert_indices:
        return torch.zeros(0, n_experts, dtype=torch.float64)
    rows = []
    keep = token_mask.reshape(-1).bool() if token_mask is not None else None
    for indices in expert_indices:
        chosen = indices[keep.to(indices.device)] if keep is not None else indices
        rows.append(torch.bincount(chosen.reshape(-1), minlength=n_experts).to(torch.float64).cpu())
    return torch.stack(rows)


def correction_bias_deltas(counts: torch.Tensor, rate: float) -> torch.Tensor:
    """DeepSeek-V3's auxiliary-loss-free balance: bias += rate * sign(mean load - load)."""
    mean = counts.mean(dim=-1, keepdim=True)
    return rate * torch.sign(mean - counts)


def _add_to_parameter(param: torch.Tensor, delta: torch.Tensor) -> None:
    try:
        from torch.distributed.tensor import DTensor, distribute_tensor
    except ImportError:  # pragma: no cover - torch without DTensor
        DTensor = None  # noqa: N806
    delta = delta.to(device=param.device, dtype=param.dtype)
    if DTensor is not None and isinstance(param, DTensor):  # sharded by FSDP2: add each rank's own slice
        delta = distribute_tensor(delta, param.device_mesh, param.placements)
    with torch.no_grad():
        param.add_(delta)


def update_correction_bias(model: DeepseekVL2, counts: torch.Tensor, rate: float) -> int:
    """Move each noaux_tc gate's `e_score_correction_bias` towards balance; returns layers updated.

    `counts` [moe_layers, n_experts] must be the same on every rank (summed over ranks), so
    every replica takes the same step.
    """
    updated = 0
    for moe, layer_counts in zip(moe_layers(model), counts, strict=True):
        bias = moe.gate.e_score_correction_bias
        if bias is None:
            continue
        _add_to_parameter(bias, correction_bias_deltas(layer_counts, rate))
        updated += 1
    return updated


def keep_idle_experts_in_graph(model: DeepseekVL2) -> list[torch.utils.hooks.RemovableHandle]:
    """Put every routed expert in the autograd graph, even one that got no token.

    Data-parallel training needs every rank to produce a gradient for the same parameters
    (DDP without unused-parameter search, FSDP2's reduce-scatter), but an expert that no token
    of a rank chose is otherwise absent from that rank's graph. Running each expert on zero
    rows costs next to nothing and gives it a zero gradient. Returns the hook handles.
    """

    def hook(module: MoE, inputs: tuple, output: tuple) -> tuple:
        out, aux, indices = output
        empty = inputs[0].reshape(-1, inputs[0].shape[-1])[:0]
        zero = sum(expert(empty).sum() for expert in module.experts)
        return out + zero, aux, indices

    return [moe.register_forward_hook(hook) for moe in moe_layers(model)]
