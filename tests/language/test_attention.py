"""Multi-head Latent Attention's two paths, on the conformance checkpoints."""

from __future__ import annotations

import pytest
import torch

from dsvl2.checkpoint import load_model
from dsvl2.engine.cache import KVCache
from dsvl2.language.attention import MultiHeadLatentAttention


@pytest.mark.parametrize("variant", ["small_like", "base_like"])
def test_mla_absorbed_and_expanded_paths_agree(conf_dir, variant: str) -> None:
    model = load_model(conf_dir / variant)
    torch.manual_seed(0)
    ids = torch.randint(0, 900, (1, 40))
    embeds = model.language.model.embed_tokens(ids)
    results = {}
    for absorbed in (False, True):
        cache = KVCache(model.cfg.language, 1, 64)
        slots = torch.tensor([0])
        with torch.no_grad():
            model.decode_step(embeds[:, :30], torch.arange(30)[None], cache, slots, absorbed=False)
            # the remaining tokens one at a time through the path under test
            steps = [model.decode_step(embeds[:, i:i + 1], torch.tensor([[i]]), cache, slots, absorbed=absorbed)
                     for i in range(30, 40)]
        results[absorbed] = torch.cat(steps, dim=1)
    assert torch.allclose(results[True], results[False], atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        full = model(input_ids=ids).logits[:, 30:]
    assert torch.allclose(results[True], full, atol=1e-4, rtol=1e-4)


def test_absorbed_path_never_expands_per_head_keys(conf_dir) -> None:
    """The absorbed path must not call kv_b_proj (which would expand keys/values per head)."""
    model = load_model(conf_dir / "small_like")
    attn = model.language.model.layers[0].self_attn
    assert isinstance(attn, MultiHeadLatentAttention)
    calls = []
    handle = attn.kv_b_proj.register_forward_hook(lambda *a: calls.append(1))
    cache = KVCache(model.cfg.language, 1, 16)
    embeds = model.language.model.embed_tokens(torch.tensor([[5, 6, 7]]))
    with torch.no_grad():
        model.decode_step(embeds, torch.arange(3)[None], cache, torch.tensor([0]), absorbed=True)
    handle.remove()
    assert calls == []
