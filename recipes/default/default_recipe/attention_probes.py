"""What an attention layer's heads look at, recomputed outside its forward for the box-attention loss.

Both functions take the layer's own inputs (captured by a forward hook) and its weights, so the model's
forward stays free of training-only outputs.
"""

from __future__ import annotations

import torch
from torch import nn

from dsvl2.language.attention import MultiHeadAttention, MultiHeadLatentAttention


def attention_log_probs(attention: nn.Module, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                        mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Log of the attention weights [H, Q, L] (float32) that `attention`'s forward gives the queries at
    `positions` of one sequence x [1, L, D] (rope and mask of that sequence; no cache)."""
    if isinstance(attention, MultiHeadLatentAttention):
        return _latent_log_probs(attention, x, rope, mask, positions)
    if not isinstance(attention, MultiHeadAttention):
        raise TypeError(f"no attention probe for {type(attention).__name__}")
    q = attention.queries(x[:, positions], (rope[0][:, positions], rope[1][:, positions]))
    k = attention.keys(x, rope).repeat_interleave(attention.n_heads // attention.n_kv_heads, dim=1)
    scores = torch.einsum("bhqd,bhld->bhql", q, k).float() * attention.head_dim**-0.5
    return scores.masked_fill(~mask[:, :, positions], float("-inf")).log_softmax(dim=-1)[0]


def _latent_log_probs(attention: MultiHeadLatentAttention, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                      mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """MLA's weights, scored in the latent space as its absorbed path, so no per-head keys are made."""
    q_nope, q_pe = attention.queries(x[:, positions], (rope[0][:, positions], rope[1][:, positions]))
    latent, k_pe = attention.latent(x, rope)
    w_k, _ = attention.kv_b_weights()
    q_latent = torch.einsum("bhqd,hdr->bhqr", q_nope, w_k)
    scores = torch.einsum("bhqr,blr->bhql", q_latent, latent) + torch.einsum("bhqd,bld->bhql", q_pe, k_pe)
    scores = (scores.float() * attention.scale).masked_fill(~mask[:, :, positions], float("-inf"))
    return scores.log_softmax(dim=-1)[0]


def head_values(attention: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Per-head values [H, L, dv] of one sequence x [1, L, D]: what each head's weights average."""
    if isinstance(attention, MultiHeadLatentAttention):
        latent = attention.kv_a_layernorm(attention.kv_a_proj_with_mqa(x[0])[:, : attention.rank])
        _, w_v = attention.kv_b_weights()
        return torch.einsum("lr,hvr->hlv", latent, w_v)
    if not isinstance(attention, MultiHeadAttention):
        raise TypeError(f"no attention probe for {type(attention).__name__}")
    v = attention.v_proj(x[0]).view(x.shape[1], attention.n_kv_heads, attention.head_dim).transpose(0, 1)
    return v.repeat_interleave(attention.n_heads // attention.n_kv_heads, dim=0)
