"""How much memory a model needs resident, from its config alone, and whether that fits this machine.

The count is arithmetic on the config (no model is built), so it runs before any weight is read and when the
command-line help is printed. It covers the weights in the load dtype and quantization (router parameters in
float32, int4's float16 scales and mins included), the KV cache when its size is known, and a fixed allowance for
the runtime.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

from dsvl2.config import LanguageConfig, ModelConfig, ProjectorConfig, VisionConfig
from dsvl2.errors import InputError
from dsvl2.machine import computes_natively
from dsvl2.quant.scheme import DEFAULT_GROUP_SIZE, QuantScheme, fit_group_size, parse_scheme

GB = 1e9
# PyTorch, the tokenizer and Python's own objects: what a loaded process holds besides its tensors.
RUNTIME_BYTES = int(0.6 * GB)


class MemoryFitError(InputError):
    """The model would not fit in the memory available; the message says how much it needs and what fits."""


@dataclass(frozen=True)
class Linear:
    """`count` linear layers of one shape; `name` is one of them (its path in DeepseekVL2), for the scheme."""

    name: str
    out_features: int
    in_features: int
    bias: bool
    count: int = 1


@dataclass(frozen=True)
class Inventory:
    """Every parameter of a model: its linear layers, other floating-point parameters (in the load dtype) and the
    router's parameters (float32 whatever the dtype)."""

    linears: list[Linear]
    other: int
    float32: int

    @property
    def parameters(self) -> int:
        return self.other + self.float32 + sum(
            lin.count * (lin.out_features * lin.in_features + (lin.out_features if lin.bias else 0))
            for lin in self.linears)


def _vision(cfg: VisionConfig) -> tuple[list[Linear], int]:
    w, mlp = cfg.width, cfg.mlp_dim
    blocks = cfg.num_blocks
    linears = [Linear("vision.blocks.0.attn.qkv", 3 * w, w, True, blocks),
               Linear("vision.blocks.0.attn.proj", w, w, True, blocks),
               Linear("vision.blocks.0.mlp.fc1", mlp, w, True, blocks),
               Linear("vision.blocks.0.mlp.fc2", w, mlp, True, blocks)]
    other = w * 3 * cfg.patch_size ** 2 + w + cfg.grid ** 2 * w + 4 * w * blocks + 2 * w
    if cfg.global_pool == "map":
        linears += [Linear("vision.attn_pool.q", w, w, True), Linear("vision.attn_pool.kv", 2 * w, w, True),
                    Linear("vision.attn_pool.proj", w, w, True), Linear("vision.attn_pool.mlp.fc1", mlp, w, True),
                    Linear("vision.attn_pool.mlp.fc2", w, mlp, True)]
        other += w + 2 * w
    return linears, other


def _projector(cfg: ProjectorConfig) -> list[Linear]:
    kind, n = cfg.projector_type, cfg.n_embed
    if kind == "identity":
        return []
    if kind == "linear":
        return [Linear("projector.layers", n, cfg.input_dim, True)]
    if kind == "mlp_gelu":
        return [Linear("projector.layers.0", n, cfg.input_dim, True)] + (
            [Linear("projector.layers.2", n, n, True, cfg.depth - 1)] if cfg.depth > 1 else [])
    hidden = n * cfg.mlp_ratio
    ratio = cfg.downsample_ratio
    middle = [Linear("projector.layers.2", hidden, hidden, True, cfg.depth - 2)] if cfg.depth > 2 else []
    return [Linear("projector.layers.0", hidden, cfg.input_dim * ratio * ratio, True), *middle,
            Linear(f"projector.layers.{2 * cfg.depth - 2}", n, hidden, True)]


def _attention(cfg: LanguageConfig, prefix: str) -> tuple[list[Linear], int]:
    d, h, bias = cfg.hidden_size, cfg.num_attention_heads, cfg.attention_bias
    if not cfg.use_mla:
        hd = cfg.head_dim
        kv = cfg.num_key_value_heads * hd
        return [Linear(f"{prefix}.q_proj", h * hd, d, bias), Linear(f"{prefix}.k_proj", kv, d, bias),
                Linear(f"{prefix}.v_proj", kv, d, bias), Linear(f"{prefix}.o_proj", d, h * hd, bias)], 0
    q_width = h * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim)
    rank = cfg.kv_lora_rank
    if cfg.q_lora_rank is None:
        linears, other = [Linear(f"{prefix}.q_proj", q_width, d, False)], 0
    else:
        linears = [Linear(f"{prefix}.q_a_proj", cfg.q_lora_rank, d, bias),
                   Linear(f"{prefix}.q_b_proj", q_width, cfg.q_lora_rank, False)]
        other = cfg.q_lora_rank
    linears += [Linear(f"{prefix}.kv_a_proj_with_mqa", rank + cfg.qk_rope_head_dim, d, bias),
                Linear(f"{prefix}.kv_b_proj", h * (cfg.qk_nope_head_dim + cfg.v_head_dim), rank, False),
                Linear(f"{prefix}.o_proj", d, h * cfg.v_head_dim, bias)]
    return linears, other + rank


def _mlp(prefix: str, hidden: int, intermediate: int, count: int = 1) -> list[Linear]:
    return [Linear(f"{prefix}.gate_proj", intermediate, hidden, False, count),
            Linear(f"{prefix}.up_proj", intermediate, hidden, False, count),
            Linear(f"{prefix}.down_proj", hidden, intermediate, False, count)]


def _language(cfg: LanguageConfig) -> tuple[list[Linear], int, int]:
    d = cfg.hidden_size
    linears: list[Linear] = []
    other = cfg.vocab_size * d + d  # embeddings, final norm
    float32 = 0
    for i in range(cfg.num_hidden_layers):
        prefix = f"language.model.layers.{i}"
        attention, norms = _attention(cfg, f"{prefix}.self_attn")
        linears += attention
        other += norms + 2 * d
        if cfg.is_moe_layer(i):
            mi = cfg.moe_intermediate_size
            linears += _mlp(f"{prefix}.mlp.experts.0", d, mi, cfg.n_routed_experts)
            if cfg.n_shared_experts:
                linears += _mlp(f"{prefix}.mlp.shared_experts", d, mi * cfg.n_shared_experts)
            float32 += cfg.n_routed_experts * d + (cfg.n_routed_experts if cfg.topk_method == "noaux_tc" else 0)
        else:
            linears += _mlp(f"{prefix}.mlp", d, cfg.intermediate_size)
    if not cfg.tie_word_embeddings:
        linears.append(Linear("language.lm_head", cfg.vocab_size, d, False))
    return linears, other, float32


def inventory(cfg: ModelConfig) -> Inventory:
    """Every parameter of a DeepseekVL2 of `cfg`, counted from the config."""
    vision, vision_other = _vision(cfg.vision)
    language, language_other, float32 = _language(cfg.language)
    return Inventory(vision + _projector(cfg.projector) + language,
                     vision_other + 2 * cfg.projector.n_embed + language_other, float32)


def settle(scheme: QuantScheme, cfg: ModelConfig) -> QuantScheme:
    """`scheme` with its int4 group size chosen for `cfg`'s layers, as loading would choose it."""
    linears = inventory(cfg).linears
    if cfg.language.tie_word_embeddings:
        linears = [lin for lin in linears if lin.name != "language.lm_head"]
    widths = {lin.name: lin.in_features for lin in linears if scheme.bits_for(lin.name) == 4}
    return fit_group_size(scheme, widths)


def weight_bytes(cfg: ModelConfig, dtype: torch.dtype, scheme: QuantScheme | None,
                 float32_layers: tuple[str, ...] = ()) -> int:
    """Bytes of the model's parameters in `dtype` with `scheme`'s layers quantized (scales and mins included);
    floating-point layers whose names end with one of `float32_layers` are held in float32 whatever `dtype`."""
    items = inventory(cfg)
    size = torch.empty(0, dtype=dtype).element_size()
    if scheme is not None:
        scheme = settle(scheme, cfg)
    total = items.other * size + items.float32 * 4
    for lin in items.linears:
        bits = None if scheme is None else scheme.bits_for(lin.name)
        if lin.name == "language.lm_head" and cfg.language.tie_word_embeddings:
            bits = None
        n, k = lin.out_features, lin.in_features
        if bits is None:
            weight = n * k * (4 if float32_layers and lin.name.endswith(float32_layers) else size)
        elif bits == 8:
            weight = n * k + 4 * n
        else:
            weight = n * k // 2 + 4 * n * (k // scheme.group_size)  # float16 scale and min per group
        total += lin.count * (weight + (n * size if lin.bias else 0))
    return total


def engine_float32_layers(device: torch.device, dtype: torch.dtype) -> tuple[str, ...]:
    """The floating-point layers the engine holds in float32 whatever `dtype` (for `weight_bytes`): kv_b_proj on a
    CPU without arithmetic of `dtype` (dsvl2.engine.kernels' attention part)."""
    return ("kv_b_proj",) if device.type == "cpu" and not computes_natively(dtype) else ()


def kv_cache_bytes(cfg: LanguageConfig, dtype: torch.dtype, slots: int, max_len: int | None) -> int:
    """The engine's KV cache for `slots` sequences of `max_len` tokens (the model's context when None)."""
    per_token = cfg.kv_lora_rank + cfg.qk_rope_head_dim if cfg.use_mla else 2 * cfg.num_key_value_heads * cfg.head_dim
    size = torch.empty(0, dtype=dtype).element_size()
    return per_token * size * cfg.num_hidden_layers * slots * (max_len or cfg.max_position_embeddings)


def resident_bytes(cfg: ModelConfig, dtype: torch.dtype, scheme: QuantScheme | None, reserve: int = 0,
                   float32_layers: tuple[str, ...] = ()) -> int:
    """What loading the model needs resident: its weights, `reserve` (e.g. the KV cache) and the runtime."""
    return weight_bytes(cfg, dtype, scheme, float32_layers) + reserve + RUNTIME_BYTES


def available_bytes(device: torch.device, meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """Free memory on `device`: the GPU's free memory, or the system's MemAvailable; None when unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_fits(cfg: ModelConfig, dtype: torch.dtype, scheme: QuantScheme | None, available: int | None,
               reserve: int = 0, can_quantize: bool = True, where: str = "this machine",
               float32_layers: tuple[str, ...] = ()) -> None:
    """Raise MemoryFitError when the model needs more than `available` bytes (None: unknown, no check), saying
    how much it needs, how much there is and which --quantize choice fits (`can_quantize`: the checkpoint is
    floating point, so a choice can be made; `float32_layers`: see `weight_bytes`)."""
    if available is None:
        return
    needed = resident_bytes(cfg, dtype, scheme, reserve, float32_layers)
    if needed <= available:
        return
    fits = []
    if can_quantize:
        for choice, option in (("int8", parse_scheme("int8")), ("int4", parse_scheme("int4"))):
            if scheme is not None and option.bits >= scheme.bits:
                continue
            size = resident_bytes(cfg, dtype, option, reserve, float32_layers)
            if size <= available:
                fits.append(f"--quantize {choice} (about {size / GB:.1f} GB)")
    advice = f"{' or '.join(fits)} fits" if fits else "no --quantize choice fits"
    quantized = f", {scheme.name}" if scheme is not None else ""
    raise MemoryFitError(
        f"the model needs about {needed / GB:.1f} GB ({_dtype_name(dtype)}{quantized}, KV cache and runtime "
        f"included) and {where} has {available / GB:.1f} GB available: {advice}; --no-memory-check loads anyway")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


RELEASED_CONFIGS = Path(__file__).resolve().parents[1] / "assets" / "released_configs"
RELEASED_NAMES = {"deepseek-vl2-tiny": "DeepSeek-VL2-Tiny", "deepseek-vl2-small": "DeepSeek-VL2-Small",
                  "deepseek-vl2": "DeepSeek-VL2"}


@cache
def released_memory_table() -> str:
    """One sentence for --help: the weights' memory of each released model with each --quantize choice."""
    from dsvl2.config import load_json, model_config_from_dict

    rows = []
    for stem, title in RELEASED_NAMES.items():
        path = RELEASED_CONFIGS / f"{stem}.json"
        if not path.is_file():
            continue
        cfg = model_config_from_dict(load_json(path))
        sizes = [weight_bytes(cfg, torch.bfloat16, scheme) / GB
                 for scheme in (None, parse_scheme("int8"), parse_scheme("int4", DEFAULT_GROUP_SIZE))]
        rows.append(f"{title} {' / '.join(f'{size:.1f}' for size in sizes)} GB")
    if not rows:
        return ""
    return (f"Weights in memory with none (bfloat16) / int8 / int4 (groups of {DEFAULT_GROUP_SIZE}): "
            + ", ".join(rows) + f"; plus the KV cache and about {RUNTIME_BYTES / GB:.1f} GB for the runtime.")
