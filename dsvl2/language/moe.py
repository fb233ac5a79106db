"""DeepSeekMoE: dense SwiGLU MLP, one gate function for every routing variant, grouped experts."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsvl2.config import LanguageConfig


class MLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def route(
    scores: torch.Tensor,
    top_k: int,
    method: str,
    n_group: int | None = None,
    topk_group: int | None = None,
    correction_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose `top_k` experts per token from gate scores [N, E]; returns (weights, indices).

    greedy: the best scores. group_limited_greedy: only experts of the `topk_group` groups
    whose best expert scores highest. noaux_tc: selection on score + correction bias, a
    group ranked by the sum of its two best corrected scores, weights from the raw scores.
    """
    choice = scores if correction_bias is None else scores + correction_bias
    if method in ("group_limited_greedy", "noaux_tc"):
        grouped = choice.view(choice.shape[0], n_group, -1)
        if method == "noaux_tc":
            group_scores = grouped.topk(2, dim=-1).values.sum(-1)
        else:
            group_scores = grouped.amax(dim=-1)
        chosen = group_scores.topk(topk_group, dim=-1).indices
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, chosen, True)
        choice = grouped.masked_fill(~keep[..., None], 0.0).view_as(scores)
    indices = choice.topk(top_k, dim=-1).indices
    return scores.gather(1, indices), indices


def sequence_aux_loss(scores: torch.Tensor, indices: torch.Tensor, batch: int, alpha: float) -> torch.Tensor:
    """Sequence-level balance loss: alpha * mean over sequences of sum_e f_e * P_e.

    f_e = (token-slots routed to e) * E / (T * k), P_e = mean gate score of e over the T tokens.
    """
    n_experts = scores.shape[-1]
    per_seq = indices.view(batch, -1)
    seq_len = scores.shape[0] // batch
    counts = torch.zeros(batch, n_experts, device=scores.device, dtype=scores.dtype)
    counts.scatter_add_(1, per_seq, torch.ones_like(per_seq, dtype=scores.dtype))
    f = counts / (per_seq.shape[1] / n_experts)
    p = scores.view(batch, seq_len, n_experts).mean(dim=1)
    return (f * p).sum(dim=1).mean() * alpha


def token_aux_loss(scores: torch.Tensor, indices: torch.Tensor, alpha: float) -> torch.Tensor:
    """Batch-level balance loss (`seq_aux: false`)."""
    n_experts = scores.shape[-1]
    f = F.one_hot(indices.view(-1), n_experts).float().mean(0) * n_experts
    return (f * scores.mean(0)).sum() * alpha


class Gate(nn.Module):
    """Router. Parameters stay in float32: gates compute in float32 whatever the model dtype."""

    def __init__(self, cfg: LanguageConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        if cfg.topk_method == "noaux_tc":
            self.e_score_correction_bias = nn.Parameter(torch.zeros(cfg.n_routed_experts))
        else:
            self.e_score_correction_bias = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, D] -> (weights [N, k] float32, indices [N, k], scores [N, E] float32)."""
        cfg = self.cfg
        logits = F.linear(x.float(), self.weight.float())
        scores = logits.softmax(dim=-1) if cfg.scoring_func == "softmax" else logits.sigmoid()
        bias = None if self.e_score_correction_bias is None else self.e_score_correction_bias.detach().float()
        weights, indices = route(scores, cfg.num_experts_per_tok, cfg.topk_method, cfg.n_group, cfg.topk_group, bias)
        if cfg.num_experts_per_tok > 1 and cfg.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * cfg.routed_scaling_factor, indices, scores


def run_experts(
    experts: nn.ModuleList, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor
) -> torch.Tensor:
    """Grouped execution: token-slots sorted by expert, one call per active expert on its rows."""
    n, k = indices.shape
    flat = indices.view(-1)
    order = flat.argsort(stable=True)
    counts = torch.bincount(flat, minlength=len(experts)).tolist()
    rows = x[order // k]
    outputs = torch.empty(n * k, x.shape[-1], dtype=x.dtype, device=x.device)
    start = 0
    for expert_id, count in enumerate(counts):
        if count:
            outputs[order[start:start + count]] = experts[expert_id](rows[start:start + count]).to(outputs.dtype)
            start += count
    mixed = outputs.view(n, k, -1).float() * weights[..., None]
    return mixed.sum(dim=1).to(x.dtype)


class MoE(nn.Module):
    def __init__(self, cfg: LanguageConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.experts = nn.ModuleList(
            MLP(cfg.hidden_size, cfg.moe_intermediate_size) for _ in range(cfg.n_routed_experts)
        )
        self.gate = Gate(cfg)
        if cfg.n_shared_experts:
            self.shared_experts = MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts)
        else:
            self.shared_experts = None
        # A kernel running the routed and shared experts in one call (dsvl2.quant.experts attaches one to layers
        # it can run); None, or where it declines an input: the experts run as written below.
        self.fused = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """x [B, T, D] -> (output, auxiliary loss in training mode else None, expert indices [B*T, k])."""
        b, t, d = x.shape
        flat = x.reshape(-1, d)
        weights, indices, scores = self.gate(flat)
        if self.fused is not None and self.fused.applies(flat):
            out = self.fused(flat, weights, indices).view(b, t, d)
        else:
            out = run_experts(self.experts, flat, weights, indices).view(b, t, d)
            if self.shared_experts is not None:
                out = out + self.shared_experts(x)
        aux = None
        if self.training and self.cfg.aux_loss_alpha > 0 and self.cfg.topk_method != "noaux_tc":
            if self.cfg.seq_aux:
                aux = sequence_aux_loss(scores, indices, b, self.cfg.aux_loss_alpha)
            else:
                aux = token_aux_loss(scores, indices, self.cfg.aux_loss_alpha)
        return out, aux, indices
