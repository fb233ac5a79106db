"""The box-attention loss's probes: the attention weights and per-head values a layer's forward applies."""

from __future__ import annotations

import pytest
import torch
from default_recipe.attention_probes import attention_log_probs, head_values

from dsvl2.checkpoint import load_model
from dsvl2.language.model import causal_mask
from dsvl2.language.rope import rotary_cos_sin


@pytest.mark.parametrize("variant", ["tiny_like", "small_like"])  # multi-head and latent attention
def test_attention_log_probs_are_the_weights_forward_applies(conf_dir, variant: str) -> None:
    model = load_model(conf_dir / variant)
    attention = model.language.model.layers[1].self_attn
    torch.manual_seed(0)
    x = torch.randn(2, 12, model.cfg.language.hidden_size)
    positions = torch.arange(12).expand(2, 12)
    valid = torch.ones(2, 12, dtype=torch.long)
    valid[1, 9:] = 0  # right padding in the second row
    mask = causal_mask(positions, 12, valid)
    rope = rotary_cos_sin(model.cfg.language, positions)
    with torch.no_grad():
        every = torch.arange(12)
        log_probs = torch.stack([attention_log_probs(attention, x[r:r + 1], (rope[0][r:r + 1], rope[1][r:r + 1]),
                                                               mask[r:r + 1], every) for r in range(2)])
        some = attention_log_probs(attention, x[1:], (rope[0][1:], rope[1][1:]), mask[1:], torch.tensor([10, 4]))
        expected = attention(x, rope, mask)
        values = torch.stack([head_values(attention, x[r:r + 1]) for r in range(2)])  # [2, H, 12, dv]
        mixed = (log_probs.exp() @ values).transpose(1, 2).reshape(2, 12, -1)
        rebuilt = attention.o_proj(mixed)
    assert log_probs.shape == (2, attention.n_heads, 12, 12)
    assert torch.allclose(log_probs.exp().sum(-1), torch.ones(2, attention.n_heads, 12), atol=1e-5)
    assert torch.isinf(log_probs[0, :, 3, 4:]).all()  # causal: nothing from the future
    assert torch.allclose(rebuilt, expected, atol=1e-5, rtol=1e-4)
    assert torch.allclose(some, log_probs[1][:, [10, 4]], atol=1e-6)


def test_probes_name_the_attention_they_cannot_read() -> None:
    with pytest.raises(TypeError, match="no attention probe for Linear"):
        attention_log_probs(torch.nn.Linear(2, 2), torch.zeros(1, 3, 2), (torch.zeros(1), torch.zeros(1)),
                            torch.ones(1, 1, 3, 3, dtype=torch.bool), torch.arange(3))
    with pytest.raises(TypeError, match="no attention probe for Linear"):
        head_values(torch.nn.Linear(2, 2), torch.zeros(1, 3, 2))
