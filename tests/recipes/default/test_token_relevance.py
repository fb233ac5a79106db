"""Token relevance (default_recipe): labels from box answers and from records' regions (read and checked by
the extension), the parameter-free logit, the loss, the extension in the trainer."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from default_recipe.box_attention import BoxTarget, box_targets
from default_recipe.image_tokens import image_token_centres
from default_recipe.token_relevance import (
    TokenRelevance,
    batch_relevance_labels,
    region_labels,
    relevance_labels,
    relevance_logits,
    token_relevance_loss,
)
from PIL import Image, ImageDraw

from dsvl2.processor import Processor
from dsvl2.train.data import RecordEncoder, SkipRecord, TrainSample, collate
from dsvl2.train.errors import TrainError
from dsvl2.train.recipe import RecipeError, TrainRecipe, recipe_from_dict
from dsvl2.train.synthetic import generate_dataset
from dsvl2.train.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")
USE = "default_recipe.token_relevance:TokenRelevance"


def with_token_relevance(recipe: TrainRecipe, **options) -> TrainRecipe:
    """`recipe` with the token-relevance extension and `options`."""
    return recipe_from_dict({**recipe.raw, "extensions": [{"use": USE, **options}]}, recipe.output.dir.parent)


def _target(row: int, inside: tuple[int, ...], tokens: tuple[int, ...]) -> BoxTarget:
    return BoxTarget(row=row, queries=(20,), keys=inside, global_keys=inside, choice=1, global_tokens=tokens)


def test_box_targets_list_the_global_view_tokens_that_show_the_image(conf_dir: Path) -> None:
    processor = Processor.from_pretrained(conf_dir / "small_like")
    image = Image.new("RGB", (600, 400), (255, 255, 255))
    ImageDraw.Draw(image).rectangle((0, 0, 300, 400), fill=(230, 20, 20))
    messages = [{"role": "user", "content": "<image>\n<|ref|>the red box<|/ref|>."},
                {"role": "assistant", "content": "<|ref|>the red box<|/ref|><|det|>[[0, 0, 499, 999]]<|/det|>"}]
    batch = processor.batch([processor.encode(messages, [image], inference=False)], padding="right")
    (target,) = box_targets(batch, processor.tokenizer, processor.tile_size, processor.tokens_per_side)
    side = processor.tokens_per_side
    global_view = batch.images_seq_mask[0].nonzero().flatten().tolist()[: side * (side + 1)]
    centres = image_token_centres(600, 400, *processor.tile_grid(600, 400), processor.tile_size, side)
    # A 3:2 picture in a square view: padding rows and the newlines have no centre and are left out.
    shown = [position for position, centre in zip(global_view, centres, strict=False) if centre is not None]
    assert list(target.global_tokens) == shown
    assert 0 < len(shown) < side * side
    assert set(target.global_keys) < set(target.global_tokens)


def test_labels_mark_the_box_tokens_of_rows_with_one_box() -> None:
    one = _target(0, inside=(5, 7), tokens=(4, 5, 6, 7))
    caption = [_target(1, inside=(4,), tokens=(4, 5)), _target(1, inside=(5,), tokens=(4, 5))]
    no_tokens = _target(2, inside=(), tokens=())
    labelled = relevance_labels([one, *caption, no_tokens])
    assert len(labelled) == 1  # a grounded caption names several objects, the last row shows none
    row, positions, labels = labelled[0]
    assert row == 0 and positions == [4, 5, 6, 7]
    assert labels.tolist() == [0.0, 1.0, 0.0, 1.0]


def _region_batch(conf_dir: Path, regions: list[list | None]):
    """Right-padded training batch of one 600x400 picture per row (red left half, box answer on it), each row
    naming `regions[row]`, and its processor."""
    processor = Processor.from_pretrained(conf_dir / "small_like")
    image = Image.new("RGB", (600, 400), (255, 255, 255))
    ImageDraw.Draw(image).rectangle((0, 0, 300, 400), fill=(230, 20, 20))
    messages = [{"role": "user", "content": "<image>\n<|ref|>the red box<|/ref|>."},
                {"role": "assistant", "content": "<|ref|>the red box<|/ref|><|det|>[[0, 0, 499, 999]]<|/det|>"}]
    sample = processor.encode(messages, [image], inference=False)
    samples = [TrainSample(**vars(sample), extras={} if r is None else {"regions": r}) for r in regions]
    return collate(processor, samples), processor


def test_region_labels_mark_the_global_view_tokens_inside_the_records_regions(conf_dir: Path) -> None:
    batch, processor = _region_batch(conf_dir, [[[500, 0, 999, 499]], None, []])
    assert batch.to("cpu").extras == batch.extras  # the training batch keeps its fields when moved
    side = processor.tokens_per_side
    labelled = region_labels(batch, processor.tile_size, side)
    assert [row for row, _, _ in labelled] == [0, 2]  # row 1 names no regions
    centres = image_token_centres(600, 400, *processor.tile_grid(600, 400), processor.tile_size, side)
    global_view = batch.images_seq_mask[0].nonzero().flatten().tolist()[: side * (side + 1)]
    shown = [(p, c) for p, c in zip(global_view, centres, strict=False) if c is not None]
    _, positions, labels = labelled[0]
    assert positions == [p for p, _ in shown]
    assert labels.tolist() == [float(x >= 500 and y <= 499) for _, (x, y) in shown]
    assert 0 < labels.sum() < len(labels)
    assert labelled[1][2].sum() == 0  # regions [] : about nothing in the picture, every token says no


def test_a_rows_regions_win_over_its_answer_box(conf_dir: Path) -> None:
    batch, processor = _region_batch(conf_dir, [[[500, 0, 999, 499]], None])
    targets = box_targets(batch, processor.tokenizer, processor.tile_size, processor.tokens_per_side)
    labelled = batch_relevance_labels(batch, targets, processor.tile_size, processor.tokens_per_side)
    assert [row for row, _, _ in labelled] == [0, 1]
    from_regions = region_labels(batch, processor.tile_size, processor.tokens_per_side)[0]
    from_box = relevance_labels(targets)[1]
    assert torch.equal(labelled[0][2], from_regions[2]) and torch.equal(labelled[1][2], from_box[2])
    assert not torch.equal(from_regions[2], relevance_labels(targets)[0][2])


def test_logit_is_the_first_coordinate_of_the_rms_normalised_state() -> None:
    hidden = torch.tensor([[3.0, 4.0, 0.0, 0.0], [-2.0, 0.0, 0.0, 0.0], [0.0, 5.0, 5.0, 5.0]])
    rms = hidden.pow(2).mean(-1).sqrt()
    assert relevance_logits(hidden).tolist() == pytest.approx((hidden[:, 0] / rms).tolist(), rel=1e-5)
    # Scale-free: the layer must turn its state, not grow it.
    assert relevance_logits(10 * hidden).tolist() == pytest.approx(relevance_logits(hidden).tolist(), rel=1e-5)


def test_loss_and_accuracy_follow_the_first_coordinate() -> None:
    target = _target(1, inside=(2, 3), tokens=(1, 2, 3, 4))
    hidden = torch.zeros(2, 6, 4)
    hidden[:, :, 1] = 1.0
    hidden[1, [2, 3], 0] = 3.0  # relevant: positive logit
    hidden[1, [1, 4], 0] = -3.0
    loss, accuracy = token_relevance_loss(hidden, relevance_labels([target]))
    assert accuracy == 1.0
    logit = 3.0 / math.sqrt(10 / 4)
    assert float(loss) == pytest.approx(math.log1p(math.exp(-logit)), rel=1e-5)
    hidden[1, [2, 3], 0] = -3.0  # now every relevant token says no
    loss_wrong, accuracy_wrong = token_relevance_loss(hidden, relevance_labels([target]))
    assert accuracy_wrong == 0.5 and float(loss_wrong) > float(loss)
    assert token_relevance_loss(hidden, []) is None


def test_training_teaches_the_tokens_their_relevance(grounding_recipe, tmp_path: Path) -> None:
    history = Trainer(with_token_relevance(grounding_recipe(tmp_path / "on"), layer=0, weight=1.0)).train()
    losses = [r["token_relevance_loss"] for r in history]
    assert all(0 <= r["token_relevance_accuracy"] <= 1 for r in history)
    assert sum(losses[-3:]) / 3 < 0.5 * losses[0], losses  # at least the share of relevant tokens is learnt
    plain = Trainer(grounding_recipe(tmp_path / "off")).train()
    assert "token_relevance_loss" not in plain[0]
    assert plain[0]["loss"] == pytest.approx(history[0]["loss"], rel=1e-6)  # same batches, same first forward
    assert plain[-1]["loss"] != pytest.approx(history[-1]["loss"], rel=1e-4)  # the loss changed the training


def test_counting_records_teach_relevance_from_their_regions(conf_dir: Path, tmp_path: Path) -> None:
    generate_dataset(tmp_path / "counting", 8, seed=5, tasks=["counting"])
    raw = {"stage": "sft", "model": {"checkpoint": str(conf_dir / "small_like")},
           "data": {"sources": [{"name": "c", "paths": [str(tmp_path / "counting")]}], "shuffle_buffer": 1},
           "optimizer": {"lr": 3e-3}, "training": {"steps": 2, "micro_batch_size": 2},
           "output": {"dir": str(tmp_path / "out"), "save_every": 100, "progress": False},
           "extensions": [{"use": USE, "layer": 0}]}
    history = Trainer(recipe_from_dict(raw, tmp_path)).train()
    assert all(r["token_relevance_loss"] > 0 for r in history)  # no box in the answers: the regions label


def test_token_relevance_settings_are_checked(grounding_recipe, tail_view_model: Path, tmp_path: Path) -> None:
    recipe = grounding_recipe(tmp_path / "a")
    with pytest.raises(RecipeError, match=r"extensions\[0\] \(default_recipe.token_relevance:TokenRelevance\): "
                                          "weight must be > 0, got 0"):
        with_token_relevance(recipe, layer=0, weight=0)
    with pytest.raises(RecipeError, match="token_relevance needs layer >= 0, got -1"):
        with_token_relevance(recipe, layer=-1)
    with pytest.raises(RecipeError, match=r"extensions\[0\].*missing a required argument: 'layer'"):
        with_token_relevance(recipe, weight=1.0)
    with pytest.raises(TrainError, match="token_relevance.layer is 99"):
        Trainer(with_token_relevance(grounding_recipe(tmp_path / "c"), layer=99))
    with pytest.raises(TrainError, match="token_relevance needs global_view_pos 'head'.*'tail'"):
        Trainer(with_token_relevance(grounding_recipe(tmp_path / "d", checkpoint=tail_view_model), layer=0))


@pytest.mark.parametrize(("regions", "images", "error"), [
    ([[10, 20, 30, 40]], 1, None), ([], 1, None), (None, 1, None),
    ([[10, 20, 5, 40]], 1, "'regions' must be a list of"), ([[0, 0, 1000, 10]], 1, "'regions' must be a list of"),
    ([[1, 2, 3]], 1, "'regions' must be a list of"), ("all", 1, "'regions' must be a list of"),
    ([[0, 0, 1.5, 10]], 1, "'regions' must be a list of"),
    ([[1, 2, 3, 4]], 2, "'regions' needs a conversation with one image, this one has 2"),
])
def test_regions_are_checked_and_carried_into_the_batch(conf_dir: Path, regions, images, error) -> None:
    processor = Processor.from_pretrained(conf_dir / "small_like")
    tags = "<image>\n" * images
    record = {"messages": [{"role": "user", "content": f"{tags}How many?"}, {"role": "assistant", "content": "1"}],
              "images": [str(conf_dir / "images" / "square.png")] * images, "regions": regions}
    encoder = RecordEncoder(processor, fields=TokenRelevance.fields)
    if error is not None:  # the data reader skips the record as invalid, with the extension's message
        with pytest.raises(SkipRecord, match=error) as caught:
            encoder(json.dumps(record).encode(), Path("x.jsonl"))
        assert caught.value.reason == "invalid_record"
        return
    sample = encoder(json.dumps(record).encode(), Path("x.jsonl"))
    text = encoder(json.dumps({"text": "no picture"}).encode(), Path("x.jsonl"))
    batch = collate(processor, [sample, text])
    expected = None if regions is None else [tuple(box) for box in regions]
    assert batch.extras == [{"regions": expected}, {}]
