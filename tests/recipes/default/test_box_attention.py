"""Box attention (default_recipe): image tokens mapped to the pixels they show, targets from box answers, the loss,
the extension in the trainer."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from default_recipe import box_attention as box_attention_module
from default_recipe.attention_probes import attention_log_probs, head_values
from default_recipe.box_attention import BoxTarget, box_attention_loss, box_targets, force_box_attention
from default_recipe.image_tokens import image_token_centres
from PIL import Image, ImageDraw

from dsvl2.processor import Processor
from dsvl2.train.errors import TrainError
from dsvl2.train.recipe import RecipeError, TrainRecipe, recipe_from_dict
from dsvl2.train.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")
RED = (230, 20, 20)
USE = "default_recipe.box_attention:BoxAttention"


def with_box_attention(recipe: TrainRecipe, **options) -> TrainRecipe:
    """`recipe` with the box-attention extension and `options`."""
    return recipe_from_dict({**recipe.raw, "extensions": [{"use": USE, **options}]}, recipe.output.dir.parent)


def _picture(width: int, height: int, box: tuple[int, int, int, int]) -> Image.Image:
    image = Image.new("RGB", (width, height), (255, 255, 255))
    ImageDraw.Draw(image).rectangle(box, fill=RED)
    return image


def _batch(processor: Processor, answer: str, box: tuple[int, int, int, int], prompt_box: bool = False):
    image = _picture(600, 400, box)
    question = "<image>\n<|ref|>the red box<|/ref|>." + (" <|det|>[[0,0,999,999]]<|/det|>" if prompt_box else "")
    sample = processor.encode([{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
                              [image], inference=False)
    return processor.batch([sample], padding="right")


def test_targets_are_the_box_tokens_of_answers_and_the_image_tokens_inside(conf_dir: Path) -> None:
    processor = Processor.from_pretrained(conf_dir / "small_like")
    answer = "<|ref|>the red box<|/ref|><|det|>[[0, 0, 499, 999]]<|/det|>"
    batch = _batch(processor, answer, (0, 0, 300, 400), prompt_box=True)
    (target,) = box_targets(batch, processor.tokenizer, processor.tile_size, processor.tokens_per_side)
    ids = batch.input_ids[0].tolist()
    det = processor.tokenizer.token_to_id("<|det|>")
    start = max(i for i, t in enumerate(ids) if t == det)  # the answer's, not the prompt's
    assert target.row == 0 and target.queries[0] == start
    assert processor.tokenizer.decode([ids[target.queries[-1] + 1]]) == "<|/det|>"
    assert all(batch.labels[0, q + 1] >= 0 for q in target.queries)
    assert all(batch.images_seq_mask[0, k] for k in target.keys)
    # About half of each view's picture tokens: the left half of the image.
    centres = [c for c in image_token_centres(600, 400, *processor.tile_grid(600, 400), processor.tile_size,
                                              processor.tokens_per_side) if c is not None]
    assert len(target.keys) == sum(1 for x, _ in centres if x <= 499)
    assert 0.4 < len(target.keys) / len(centres) < 0.6
    side = processor.tokens_per_side
    global_view = set(batch.images_seq_mask[0].nonzero().flatten().tolist()[: side * (side + 1)])
    assert target.global_keys and set(target.global_keys) == set(target.keys) & global_view
    # The box is chosen where <|det|> predicts [[ and [[ predicts the first digit.
    assert target.choice == 2
    assert processor.tokenizer.decode([ids[start + target.choice]]) == "0"


@pytest.mark.parametrize("answer", ["<|ref|>two<|/ref|><|det|>[[0, 0, 10, 10], [20, 20, 30, 30]]<|/det|>",
                                    "no box here", "<|det|>[[0, 0, 10"])
def test_answers_without_exactly_one_box_give_no_target(conf_dir: Path, answer: str) -> None:
    processor = Processor.from_pretrained(conf_dir / "small_like")
    batch = _batch(processor, answer, (0, 0, 300, 400), prompt_box=True)
    assert box_targets(batch, processor.tokenizer, processor.tile_size, processor.tokens_per_side) == []


class _PlantedProbe:
    """Attention weights given in advance ([B, H, T, T]) in place of `attention_log_probs`; records which
    queries were asked for."""

    def __init__(self, log_probs: torch.Tensor) -> None:
        self.log_probs = log_probs
        self.asked: list[list[int]] = []

    def __call__(self, attention, x, rope, mask, positions):
        row = int(x[0, 0, 0])  # the test puts each row's index into its hidden states
        self.asked.append(positions.tolist())
        return self.log_probs[row][:, positions]


def test_loss_is_minus_log_attention_mass_on_the_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    log_probs = torch.full((2, 2, 6, 6), -math.inf)
    log_probs[1, 0, 5] = torch.tensor([0.1, 0.2, 0.3, 0.2, 0.1, 0.1]).log()
    log_probs[1, 1, 5] = torch.tensor([0.0, 0.5, 0.5, 0.0, 0.0, 0.0]).log()
    log_probs[1, :, 4] = torch.tensor([0.25, 0.25, 0.25, 0.25, 0.0, 0.0]).log()
    probe = _PlantedProbe(log_probs)
    monkeypatch.setattr(box_attention_module, "attention_log_probs", probe)
    attention = torch.nn.Identity()
    x = torch.arange(2.0)[:, None, None].expand(2, 6, 3)
    rope = (torch.zeros(2, 6, 2), torch.zeros(2, 6, 2))
    mask = torch.ones(2, 1, 6, 6, dtype=torch.bool)
    target = BoxTarget(row=1, queries=(5,), keys=(1, 2), global_keys=(1,), choice=1)
    loss, mass = box_attention_loss(attention, x, rope, mask, [target], heads=(0,))
    assert loss.item() == pytest.approx(-math.log(0.5)) and mass == pytest.approx(0.5)
    loss, mass = box_attention_loss(attention, x, rope, mask, [target], heads=(0, 1))
    assert loss.item() == pytest.approx(-math.log(0.5) / 2) and mass == pytest.approx(0.75)
    both = BoxTarget(row=1, queries=(4, 5), keys=(1, 2), global_keys=(1,), choice=1)
    loss, mass = box_attention_loss(attention, x, rope, mask, [both], heads=(1,))
    assert probe.asked[-1] == [4, 5]
    assert loss.item() == pytest.approx(-math.log(0.5) / 2) and mass == pytest.approx(0.75)
    # choice_weight adds the mean over the positions before the first digit (here the first query: mass 0.5).
    weighted, _ = box_attention_loss(attention, x, rope, mask, [both], heads=(1,), choice_weight=3.0)
    assert weighted.item() == pytest.approx(-math.log(0.5) / 2 - 3.0 * math.log(0.5))
    zero, mass = box_attention_loss(attention, x, rope, mask, [], heads=(0,))
    assert zero.item() == 0.0 and mass == 0.0


def test_training_pulls_the_head_onto_the_named_box(grounding_dir: Path, grounding_recipe, tmp_path: Path) -> None:
    records = [json.loads(line) for line in (grounding_dir / "train.jsonl").read_text().splitlines()]
    assert all("<|det|>" in r["messages"][-1]["content"] for r in records)
    box = {"layer": 1, "heads": [0, 2], "weight": 1.0}
    history = Trainer(with_box_attention(grounding_recipe(tmp_path / "on"), **box)).train()
    masses = [r["box_attention_mass"] for r in history]
    assert all(r["box_attention_loss"] > 0 for r in history)
    assert sum(masses[-3:]) > 2 * sum(masses[:3]), masses
    plain = Trainer(grounding_recipe(tmp_path / "off")).train()
    assert "box_attention_mass" not in plain[0]
    assert plain[0]["loss"] == pytest.approx(history[0]["loss"], rel=1e-6)  # same batches, same first forward
    forced = Trainer(with_box_attention(grounding_recipe(tmp_path / "forced"), **box, teacher_forced=True,
                                        choice_weight=1.0)).train()
    assert forced[0]["loss"] != pytest.approx(plain[0]["loss"], rel=1e-4)  # the forced heads change the forward
    assert forced[0]["box_attention_loss"] > history[0]["box_attention_loss"]  # the choice positions count twice
    forced_masses = [r["box_attention_mass"] for r in forced]
    assert sum(forced_masses[-3:]) > 2 * sum(forced_masses[:3]), forced_masses


def test_box_attention_settings_are_checked(grounding_recipe, tail_view_model: Path, tmp_path: Path) -> None:
    recipe = grounding_recipe(tmp_path / "a")
    with pytest.raises(RecipeError, match=r"extensions\[0\] \(default_recipe.box_attention:BoxAttention\): "
                                          r"box_attention needs layer >= 0, a non-empty list of heads"):
        with_box_attention(recipe, layer=0, heads=[])
    with pytest.raises(RecipeError, match=r"extensions\[0\].*weight must be > 0, got 0"):
        with_box_attention(recipe, layer=0, weight=0)
    with pytest.raises(RecipeError, match="choice_weight -1"):
        with_box_attention(recipe, layer=0, choice_weight=-1)
    with pytest.raises(RecipeError, match=r"extensions\[0\].*missing a required argument: 'layer'"):
        with_box_attention(recipe)
    with pytest.raises(RecipeError, match=r"extensions\[0\].*unexpected keyword argument 'head'"):
        with_box_attention(recipe, layer=0, head=[1])
    with pytest.raises(TrainError, match="teacher_forced cannot be combined with training.activation_checkpointing"):
        Trainer(with_box_attention(grounding_recipe(tmp_path / "f", activation_checkpointing=True), layer=0,
                                   teacher_forced=True))
    with pytest.raises(TrainError, match="box_attention.layer is 99"):
        Trainer(with_box_attention(grounding_recipe(tmp_path / "c"), layer=99))
    with pytest.raises(TrainError, match="heads"):
        Trainer(with_box_attention(grounding_recipe(tmp_path / "d"), layer=0, heads=[64]))
    with pytest.raises(TrainError, match="global_view_pos 'head'.*'tail'"):
        Trainer(with_box_attention(grounding_recipe(tmp_path / "g", checkpoint=tail_view_model), layer=0))


@pytest.mark.parametrize("variant", ["tiny_like", "small_like"])  # multi-head and latent attention
def test_forced_heads_attend_evenly_to_the_box_and_take_no_gradient_from_it(conf_dir: Path, variant: str) -> None:
    from dsvl2.checkpoint import load_model
    from dsvl2.language.model import causal_mask
    from dsvl2.language.rope import rotary_cos_sin

    model = load_model(conf_dir / variant)
    attention = model.language.model.layers[1].self_attn
    torch.manual_seed(0)
    x = torch.randn(2, 12, model.cfg.language.hidden_size)
    positions = torch.arange(12).expand(2, 12)
    mask = causal_mask(positions, 12)
    rope = rotary_cos_sin(model.cfg.language, positions)
    target = BoxTarget(row=1, queries=(8, 9), keys=(2, 3, 4, 5), global_keys=(3, 5), choice=1)
    output = attention(x, rope, mask)
    forced = force_box_attention(attention, x, rope, mask, output, [target], heads=(0,))
    with torch.no_grad():
        weights = torch.stack([attention_log_probs(attention, x[r:r + 1], (rope[0][r:r + 1], rope[1][r:r + 1]),
                                                             mask[r:r + 1], torch.arange(12)) for r in range(2)]).exp()
        weights[1, 0, 8:10] = 0.0
        weights[1, 0, 8:10, [3, 5]] = 0.5
        values = torch.stack([head_values(attention, x[r:r + 1]) for r in range(2)])
        expected = attention.o_proj((weights @ values).transpose(1, 2).reshape(2, 12, -1))
    assert torch.allclose(forced, expected, atol=1e-5, rtol=1e-4)
    assert torch.equal(forced[0], output[0]) and torch.equal(forced[1, :8], output[1, :8])
    assert not torch.allclose(forced[1, 8:10], output[1, 8:10], atol=1e-4)
    # What the forced positions give depends on head 0's values but not on where head 0 would look.
    query = attention.q_proj.weight if hasattr(attention, "q_proj") else attention.q_b_proj.weight
    forced[1, 8:10].sum().backward()
    per_head = query.grad.view(attention.n_heads, -1, query.shape[1])
    assert per_head[0].abs().max() < 1e-6 < per_head[1].abs().max()
