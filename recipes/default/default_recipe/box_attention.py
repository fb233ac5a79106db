"""Box attention: an extension that pulls chosen attention heads onto the region a box answer names.

While an answer writes `<|det|>[[x1,y1,x2,y2]]<|/det|>`, the positions that predict the box's tokens
should look at the image tokens inside that box: trained on the next-token loss alone, the small default
model's heads barely looked at the object its box named. The loss is -log(attention mass of the chosen
heads on those tokens), averaged over the positions and heads, for answers with one box about a
conversation with one image.

`choice_weight` counts the loss again over the positions before the first digit (`<|det|>` and `[[`),
where the box is chosen. `teacher_forced` replaces, while training, the chosen heads' output at the box
positions by what they would give attending evenly to the box's global-view tokens
(`force_box_attention`). What each measured is in recipes/default/NOTES.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from default_recipe.attention_probes import attention_log_probs, head_values
from default_recipe.image_tokens import check_layout, row_image_tokens
from dsvl2.grounding import parse_grounding
from dsvl2.model import DeepseekVL2
from dsvl2.processor import Batch, Processor
from dsvl2.tokenizer import Tokenizer
from dsvl2.train.errors import TrainError
from dsvl2.train.extension import Extension


@dataclass(frozen=True)
class BoxTarget:
    row: int  # batch row
    queries: tuple[int, ...]  # positions whose next token belongs to the box
    keys: tuple[int, ...]  # image-token positions inside the box
    global_keys: tuple[int, ...]  # those of the global view (the view whose tokens stage vision taught boxes)
    choice: int  # leading queries written before the box's first digit: where the box is chosen
    global_tokens: tuple[int, ...] = ()  # global-view image-token positions whose centre lies in the image


def box_targets(batch: Batch, tokenizer: Tokenizer, tile_size: int, tokens_per_side: int) -> list[BoxTarget]:
    """A `BoxTarget` for every one-box `<|det|>` span of the answers of the batch's one-image rows."""
    det, end = tokenizer.token_to_id("<|det|>"), tokenizer.token_to_id("<|/det|>")
    digits = {tokenizer.token_to_id(str(digit)) for digit in range(10)}
    global_tokens = tokens_per_side * (tokens_per_side + 1)  # the global view's rows, newlines included
    targets = []
    for row in range(batch.input_ids.shape[0]):
        layout = row_image_tokens(batch, row, tile_size, tokens_per_side)
        if layout is None:
            continue
        image_positions, centres = layout
        in_image = tuple(image_positions[i] for i, centre in enumerate(centres[:global_tokens]) if centre is not None)
        ids, labels = batch.input_ids[row].tolist(), batch.labels[row].tolist()
        for start, token in enumerate(ids):
            if token != det or start + 1 >= len(ids) or labels[start + 1] < 0 or end not in ids[start + 1:]:
                continue
            stop = ids.index(end, start + 1)
            parsed = parse_grounding(tokenizer.decode(ids[start: stop + 1]))
            boxes = [box for ref in parsed.refs for box in ref.boxes]
            if parsed.errors or len(boxes) != 1:
                continue
            x1, y1, x2, y2 = boxes[0]
            inside = [index for index, centre in enumerate(centres)
                      if centre is not None and x1 <= centre[0] <= x2 and y1 <= centre[1] <= y2]
            if inside:
                choice = next(i for i, token in enumerate(ids[start + 1: stop + 1]) if token in digits or token == end)
                targets.append(BoxTarget(row, tuple(range(start, stop)), tuple(image_positions[i] for i in inside),
                                         tuple(image_positions[i] for i in inside if i < global_tokens), choice + 1,
                                         in_image))
    return targets


def box_attention_loss(attention: nn.Module, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                       mask: torch.Tensor, targets: list[BoxTarget], heads: tuple[int, ...], choice_weight: float = 0.0
                       ) -> tuple[torch.Tensor, float]:
    """Mean -log(attention mass on the box's tokens) of `heads` over every target's query positions, plus
    `choice_weight` times its mean over the positions before the first digit, and the mean mass itself (for
    the log). x, rope and mask are the batch's inputs of the layer `attention`."""
    losses, masses = [], []
    for target in targets:
        row = slice(target.row, target.row + 1)
        positions = torch.tensor(target.queries, device=x.device)
        log_probs = attention_log_probs(attention, x[row], (rope[0][row], rope[1][row]), mask[row], positions)
        mass = log_probs[list(heads)][:, :, list(target.keys)].logsumexp(dim=-1)  # [heads, queries]
        loss = -mass.mean()
        if choice_weight:
            loss = loss - choice_weight * mass[:, : target.choice].mean()
        losses.append(loss)
        masses.append(mass.detach().exp().mean())
    if not losses:
        return x.new_zeros(()), 0.0
    return torch.stack(losses).mean(), float(torch.stack(masses).mean())


def force_box_attention(attention: nn.Module, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                        mask: torch.Tensor, output: torch.Tensor, targets: list[BoxTarget], heads: tuple[int, ...]
                        ) -> torch.Tensor:
    """`output` [B, T, D] of the layer `attention` with `heads`, at every target's query positions, attending
    evenly to the box's global-view tokens instead of where they looked (teacher-forced attention). What
    reads the box downstream then learns from heads that look at the named object, whatever the heads'
    own weights say; those learn where to look from `box_attention_loss` alone (the forced output does
    not depend on them)."""
    output = output.clone()
    for target in targets:
        if not target.global_keys:
            continue
        row = slice(target.row, target.row + 1)
        positions = torch.tensor(target.queries, device=x.device)
        weights = attention_log_probs(attention, x[row], (rope[0][row], rope[1][row]), mask[row], positions).exp()
        values = head_values(attention, x[row])  # [H, L, dv]
        width = values.shape[-1]
        for head in heads:
            looked = weights[head].to(values.dtype) @ values[head]  # [Q, dv]
            forced = values[head, list(target.global_keys)].mean(dim=0, keepdim=True)
            o_proj = attention.o_proj.weight[:, head * width: (head + 1) * width]
            output[target.row, positions] = output[target.row, positions] + (forced - looked) @ o_proj.T
    return output


class BoxAttention(Extension):
    """The recipe's entry: `{use: "default_recipe.box_attention:BoxAttention", layer: 2, heads: [0],
    weight: 1.0, choice_weight: 0.0, teacher_forced: false}`. Logs `box_attention_loss` and
    `box_attention_mass` (the heads' mean attention mass on the box)."""

    name = "box_attention"
    metrics = ("mass",)

    def __init__(self, layer: int, heads: list[int] | tuple[int, ...] = (0,), weight: float = 1.0,
                 choice_weight: float = 0.0, teacher_forced: bool = False) -> None:
        super().__init__(weight)
        heads = tuple(heads) if isinstance(heads, (list, tuple)) else ()
        if not _natural(layer) or not heads or not all(_natural(h) for h in heads) or not choice_weight >= 0:
            raise ValueError(f"box_attention needs layer >= 0, a non-empty list of heads >= 0 and choice_weight "
                             f">= 0, got layer {layer}, heads {list(heads)}, choice_weight {choice_weight}")
        self.layer, self.heads = layer, heads
        self.choice_weight, self.teacher_forced = float(choice_weight), bool(teacher_forced)
        self._pending: list[BoxTarget] | None = None  # the targets of the forward under way
        self._inputs: tuple = ()

    def attach(self, model: DeepseekVL2, processor: Processor) -> None:
        check_layout(model, "box_attention", self.layer)
        heads = model.cfg.language.num_attention_heads
        if max(self.heads) >= heads:
            raise TrainError(f"box_attention.heads {list(self.heads)} name a head >= the {heads} attention heads "
                             "of the language model")
        if self.teacher_forced and model.language.model.gradient_checkpointing:
            # The recomputed forward would run without the forcing, and the gradients would not match the loss.
            raise TrainError("box_attention.teacher_forced cannot be combined with training.activation_checkpointing")
        self.processor = processor
        self.attention = model.language.model.layers[self.layer].self_attn
        self.attention.register_forward_hook(self._hook)

    def _hook(self, attention: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        # The layer's inputs (normed hidden states, rotary tables, mask) give its attention weights.
        if self._pending is None:
            return None
        self._inputs = args
        if self.teacher_forced:
            return force_box_attention(attention, *args[:3], output, self._pending, self.heads)
        return None

    def targets(self, batch: Batch) -> list[BoxTarget] | None:
        processor = self.processor
        found = box_targets(batch, processor.tokenizer, processor.tile_size, processor.tokens_per_side)
        self._pending = found or None
        return self._pending

    def loss(self, targets: list[BoxTarget]) -> tuple[torch.Tensor, dict[str, float]]:
        x, rope, mask = self._inputs[:3]
        self._pending, self._inputs = None, ()
        loss, mass = box_attention_loss(self.attention, x, rope, mask, targets, self.heads, self.choice_weight)
        return loss, {"mass": mass}


def _natural(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
