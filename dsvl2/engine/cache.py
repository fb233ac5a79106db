"""A preallocated KV cache: one buffer per layer and entry, indexed by [slot, position].

MLA layers store only the compressed latent (`kv_lora_rank`) and the shared rotary key
(`qk_rope_head_dim`) per token; multi-head layers store keys and values of every KV head.
A sequence owns one slot; its tokens are written at their own positions, so sequences of
different lengths decode together without padding.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

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
        self._slot_range: tuple[int, int] | None = None

    @property
    def nbytes(self) -> int:
        return sum(buf.numel() * buf.element_size() for layer in self.buffers for buf in layer)

    @contextmanager
    def slot_range(self, start: int, stop: int) -> Iterator[None]:
        """Within this block the caller's `slots` are exactly start..stop-1 in order, so reads are
        views of the buffers instead of gathered copies (decided once, not by inspecting `slots`
        in every layer, which would synchronise a GPU)."""
        self._slot_range = (start, stop)
        try:
            yield
        finally:
            self._slot_range = None

    def update(
        self, layer: int, slots: torch.Tensor, positions: torch.Tensor, new: tuple[torch.Tensor, ...], key_len: int
    ) -> tuple[torch.Tensor, ...]:
        if key_len > self.max_len:
            raise ValueError(f"sequence of {key_len} tokens exceeds the cache length {self.max_len}")
        bufs = self.buffers[layer]
        for buf, value in zip(bufs, new, strict=True):
            buf[slots[:, None], positions] = value.to(buf.dtype)
        if self._slot_range is not None:
            start, stop = self._slot_range
            return tuple(buf[start:stop, :key_len] for buf in bufs)
        if slots.numel() == 1:  # a view, no copy
            s = int(slots[0])
            return tuple(buf[s:s + 1, :key_len] for buf in bufs)
        return tuple(buf[slots, :key_len] for buf in bufs)
