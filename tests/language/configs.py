"""A small MLA language configuration for unit tests."""

from __future__ import annotations

from dsvl2.config import LanguageConfig


def mla_config(**overrides) -> LanguageConfig:
    base = dict(hidden_size=64, num_attention_heads=4, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8,
                qk_nope_head_dim=8, v_head_dim=8, num_hidden_layers=1, vocab_size=32)
    return LanguageConfig(**{**base, **overrides})
