"""config.json parsing: the official defaults and the contradictions refused."""

from __future__ import annotations

import dataclasses

import pytest

from dsvl2.config import ConfigError, model_config_from_dict
from tests.language.configs import mla_config


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
        mla_config().hidden_size = 3
