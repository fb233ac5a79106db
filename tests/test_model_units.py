"""Unit checks of the model's pieces that the conformance fixtures do not isolate."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from dsvl2.checkpoint import load_model
from dsvl2.config import ConfigError, LanguageConfig, RopeScaling, model_config_from_dict
from dsvl2.engine.cache import KVCache
from dsvl2.language.attention import MultiHeadLatentAttention
from dsvl2.language.moe import MLP, route, run_experts
from dsvl2.language.rope import inverse_frequencies, rotary_cos_sin, yarn_mscale
from dsvl2.projector import pixel_shuffle


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


def test_greedy_route_picks_best_scores() -> None:
    scores = torch.tensor([[0.1, 0.5, 0.2, 0.9]])
    weights, idx = route(scores, 2, "greedy")
    assert sorted(idx[0].tolist()) == [1, 3]
    assert sorted(weights[0].tolist()) == pytest.approx([0.5, 0.9])


def test_run_experts_mixes_the_chosen_experts_for_one_token_and_for_many() -> None:
    torch.manual_seed(0)
    experts = torch.nn.ModuleList(MLP(8, 4) for _ in range(5))
    x = torch.randn(3, 8)
    indices = torch.tensor([[4, 1], [1, 2], [0, 4]])
    weights = torch.rand(3, 2)
    expected = torch.stack([sum(weights[n, j] * experts[int(indices[n, j])](x[n]) for j in range(2))
                            for n in range(3)])
    with torch.no_grad():
        together = run_experts(experts, x, weights, indices)
        alone = torch.cat([run_experts(experts, x[n:n + 1], weights[n:n + 1], indices[n:n + 1]) for n in range(3)])
    torch.testing.assert_close(together, expected)
    torch.testing.assert_close(alone, expected)


def test_group_limited_greedy_only_uses_best_groups() -> None:
    # groups of two experts: g0 = (0.30, 0.29), g1 = (0.31, 0.02), g2 = (0.05, 0.05)
    scores = torch.tensor([[0.30, 0.29, 0.31, 0.02, 0.05, 0.05]])
    _, idx = route(scores, 2, "group_limited_greedy", n_group=3, topk_group=1)
    assert sorted(idx[0].tolist()) == [2, 3]  # only group 1 survives: its best expert scores highest
    _, idx = route(scores, 2, "group_limited_greedy", n_group=3, topk_group=2)
    assert sorted(idx[0].tolist()) == [0, 2]


def test_noaux_tc_selects_with_bias_but_weights_without() -> None:
    scores = torch.tensor([[0.9, 0.8, 0.1, 0.2]])
    bias = torch.tensor([0.0, 0.0, 5.0, 0.0])
    weights, idx = route(scores, 2, "noaux_tc", n_group=2, topk_group=2, correction_bias=bias)
    chosen = dict(zip(idx[0].tolist(), weights[0].tolist(), strict=True))
    assert set(chosen) == {0, 2}  # expert 2 is chosen only because of its bias
    assert chosen[2] == pytest.approx(0.1)  # ...but weighted by its raw score
    # group ranking uses the sum of the two best corrected scores: group 1 = 5.1 + 0.2 beats 0.9 + 0.8
    _, idx = route(scores, 2, "noaux_tc", n_group=2, topk_group=1, correction_bias=bias)
    assert sorted(idx[0].tolist()) == [2, 3]


def test_pixel_shuffle_pads_and_orders_channel_major() -> None:
    grid = torch.arange(9, dtype=torch.float32).view(1, 9, 1)  # 3x3 grid, one channel
    out = pixel_shuffle(torch.cat([grid, 100 + grid], dim=-1), 2)
    assert out.shape == (1, 4, 8)
    # first 2x2 block: pixels 0,1,3,4 of channel 0, then of channel 1
    assert out[0, 0].tolist() == [0, 1, 3, 4, 100, 101, 103, 104]
    # bottom-right block holds pixel 8 and three zero pads
    assert out[0, 3].tolist() == [8, 0, 0, 0, 108, 0, 0, 0]


def _mla_config(**overrides) -> LanguageConfig:
    base = dict(hidden_size=64, num_attention_heads=4, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8,
                qk_nope_head_dim=8, v_head_dim=8, num_hidden_layers=1, vocab_size=32)
    return LanguageConfig(**{**base, **overrides})


def test_yarn_scales_softmax_and_rotary_magnitude() -> None:
    yarn = RopeScaling(type="yarn", factor=40.0, original_max_position_embeddings=4096, mscale=1.0,
                       mscale_all_dim=1.0)
    attn = MultiHeadLatentAttention(_mla_config(rope_scaling=yarn), 0)
    expected = (16**-0.5) * (0.1 * math.log(40.0) + 1.0) ** 2
    assert attn.scale == pytest.approx(expected)
    # mscale == mscale_all_dim: the cos/sin magnitude cancels to 1
    cos, sin = rotary_cos_sin(_mla_config(rope_scaling=yarn), torch.arange(5)[None])
    assert torch.allclose(cos**2 + sin**2, torch.ones_like(cos), atol=1e-5)
    assert yarn_mscale(1.0, 1.0) == 1.0


def test_linear_and_dynamic_rope_scaling() -> None:
    linear = _mla_config(rope_scaling=RopeScaling(type="linear", factor=4.0))
    plain = _mla_config()
    cos_l, _ = rotary_cos_sin(linear, torch.tensor([[8]]))
    cos_p, _ = rotary_cos_sin(plain, torch.tensor([[2]]))
    assert torch.allclose(cos_l, cos_p)  # position 8 / 4 == position 2
    dynamic = _mla_config(rope_scaling=RopeScaling(type="dynamic", factor=2.0), max_position_embeddings=16)
    short, _, _ = inverse_frequencies(dynamic, 16)
    long, _, _ = inverse_frequencies(dynamic, 64)
    assert torch.equal(short, inverse_frequencies(plain, 16)[0])
    assert (long[1:] < short[1:]).all()  # a longer sequence stretches the base


def test_sparse_config_takes_official_defaults() -> None:
    cfg = model_config_from_dict({"model_type": "deepseek_vl_v2", "language_config": {}, "vision_config": {},
                                  "projector_config": {"input_dim": 1024}})
    assert cfg.language.hidden_size == 4096 and cfg.language.kv_lora_rank == 512 and cfg.language.use_mla
    assert cfg.vision.patch_size == 16 and cfg.vision.width == 1024
    assert cfg.projector.projector_type == "downsample_mlp_gelu" and cfg.global_view_pos == "head"


@pytest.mark.parametrize(
    ("language", "message"),
    [
        ({"n_routed_experts": 8, "num_experts_per_tok": 2}, "official default 'gready'"),
        ({"n_routed_experts": 8, "num_experts_per_tok": 2, "topk_method": "noaux_tc", "n_group": 2,
          "topk_group": 1}, "needs scoring_func sigmoid"),
        ({"n_routed_experts": 8, "num_experts_per_tok": 9, "topk_method": "greedy"}, "num_experts_per_tok is 9"),
        ({"n_routed_experts": 6, "num_experts_per_tok": 2, "topk_method": "group_limited_greedy", "n_group": 4,
          "topk_group": 1}, "not divisible by n_group"),
        ({"use_mla": True, "kv_lora_rank": None}, "kv_lora_rank is not set"),
        ({"rope_scaling": {"type": "ntk", "factor": 2}}, "rope_scaling.type is 'ntk'"),
        ({"scoring_func": "relu"}, "scoring_func is 'relu'"),
    ],
)
def test_contradictory_language_configs_are_rejected(language: dict, message: str) -> None:
    raw = {"model_type": "deepseek_vl_v2", "language_config": language, "projector_config": {"input_dim": 1024}}
    with pytest.raises(ConfigError, match=message):
        model_config_from_dict(raw)


def test_projector_width_must_match_vision() -> None:
    with pytest.raises(ConfigError, match="input_dim 1152 differs from vision_config.width 1024"):
        model_config_from_dict({"model_type": "deepseek_vl_v2"})


def test_language_config_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        _mla_config().hidden_size = 3


def test_logits_mask_keeps_only_the_selected_positions(conf_dir) -> None:
    model = load_model(conf_dir / "tiny_like", dtype=torch.float32).eval()
    input_ids = torch.randint(10, 200, (2, 9), generator=torch.Generator().manual_seed(0))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :3] = 0  # left padding
    keep = torch.zeros_like(input_ids, dtype=torch.bool)
    keep[0, [2, 5]] = True
    keep[1, 8] = True
    with torch.no_grad():
        full = model(input_ids, attention_mask=attention_mask).logits
        some = model(input_ids, attention_mask=attention_mask, logits_mask=keep).logits
    assert some.shape == (3, full.shape[-1])
    torch.testing.assert_close(some, full[keep], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="logits_mask"):
        model(input_ids, labels=input_ids, logits_mask=keep)
