"""Rotary position embeddings with the linear, dynamic-NTK and YaRN scalings of DeepSeek-V2."""

from __future__ import annotations

import math

import torch

from dsvl2.config import LanguageConfig


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    if scale <= 1.0:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def _yarn_correction_dim(num_rotations: float, dim: int, base: float, max_pos: int) -> float:
    return (dim * math.log(max_pos / (num_rotations * 2 * math.pi))) / (2 * math.log(base))


def _yarn_inv_freq(cfg: LanguageConfig, dim: int) -> torch.Tensor:
    rs = cfg.rope_scaling
    exponents = torch.arange(0, dim, 2, dtype=torch.float32) / dim
    freq_extra = 1.0 / (cfg.rope_theta**exponents)
    freq_inter = 1.0 / (rs.factor * cfg.rope_theta**exponents)
    original = rs.original_max_position_embeddings
    low = max(math.floor(_yarn_correction_dim(rs.beta_fast, dim, cfg.rope_theta, original)), 0)
    high = min(math.ceil(_yarn_correction_dim(rs.beta_slow, dim, cfg.rope_theta, original)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extra_mask = 1.0 - ramp
    return freq_inter * (1 - extra_mask) + freq_extra * extra_mask


def inverse_frequencies(cfg: LanguageConfig, seq_len: int) -> tuple[torch.Tensor, float, float]:
    """(inv_freq, position divisor, cos/sin magnitude) for a sequence of `seq_len` positions."""
    dim = cfg.rope_dim
    rs = cfg.rope_scaling
    base = cfg.rope_theta
    if rs is not None and rs.type == "yarn":
        magnitude = yarn_mscale(rs.factor, rs.mscale) / yarn_mscale(rs.factor, rs.mscale_all_dim)
        return _yarn_inv_freq(cfg, dim), 1.0, magnitude
    if rs is not None and rs.type == "dynamic" and seq_len > cfg.max_position_embeddings:
        growth = rs.factor * seq_len / cfg.max_position_embeddings - (rs.factor - 1)
        base = base * growth ** (dim / (dim - 2))
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    divisor = rs.factor if rs is not None and rs.type == "linear" else 1.0
    return inv_freq, divisor, 1.0


def rotary_cos_sin(cfg: LanguageConfig, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape [B, T, rope_dim] in float32 for integer `positions` [B, T]."""
    inv_freq, divisor, magnitude = inverse_frequencies(cfg, int(positions.max()) + 1 if positions.numel() else 1)
    t = positions.to(torch.float32)
    if divisor != 1.0:
        t = t / divisor
    freqs = t[..., None] * inv_freq.to(positions.device)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos() * magnitude, emb.sin() * magnitude


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotate x [B, H, T, D] by cos/sin [B, T, D].

    MLA checkpoints store the rotary part interleaved (pairs (0,1), (2,3), ...): it is
    de-interleaved to (first half, second half) before the LLaMA-style rotation.
    """
    if interleaved:
        b, h, t, d = x.shape
        x = x.view(b, h, t, d // 2, 2).transpose(3, 4).reshape(b, h, t, d)
    cos = cos[:, None].to(x.dtype)
    sin = sin[:, None].to(x.dtype)
    return x * cos + rotate_half(x) * sin
