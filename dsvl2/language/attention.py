"""Multi-head attention (`use_mla: false`) and Multi-head Latent Attention (`use_mla: true`).

Modules are stateless: a KV cache, when used, is passed in by the caller. MLA has two
named paths that compute the same function:
- expanded: the cached latent is expanded by `kv_b_proj` into per-head keys and values;
  cheapest for long query blocks (prefill).
- absorbed: `kv_b_proj` is folded into the query and the output, so attention runs in the
  latent space and keys/values are never materialised per head; cheapest for decoding.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from dsvl2.config import LanguageConfig
from dsvl2.language.norm import RMSNorm
from dsvl2.language.rope import apply_rotary, yarn_mscale


class AttentionCache(Protocol):
    """What attention needs from a KV cache (see `dsvl2.engine.cache`)."""

    def update(
        self, layer: int, slots: torch.Tensor, positions: torch.Tensor, new: tuple[torch.Tensor, ...], key_len: int
    ) -> tuple[torch.Tensor, ...]:
        """Store `new` entries ([B, T, ...]) of `layer` at (slots, positions) and return every
        entry of those slots for positions 0..key_len-1 as [B, key_len, ...]."""
        ...


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """Softmax attention over [B, H, T, D] queries; `mask` [B, 1, T, L] is True where allowed."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


class MultiHeadAttention(nn.Module):
    def __init__(self, cfg: LanguageConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.n_heads = cfg.num_attention_heads
        self.n_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=bias)
        # The dtype the attention products run in (None: the activations'); dsvl2.engine.kernels' attention part
        # sets float32 where the CPU has no 16-bit arithmetic.
        self.compute_dtype: torch.dtype | None = None

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor,
        cache: AttentionCache | None = None,
        slots: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        absorbed: bool = False,  # multi-head layers have no latent to absorb into
    ) -> torch.Tensor:
        b, t, _ = x.shape
        q, k = self.queries(x, rope), self.keys(x, rope).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_kv_heads, self.head_dim)
        if cache is not None:
            k, v = cache.update(self.layer, slots, positions, (k, v), mask.shape[-1])
        k, v = k.transpose(1, 2), v.transpose(1, 2)
        if self.n_kv_heads != self.n_heads:
            k = k.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
            v = v.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
        dtype = self.compute_dtype or q.dtype
        out = attend(q.to(dtype), k.to(dtype), v.to(dtype), mask, self.head_dim**-0.5).to(q.dtype)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))

    def queries(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Per-head rotated queries [B, H, T, head_dim]."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        return apply_rotary(q, *rope, interleaved=False)

    def keys(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Per-KV-head rotated keys [B, H_kv, T, head_dim]."""
        b, t, _ = x.shape
        k = self.k_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        return apply_rotary(k, *rope, interleaved=False)


class MultiHeadLatentAttention(nn.Module):
    def __init__(self, cfg: LanguageConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.n_heads = cfg.num_attention_heads
        self.nope_dim = cfg.qk_nope_head_dim
        self.rope_dim = cfg.qk_rope_head_dim
        self.v_dim = cfg.v_head_dim
        self.rank = cfg.kv_lora_rank
        self.q_lora_rank = cfg.q_lora_rank
        q_width = self.n_heads * (self.nope_dim + self.rope_dim)
        bias = cfg.attention_bias
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(cfg.hidden_size, q_width, bias=False)
        else:
            self.q_a_proj = nn.Linear(cfg.hidden_size, cfg.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, q_width, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(cfg.hidden_size, self.rank + self.rope_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(self.rank, cfg.rms_norm_eps)
        self.kv_b_proj = nn.Linear(self.rank, self.n_heads * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.v_dim, cfg.hidden_size, bias=bias)
        self.scale = (self.nope_dim + self.rope_dim) ** -0.5
        rs = cfg.rope_scaling
        if rs is not None and rs.type == "yarn" and rs.mscale_all_dim:
            self.scale *= yarn_mscale(rs.factor, rs.mscale_all_dim) ** 2

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor,
        cache: AttentionCache | None = None,
        slots: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        absorbed: bool = False,
    ) -> torch.Tensor:
        b, t, _ = x.shape
        q_nope, q_pe = self.queries(x, rope)
        latent, k_pe = self.latent(x, rope)
        if cache is not None:
            latent, k_pe = cache.update(self.layer, slots, positions, (latent, k_pe), mask.shape[-1])
        path = self.absorbed if absorbed else self.expanded
        out = path(q_nope, q_pe, latent, k_pe, mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))

    def queries(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-head queries [B, H, T, *]: the part without position and the rotary part."""
        b, t, _ = x.shape
        q = self.q_proj(x) if self.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(b, t, self.n_heads, self.nope_dim + self.rope_dim).transpose(1, 2)
        q_nope, q_pe = q.split([self.nope_dim, self.rope_dim], dim=-1)
        return q_nope, apply_rotary(q_pe, *rope, interleaved=True)

    def latent(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """What the cache holds per token: the normed latent [B, T, rank] and the shared rotary key [B, T, r]."""
        latent, k_pe = self.kv_a_proj_with_mqa(x).split([self.rank, self.rope_dim], dim=-1)
        return self.kv_a_layernorm(latent), apply_rotary(k_pe[:, None], *rope, interleaved=True)[:, 0]

    def kv_b_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """kv_b_proj's weight per head, split into its key half [H, nope_dim, rank] and value half [H, v_dim, rank]."""
        w = self.kv_b_proj.weight.view(self.n_heads, self.nope_dim + self.v_dim, self.rank)
        return w.split([self.nope_dim, self.v_dim], dim=1)

    def expanded(
        self, q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor, k_pe: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """Per-head keys and values from the latent [B, L, rank]; returns [B, H, T, v_dim]."""
        b, length, _ = latent.shape
        kv = self.kv_b_proj(latent).view(b, length, self.n_heads, self.nope_dim + self.v_dim).transpose(1, 2)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_pe[:, None].expand(-1, self.n_heads, -1, -1)], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1)
        return attend(q, k, v, mask, self.scale)

    def absorbed(
        self, q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor, k_pe: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """Attention in the latent space: kv_b_proj's key half is folded into the query and its
        value half applied after the weighted sum; returns [B, H, T, v_dim]."""
        w_k, w_v = self.kv_b_weights()
        dtype = q_nope.dtype
        # kv_b_proj may be held in a wider dtype than the activations (dsvl2.engine.kernels' attention part):
        # the products then run in the weight's dtype.
        q_nope, q_pe, latent, k_pe = (t.to(w_k.dtype) for t in (q_nope, q_pe, latent, k_pe))
        q_latent = torch.einsum("bhtd,hdr->bhtr", q_nope, w_k)
        scores = torch.einsum("bhtr,blr->bhtl", q_latent, latent) + torch.einsum("bhtd,bld->bhtl", q_pe, k_pe)
        scores = (scores.float() * self.scale).masked_fill(~mask, float("-inf"))
        probs = scores.softmax(dim=-1).to(latent.dtype)
        context = torch.einsum("bhtl,blr->bhtr", probs, latent)
        return torch.einsum("bhtr,hvr->bhtv", context, w_v).to(dtype)


def build_attention(cfg: LanguageConfig, layer: int) -> nn.Module:
    return MultiHeadLatentAttention(cfg, layer) if cfg.use_mla else MultiHeadAttention(cfg, layer)
