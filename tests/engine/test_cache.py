"""The preallocated KV cache: MLA keeps one latent (and the rotary key) per token, MHA keys and values."""

from __future__ import annotations

import pytest
import torch

from dsvl2.engine.cache import KVCache
from tests.engine.test_generate import VARIANTS, model_and_processor

pytestmark = pytest.mark.skipif(not VARIANTS, reason="conformance fixtures not found")


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cache_bytes_per_token(variant: str, dtype: torch.dtype) -> None:
    cfg = model_and_processor(variant)[0].cfg.language
    size = torch.finfo(dtype).bits // 8
    if cfg.use_mla:
        expected = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * cfg.num_hidden_layers * size
    else:
        head_dim = cfg.hidden_size // cfg.num_attention_heads
        expected = 2 * cfg.num_key_value_heads * head_dim * cfg.num_hidden_layers * size
    cache = KVCache(cfg, 3, 10, dtype=dtype)
    assert cache.bytes_per_token == expected
    assert cache.nbytes == expected * 3 * 10
