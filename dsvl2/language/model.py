"""The DeepSeek-V2 / DeepSeekMoE decoder and its causal LM head (checkpoint prefix `language.`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from dsvl2.config import LanguageConfig
from dsvl2.language.attention import AttentionCache, build_attention
from dsvl2.language.moe import MLP, MoE
from dsvl2.language.norm import RMSNorm
from dsvl2.language.rope import rotary_cos_sin


@dataclass
class DecoderOutput:
    hidden: torch.Tensor
    aux_losses: list[torch.Tensor]
    expert_indices: list[torch.Tensor]  # per MoE layer, [B*T, k]: the trainer logs expert load from these


class LayerOutput(NamedTuple):
    hidden: torch.Tensor
    aux_loss: torch.Tensor | None  # MoE layers in training: the balance loss
    expert_indices: torch.Tensor | None  # MoE layers: the routed experts, [B*T, k]


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LanguageConfig, index: int) -> None:
        super().__init__()
        self.self_attn = build_attention(cfg, index)
        self.mlp = MoE(cfg) if cfg.is_moe_layer(index) else MLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor, **attn_kwargs
    ) -> LayerOutput:
        x = x + self.self_attn(self.input_layernorm(x), rope, mask, **attn_kwargs)
        h = self.post_attention_layernorm(x)
        if isinstance(self.mlp, MoE):
            out, aux, indices = self.mlp(h)
            return LayerOutput(x + out, aux, indices)
        return LayerOutput(x + self.mlp(h), None, None)


def causal_mask(positions: torch.Tensor, key_len: int, key_valid: torch.Tensor | None = None) -> torch.Tensor:
    """[B, 1, T, L] boolean mask: a query at position p sees keys 0..p (of its own sequence).

    With cached decoding, keys are indexed by position, so this one rule covers prefill,
    chunked prefill and batched decode of sequences with different lengths. `key_valid`
    [B, L] masks left padding when the keys are the sequence itself.
    """
    keys = torch.arange(key_len, device=positions.device)
    mask = keys[None, None, :] <= positions[:, :, None]
    if key_valid is not None:
        # Every query keeps itself so a padding row never has all keys masked (NaN).
        own = keys[None, None, :] == torch.arange(positions.shape[1], device=positions.device)[None, :, None]
        mask = (mask & key_valid[:, None, :].bool()) | own
    return mask[:, None]


class DeepseekV2Model(nn.Module):
    def __init__(self, cfg: LanguageConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.gradient_checkpointing = False

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor,
        cache: AttentionCache | None = None,
        slots: torch.Tensor | None = None,
        absorbed: bool = False,
        output_hidden_states: bool = False,
    ) -> tuple[DecoderOutput, list[torch.Tensor]]:
        rope = rotary_cos_sin(self.cfg, positions)
        x = inputs_embeds
        aux_losses, expert_indices, hidden_states = [], [], [x]
        attn_kwargs = dict(cache=cache, slots=slots, positions=positions, absorbed=absorbed)
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                x, aux, indices = checkpoint(layer, x, rope, mask, use_reentrant=False, **attn_kwargs)
            else:
                x, aux, indices = layer(x, rope, mask, **attn_kwargs)
            if aux is not None:
                aux_losses.append(aux)
            if indices is not None:
                expert_indices.append(indices)
            hidden_states.append(x)
        x = self.norm(x)
        hidden_states[-1] = x
        return DecoderOutput(x, aux_losses, expert_indices), (hidden_states if output_hidden_states else [])


class DeepseekV2ForCausalLM(nn.Module):
    def __init__(self, cfg: LanguageConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = DeepseekV2Model(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight


def shifted_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy; labels of -100 are ignored."""
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1), ignore_index=-100
    )
