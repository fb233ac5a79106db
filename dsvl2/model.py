"""DeepseekVL2: vision encoder + projector + DeepSeekMoE language model, joined at the image tokens."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from dsvl2.config import ModelConfig
from dsvl2.language.attention import AttentionCache
from dsvl2.language.model import DeepseekV2ForCausalLM, causal_mask, shifted_cross_entropy
from dsvl2.projector import Projector, layout_image_tokens
from dsvl2.vision.siglip import VisionTransformer


@dataclass
class ModelOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    hidden_states: list[torch.Tensor] = field(default_factory=list)
    expert_indices: list[torch.Tensor] = field(default_factory=list)


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Per-sequence positions of a left-padded batch, so each row matches the row alone."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def image_crops(images_spatial_crop: torch.Tensor) -> list[list[tuple[int, int]]]:
    """Per sample, the (num_width_tiles, num_height_tiles) of each image; zero rows are padding."""
    out = []
    for row in images_spatial_crop.tolist():
        crops = []
        for w, h in row:
            if w == 0 or h == 0:
                break
            crops.append((w, h))
        out.append(crops)
    return out


def batch_tiles(images: torch.Tensor, images_spatial_crop: torch.Tensor) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Every image's global + local tiles of a padded batch [B, max_tiles, 3, S, S], in order, and each
    image's (num_width_tiles, num_height_tiles)."""
    crops = image_crops(images_spatial_crop)
    per_sample = [sum(1 + w * h for w, h in c) for c in crops]
    tiles = torch.cat([images[b, :n] for b, n in enumerate(per_sample)])
    return tiles, [c for sample in crops for c in sample]


class DeepseekVL2(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.vision = VisionTransformer(cfg.vision)
        self.projector = Projector(cfg.projector)
        self.image_newline = nn.Parameter(torch.zeros(cfg.projector.n_embed))
        self.view_seperator = nn.Parameter(torch.zeros(cfg.projector.n_embed))  # sic: checkpoint spelling
        self.language = DeepseekV2ForCausalLM(cfg.language)

    def encode_tiles(self, tiles: torch.Tensor) -> torch.Tensor:
        """Normalised tiles [N, 3, S, S] -> projected tile embeddings [N, s*s, hidden]."""
        return self.projector(self.vision(tiles.to(self.vision.pos_embed.dtype)))

    def layout_image(self, tile_embeds: torch.Tensor, num_width_tiles: int, num_height_tiles: int) -> torch.Tensor:
        """One image's token embeddings [n_tokens, hidden] from its projected tiles [1 + w*h, s*s, hidden]."""
        return layout_image_tokens(tile_embeds, num_width_tiles, num_height_tiles, self.image_newline,
                                   self.view_seperator, self.cfg.global_view_pos)

    def image_embeddings(self, tiles: torch.Tensor, crops: list[tuple[int, int]]) -> list[torch.Tensor]:
        """Each image's token embeddings; `tiles` holds every image's global + local tiles in order."""
        tile_embeds = self.encode_tiles(tiles)
        out, start = [], 0
        for w, h in crops:
            n = 1 + w * h
            out.append(self.layout_image(tile_embeds[start:start + n], w, h))
            start += n
        return out

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Text token embeddings [..., hidden]."""
        return self.language.model.embed_tokens(input_ids)

    def embed_with_images(
        self, input_ids: torch.Tensor, images_seq_mask: torch.Tensor | None, images: list[torch.Tensor]
    ) -> torch.Tensor:
        """Token embeddings [B, T, D] with each image's token embeddings (`layout_image`) placed, in order,
        at the image-token positions of `images_seq_mask` [B, T]."""
        embeds = self.embed_tokens(input_ids)
        if not images:
            return embeds
        return merge_image_embeddings(embeds, images_seq_mask, torch.cat(images))

    def embed_inputs(
        self,
        input_ids: torch.Tensor,
        images: torch.Tensor | None = None,
        images_seq_mask: torch.Tensor | None = None,
        images_spatial_crop: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings [B, T, D] of a padded batch with its images' features at the image-token positions."""
        features: list[torch.Tensor] = []
        if images is not None and images_spatial_crop is not None and images_seq_mask is not None:
            tiles, crops = batch_tiles(images, images_spatial_crop)
            if crops:
                features = self.image_embeddings(tiles, crops)
        return self.embed_with_images(input_ids, images_seq_mask, features)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        images: torch.Tensor | None = None,
        images_seq_mask: torch.Tensor | None = None,
        images_spatial_crop: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        logits_mask: torch.Tensor | None = None,
    ) -> ModelOutput:
        """Full-sequence forward (training, scoring); generation goes through `decode_step`.

        `logits_mask` [B, T] (bool): logits only at those positions, as [N, V] in row-major order
        (training needs them only where a label follows, a small part of an image-heavy batch)."""
        if labels is not None and logits_mask is not None:
            raise ValueError("labels and logits_mask cannot be combined: the loss needs every position's logits")
        if inputs_embeds is None:
            inputs_embeds = self.embed_inputs(input_ids, images, images_seq_mask, images_spatial_crop)
        b, t, _ = inputs_embeds.shape
        if attention_mask is None:
            attention_mask = torch.ones(b, t, dtype=torch.long, device=inputs_embeds.device)
        positions = positions_from_mask(attention_mask)
        mask = causal_mask(torch.arange(t, device=inputs_embeds.device).expand(b, t), t, attention_mask)
        out, hidden = self.language.model(inputs_embeds, positions, mask, output_hidden_states=output_hidden_states)
        logits = self.language.lm_head(out.hidden if logits_mask is None else out.hidden[logits_mask])
        loss = shifted_cross_entropy(logits, labels) if labels is not None else None
        aux = torch.stack(out.aux_losses).sum() if out.aux_losses else None
        return ModelOutput(logits, loss, aux, hidden, out.expert_indices)

    def decode_step(
        self,
        inputs_embeds: torch.Tensor,
        positions: torch.Tensor,
        cache: AttentionCache,
        slots: torch.Tensor,
        absorbed: bool | None = None,
        last_only: bool = True,
    ) -> torch.Tensor:
        """Cached forward of a block of tokens per slot ([B, T] at `positions`); returns logits.

        The cache keys are indexed by position, so prefill, chunked prefill and batched decode of
        sequences of different lengths all use the causal rule `key position <= query position`.
        """
        key_len = int(positions.max()) + 1
        mask = causal_mask(positions, key_len)
        if absorbed is None:
            absorbed = inputs_embeds.shape[1] == 1
        out, _ = self.language.model(inputs_embeds, positions, mask, cache=cache, slots=slots, absorbed=absorbed)
        hidden = out.hidden[:, -1:] if last_only else out.hidden
        return self.language.lm_head(hidden)


@torch.no_grad()
def init_weights(model: DeepseekVL2, std: float = 0.02, seed: int | None = None) -> DeepseekVL2:
    """Fresh weights for training from scratch: normal(0, std) matrices and embeddings, zero biases,
    unit norms, zero MoE correction bias (the official initialiser's choices)."""
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    for name, param in model.named_parameters():
        if name.endswith("e_score_correction_bias") or name.endswith(".bias"):
            param.zero_()
        elif param.dim() == 1 and "norm" in name:
            param.fill_(1.0)
        else:
            values = torch.randn(param.shape, generator=generator) * std
            param.copy_(values.to(param.dtype))
    return model


def merge_image_embeddings(embeds: torch.Tensor, images_seq_mask: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """Place `features` [N, D] at the True positions of `images_seq_mask` [B, T], in order."""
    n_slots = int(images_seq_mask.sum())
    if n_slots != features.shape[0]:
        raise ValueError(
            f"the prompt has {n_slots} image-token positions but the images give {features.shape[0]} embeddings"
        )
    mask = images_seq_mask.bool()
    embeds = embeds.clone()
    embeds[mask] = features.to(embeds.dtype)
    return embeds
