"""Rotary position tables and their scalings."""

from __future__ import annotations

import math

import pytest
import torch

from dsvl2.config import RopeScaling
from dsvl2.language.attention import MultiHeadLatentAttention
from dsvl2.language.rope import inverse_frequencies, rotary_cos_sin, yarn_mscale
from tests.language.configs import mla_config


def test_yarn_scales_softmax_and_rotary_magnitude() -> None:
    yarn = RopeScaling(type="yarn", factor=40.0, original_max_position_embeddings=4096, mscale=1.0,
                       mscale_all_dim=1.0)
    attn = MultiHeadLatentAttention(mla_config(rope_scaling=yarn), 0)
    expected = (16**-0.5) * (0.1 * math.log(40.0) + 1.0) ** 2
    assert attn.scale == pytest.approx(expected)
    # mscale == mscale_all_dim: the cos/sin magnitude cancels to 1
    cos, sin = rotary_cos_sin(mla_config(rope_scaling=yarn), torch.arange(5)[None])
    assert torch.allclose(cos**2 + sin**2, torch.ones_like(cos), atol=1e-5)
    assert yarn_mscale(1.0, 1.0) == 1.0


def test_linear_and_dynamic_rope_scaling() -> None:
    linear = mla_config(rope_scaling=RopeScaling(type="linear", factor=4.0))
    plain = mla_config()
    cos_l, _ = rotary_cos_sin(linear, torch.tensor([[8]]))
    cos_p, _ = rotary_cos_sin(plain, torch.tensor([[2]]))
    assert torch.allclose(cos_l, cos_p)  # position 8 / 4 == position 2
    dynamic = mla_config(rope_scaling=RopeScaling(type="dynamic", factor=2.0), max_position_embeddings=16)
    short, _, _ = inverse_frequencies(dynamic, 16)
    long, _, _ = inverse_frequencies(dynamic, 64)
    assert torch.equal(short, inverse_frequencies(plain, 16)[0])
    assert (long[1:] < short[1:]).all()  # a longer sequence stretches the base
