"""A preallocated KV cache: one buffer per layer and entry, indexed by [slot, position].

MLA layers store only the compressed latent (`kv_lora_rank`) and the shared rotary key
(`qk_rope_head_dim`) per token; multi-head layers store keys and values of every KV head.
A sequence owns one slot; its tokens are written at their own positions, so sequences of
different lengths decode together without padding.
"""

from __future__ import annotations

import torch

from dsvl2.config import LanguageConfig


def entry_shapes(cfg: LanguageConfig) -> list[tuple[int, ...]]:
    """Per-token shapes of what one layer caches."""
    if cfg.use_mla:
        return [(cfg.kv_lora_rank,), (cfg.qk_rope_head_dim,)]
    return [(cfg.num_key_value_heads, cfg.head_dim)] * 2


def cache_bytes_per_token(cfg: LanguageConfig, dtype: torch.dtype) -> int:
    per_layer = sum(int(torch.Size(s).numel()) for s in entry_shapes(cfg))
    return per_layer * cfg.num_hidden_layers * torch.empty(0, dtype=dtype).element_size()


class KVCache:
    def __init__(
        self,
        cfg: LanguageConfig,
        max_slots: int,
        max_len: int,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> None:
        self.max_slots = max_slots
        self.max_len = max_len
        self.dtype = dtype
        self.buffers = [
            [torch.zeros(max_slots, max_len, *shape, dtype=dtype, device=device) for shape in entry_shapes(cfg)]
            for _ in range(cfg.num_hidden_layers)
        ]
        self.bytes_per_token = cache_bytes_per_token(cfg, dtype)

    def update(
        self, layer: int, slots: torch.Tensor, positions: torch.Tensor, new: tuple[torch.Tensor, ...], key_len: int
    ) -> tuple[torch.Tensor, ...]:
        if key_len > self.max_len:
            raise ValueError(f"sequence of {key_len} tokens exceeds the cache length {self.max_len}")
        bufs = self.buffers[layer]
        for buf, value in zip(bufs, new, strict=True):
            buf[slots[:, None], positions] = value.to(buf.dtype)
        if slots.numel() == 1:  # a view, no copy
            s = int(slots[0])
            return tuple(buf[s:s + 1, :key_len] for buf in bufs)
        return tuple(buf[slots, :key_len] for buf in bufs)
