"""Frozen configuration dataclasses, parsed once from a checkpoint's JSON files.

The released `config.json` files are sparse: a field equal to the official default
is omitted, so every default below is the official one (see the conformance README).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A configuration file holds an unknown, missing or contradictory value."""


@dataclass(frozen=True)
class VisionConfig:
    model_name: str = "siglip_large_patch16_384"
    image_size: int = 384
    patch_size: int = 16
    width: int = 1024
    layers: int = 24
    heads: int = 16
    mlp_ratio: float = 4.0
    global_pool: str = "map"
    ignore_head: bool = True
    class_token: bool = False
    select_layer: int = -1

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def mlp_dim(self) -> int:
        return int(self.width * self.mlp_ratio)

    @property
    def num_blocks(self) -> int:
        """Blocks actually run: the official encoder truncates to `select_layer`."""
        if self.select_layer <= 0:
            return min(self.layers, self.layers + self.select_layer + 1)
        return min(self.layers, self.select_layer)


PROJECTOR_TYPES = ("identity", "linear", "mlp_gelu", "downsample_mlp_gelu")


@dataclass(frozen=True)
class ProjectorConfig:
    projector_type: str = "downsample_mlp_gelu"
    input_dim: int = 1152
    n_embed: int = 2048
    depth: int = 2
    mlp_ratio: int = 1
    downsample_ratio: int = 2
    token_pooling: bool = False


TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")
SCORING_FUNCS = ("softmax", "sigmoid")
ROPE_SCALING_TYPES = ("linear", "dynamic", "yarn")
IMAGE_TAG_POSITIONS = ("before", "after")


@dataclass(frozen=True)
class RopeScaling:
    type: str
    factor: float
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0


@dataclass(frozen=True)
class LanguageConfig:
    vocab_size: int = 102400
    hidden_size: int = 4096
    intermediate_size: int = 11008
    moe_intermediate_size: int = 1407
    num_hidden_layers: int = 30
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    n_shared_experts: int | None = None
    n_routed_experts: int | None = None
    routed_scaling_factor: float = 1.0
    kv_lora_rank: int | None = 512
    q_lora_rank: int | None = 1536
    qk_rope_head_dim: int = 64
    qk_nope_head_dim: int = 128
    v_head_dim: int = 128
    topk_method: str = "gready"  # sic: the official default; every MoE config sets it
    n_group: int | None = None
    topk_group: int | None = None
    num_experts_per_tok: int | None = None
    moe_layer_freq: int = 1
    first_k_dense_replace: int = 0
    norm_topk_prob: bool = False
    scoring_func: str = "softmax"
    aux_loss_alpha: float = 0.001
    seq_aux: bool = True
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    bos_token_id: int = 100000
    eos_token_id: int = 100001
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    attention_bias: bool = False
    use_mla: bool = True

    @property
    def is_moe(self) -> bool:
        return self.n_routed_experts is not None

    def is_moe_layer(self, index: int) -> bool:
        return self.is_moe and index >= self.first_k_dense_replace and index % self.moe_layer_freq == 0

    @property
    def head_dim(self) -> int:
        """Per-head query/key width: MLA splits it into a non-rotary and a rotary part."""
        if self.use_mla:
            return self.qk_nope_head_dim + self.qk_rope_head_dim
        return self.hidden_size // self.num_attention_heads

    @property
    def rope_dim(self) -> int:
        return self.qk_rope_head_dim if self.use_mla else self.head_dim


@dataclass(frozen=True)
class ModelConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    language: LanguageConfig = field(default_factory=LanguageConfig)
    candidate_resolutions: tuple[tuple[int, int], ...] = ((384, 384),)
    tile_tag: str = "2D"
    global_view_pos: str = "head"

    @property
    def patches_per_token_side(self) -> int:
        """The projector's pixel-shuffle ratio, or 1 for projectors that keep every patch."""
        return self.projector.downsample_ratio if self.projector.projector_type == "downsample_mlp_gelu" else 1


@dataclass(frozen=True)
class ProcessorConfig:
    candidate_resolutions: tuple[tuple[int, int], ...] = ((384, 384),)
    patch_size: int = 14
    downsample_ratio: int = 2
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    normalize: bool = True
    image_token: str = "<image>"
    pad_token: str = "<｜▁pad▁｜>"
    add_special_token: bool = False
    sft_format: str = "deepseek"
    mask_prompt: bool = True
    ignore_id: int = -100
    image_size: int = 384
    # Where a prompt given as text plus images gets its `<image>` tags: "before" the text (the released
    # checkpoints' format) or "after" it (the default model, trained with the question first).
    image_tag_position: str = "before"


def _build(cls: type, raw: dict[str, Any], convert: dict[str, Any] | None = None) -> Any:
    """Instantiate a dataclass from a dict. Keys it does not know (`auto_map`, `lm_head`, `torch_dtype`,
    ...) are ignored as the official code ignores them; values are validated by the callers."""
    names = {f.name for f in dataclasses.fields(cls)}
    convert = convert or {}
    kwargs = {
        key: convert[key](value) if key in convert and value is not None else value
        for key, value in raw.items() if key in names
    }
    return cls(**kwargs)


def _pairs(value: Any) -> tuple[tuple[int, int], ...]:
    return tuple((int(a), int(b)) for a, b in value)


def _rope_scaling(raw: dict[str, Any]) -> RopeScaling:
    kind = raw.get("type", raw.get("rope_type"))
    if kind not in ROPE_SCALING_TYPES:
        raise ConfigError(f"language_config.rope_scaling.type is {kind!r}; expected one of {ROPE_SCALING_TYPES}")
    if "factor" not in raw:
        raise ConfigError("language_config.rope_scaling needs a 'factor'")
    fields = {f.name for f in dataclasses.fields(RopeScaling)}
    return RopeScaling(type=kind, **{k: v for k, v in raw.items() if k in fields and k != "type"})


def _check_language(cfg: LanguageConfig) -> None:
    if cfg.use_mla:
        if not cfg.kv_lora_rank:
            raise ConfigError("language_config: use_mla is true but kv_lora_rank is not set")
        if cfg.qk_rope_head_dim <= 0 or cfg.qk_rope_head_dim % 2:
            raise ConfigError(f"language_config: qk_rope_head_dim must be even and > 0, got {cfg.qk_rope_head_dim}")
        if cfg.qk_nope_head_dim <= 0 or cfg.v_head_dim <= 0:
            raise ConfigError("language_config: MLA needs qk_nope_head_dim > 0 and v_head_dim > 0")
    elif cfg.hidden_size % cfg.num_attention_heads:
        raise ConfigError(
            f"language_config: hidden_size {cfg.hidden_size} is not divisible by "
            f"num_attention_heads {cfg.num_attention_heads}"
        )
    if not cfg.use_mla and cfg.num_attention_heads % cfg.num_key_value_heads:
        raise ConfigError("language_config: num_attention_heads must be a multiple of num_key_value_heads")
    if cfg.scoring_func not in SCORING_FUNCS:
        raise ConfigError(f"language_config.scoring_func is {cfg.scoring_func!r}; expected one of {SCORING_FUNCS}")
    if cfg.hidden_act != "silu":
        raise ConfigError(f"language_config.hidden_act is {cfg.hidden_act!r}; only 'silu' is supported")
    if not cfg.is_moe:
        return
    if cfg.topk_method not in TOPK_METHODS:
        raise ConfigError(
            f"language_config.topk_method is {cfg.topk_method!r}; expected one of {TOPK_METHODS}"
            + (" (the field is missing and the official default 'gready' is no method)"
               if cfg.topk_method == "gready" else "")
        )
    if not cfg.num_experts_per_tok or not 0 < cfg.num_experts_per_tok <= cfg.n_routed_experts:
        raise ConfigError(
            f"language_config.num_experts_per_tok is {cfg.num_experts_per_tok}; it must be in "
            f"1..n_routed_experts ({cfg.n_routed_experts})"
        )
    if cfg.topk_method == "noaux_tc" and cfg.scoring_func != "sigmoid":
        raise ConfigError("language_config: topk_method noaux_tc needs scoring_func sigmoid")
    if cfg.topk_method in ("group_limited_greedy", "noaux_tc"):
        if not cfg.n_group or not cfg.topk_group:
            raise ConfigError(f"language_config: topk_method {cfg.topk_method} needs n_group and topk_group")
        if cfg.n_routed_experts % cfg.n_group:
            raise ConfigError(
                f"language_config: n_routed_experts {cfg.n_routed_experts} is not divisible by n_group {cfg.n_group}"
            )
        if cfg.topk_group > cfg.n_group:
            raise ConfigError(f"language_config: topk_group {cfg.topk_group} > n_group {cfg.n_group}")
        if cfg.num_experts_per_tok > cfg.topk_group * cfg.n_routed_experts // cfg.n_group:
            raise ConfigError("language_config: num_experts_per_tok exceeds the experts of the selected groups")


def model_config_from_dict(raw: dict[str, Any]) -> ModelConfig:
    """Parse a Hugging Face DeepSeek-VL2 `config.json` dict."""
    if raw.get("model_type", "deepseek_vl_v2") != "deepseek_vl_v2":
        raise ConfigError(f"config.json: model_type is {raw.get('model_type')!r}, expected 'deepseek_vl_v2'")
    vision = _build(VisionConfig, raw.get("vision_config", {}))
    projector = _build(ProjectorConfig, raw.get("projector_config", {}))
    language = _build(LanguageConfig, raw.get("language_config", {}), convert={"rope_scaling": _rope_scaling})
    _check_language(language)
    if projector.projector_type not in PROJECTOR_TYPES:
        raise ConfigError(
            f"projector_config.projector_type is {projector.projector_type!r}; expected one of {PROJECTOR_TYPES}"
        )
    if projector.token_pooling:
        raise ConfigError("projector_config.token_pooling is not supported (no released model uses it)")
    if projector.input_dim != vision.width and projector.projector_type != "identity":
        raise ConfigError(
            f"projector_config.input_dim {projector.input_dim} differs from vision_config.width {vision.width}"
        )
    if vision.width % vision.heads:
        raise ConfigError(f"vision_config: width {vision.width} is not divisible by heads {vision.heads}")
    tile_tag = raw.get("tile_tag", "2D")
    if tile_tag != "2D":
        raise ConfigError(f"config.json: tile_tag is {tile_tag!r}; only '2D' is supported")
    global_view_pos = raw.get("global_view_pos", "head")
    if global_view_pos not in ("head", "tail"):
        raise ConfigError(f"config.json: global_view_pos is {global_view_pos!r}; expected 'head' or 'tail'")
    candidates = _pairs(raw.get("candidate_resolutions", [[384, 384]]))
    return ModelConfig(vision, projector, language, candidates, tile_tag, global_view_pos)


def processor_config_from_dict(raw: dict[str, Any], model: ModelConfig | None = None) -> ProcessorConfig:
    """Parse `processor_config.json`; the tile size, and the candidate resolutions it leaves out, come from
    the model's config when there is one."""
    convert = {
        "candidate_resolutions": _pairs,
        "image_mean": lambda v: tuple(float(x) for x in v),
        "image_std": lambda v: tuple(float(x) for x in v),
    }
    if model is not None:
        raw = {"image_size": model.vision.image_size, "candidate_resolutions": model.candidate_resolutions, **raw}
    cfg = _build(ProcessorConfig, raw, convert=convert)
    if cfg.sft_format != "deepseek":
        raise ConfigError(f"processor_config.sft_format is {cfg.sft_format!r}; only 'deepseek' is supported")
    if cfg.image_tag_position not in IMAGE_TAG_POSITIONS:
        raise ConfigError(f"processor_config.image_tag_position is {cfg.image_tag_position!r}; "
                          f"expected one of {IMAGE_TAG_POSITIONS}")
    return cfg


def load_json(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"{path} does not exist") from exc
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON: {exc}") from exc


def load_model_config(model_dir: str | Path) -> ModelConfig:
    return model_config_from_dict(load_json(Path(model_dir) / "config.json"))


def load_processor_config(model_dir: str | Path, model: ModelConfig | None = None) -> ProcessorConfig:
    """Processor settings of a folder (the official defaults without processor_config.json); `model` is its
    parsed config.json, read here when not given and present."""
    model_dir = Path(model_dir)
    if model is None and (model_dir / "config.json").is_file():
        model = load_model_config(model_dir)
    path = model_dir / "processor_config.json"
    return processor_config_from_dict(load_json(path) if path.is_file() else {}, model)


@dataclass(frozen=True)
class ModelFolder:
    """A checkpoint folder's configuration: config.json and processor_config.json, each read and parsed once."""

    path: Path
    raw_config: dict[str, Any]  # config.json as written, for tools that copy it into new checkpoints
    config: ModelConfig
    processor_config: ProcessorConfig

    @classmethod
    def read(cls, path: str | Path) -> ModelFolder:
        path = Path(path)
        raw = load_json(path / "config.json")
        config = model_config_from_dict(raw)
        return cls(path, raw, config, load_processor_config(path, config))


def to_dict(cfg: Any) -> dict[str, Any]:
    """A dataclass config back to a JSON-ready dict (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def model_config_to_dict(cfg: ModelConfig) -> dict[str, Any]:
    """The HF `config.json` dict of a config (full, not sparse), readable by `model_config_from_dict`."""
    language = to_dict(cfg.language)
    return {
        "architectures": ["DeepseekVLV2ForCausalLM"],
        "model_type": "deepseek_vl_v2",
        "tile_tag": cfg.tile_tag,
        "global_view_pos": cfg.global_view_pos,
        "candidate_resolutions": [list(c) for c in cfg.candidate_resolutions],
        "vision_config": {"model_type": "vision", **to_dict(cfg.vision)},
        "projector_config": {"model_type": "mlp_projector", **to_dict(cfg.projector)},
        "language_config": {"model_type": "deepseek_v2", **language},
    }
