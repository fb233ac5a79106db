"""Image-token scale (default_recipe): one factor on every image token, measured on the stage's first batches,
once."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from default_recipe.token_scale import image_token_square_sum, scale_image_tokens

from dsvl2.checkpoint import load_model
from dsvl2.processor import Processor
from dsvl2.train.errors import TrainError
from dsvl2.train.recipe import RecipeError, recipe_from_dict
from dsvl2.train.synthetic import generate_dataset, generate_records
from dsvl2.train.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    generate_dataset(root / "vl", 4, seed=5, tasks=["grounding"])
    generate_dataset(root / "text", 4, seed=5, tasks=["text"])
    return root


def _batch(conf_dir: Path, n: int = 2):
    processor = Processor.from_pretrained(conf_dir / "tiny_like")
    samples = [processor.encode(record["messages"], [image], inference=False)
               for record, image in generate_records(n, 3, "train", ["grounding"])]
    return processor.batch(samples)


def _rms(model, batches) -> float:
    total, count = image_token_square_sum(model, batches)
    return (total / count) ** 0.5


def test_every_image_token_is_multiplied_by_the_factor_that_gives_the_rms(conf_dir: Path) -> None:
    model = load_model(conf_dir / "tiny_like").eval()
    batch = _batch(conf_dir)
    tiles = batch.images[0, :int(batch.images_spatial_crop[0, 0].prod()) + 1]
    crop = [tuple(int(v) for v in batch.images_spatial_crop[0, 0])]
    with torch.no_grad():
        before = model.image_embeddings(tiles, crop)[0]
    factor = scale_image_tokens(model, [batch], 0.05)
    assert _rms(model, [batch]) == pytest.approx(0.05, rel=1e-4)
    with torch.no_grad():
        after = model.image_embeddings(tiles, crop)[0]
    torch.testing.assert_close(after, before * factor, rtol=1e-4, atol=1e-6)  # newlines and separator too
    assert model.image_newline.abs().sum() > 0 and model.view_seperator.abs().sum() > 0


def test_ranks_scale_alike_by_the_summed_measure(conf_dir: Path) -> None:
    model = load_model(conf_dir / "tiny_like").eval()
    batch = _batch(conf_dir)
    rms = _rms(model, [batch])
    # another rank's tokens, of the same count, at twice this one's RMS: together RMS sqrt(2.5) times this one's
    factor = scale_image_tokens(model, [batch], 1.0, lambda sums: sums * torch.tensor([5.0, 2.0], dtype=sums.dtype))
    assert factor == pytest.approx(1.0 / (rms * 2.5 ** 0.5), rel=1e-5)


def _recipe(conf_dir: Path, data_dir: Path, out: Path, rms: float | None, source: str = "vl", **options):
    raw = {
        "stage": "align", "seed": 0,
        "model": {"checkpoint": str(conf_dir / "tiny_like")},
        "data": {"sources": [{"name": source, "paths": [str(data_dir / source)]}], "shuffle_buffer": 2},
        "optimizer": {"lr": 1e-4},
        "training": {"steps": 2, "micro_batch_size": 1},
        "output": {"dir": str(out), "save_every": 1, "progress": False},
        "extensions": [] if rms is None else [{"use": "default_recipe.token_scale:TokenScale", "rms": rms, **options}],
    }
    return recipe_from_dict(raw, out.parent)


def test_stage_starts_at_the_rms_and_a_resumed_stage_is_not_scaled_again(conf_dir: Path, data_dir: Path,
                                                                          tmp_path: Path) -> None:
    batch = _batch(conf_dir)
    recipe = _recipe(conf_dir, data_dir, tmp_path / "out", 0.05)
    trainer = Trainer(recipe)
    # measured on the stage's own first batches; on others the RMS is near, not exact
    assert _rms(trainer.model, [batch]) == pytest.approx(0.05, rel=0.5)
    assert _rms(load_model(conf_dir / "tiny_like"), [batch]) > 0.2  # the checkpoint's own tokens are larger
    trainer.train(stop_at=1)
    saved = load_model(tmp_path / "out" / "checkpoint-0000001")
    resumed = Trainer(recipe, resume=True)
    torch.testing.assert_close(resumed.model.projector.state_dict(), saved.projector.state_dict())


def test_token_scale_needs_images_and_a_positive_value(conf_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(TrainError, match="token_scale.*no image"):
        Trainer(_recipe(conf_dir, data_dir, tmp_path / "text_only", 0.05, source="text"))
    with pytest.raises(RecipeError, match=r"extensions\[0\].*token_scale.rms must be > 0"):
        _recipe(conf_dir, data_dir, tmp_path / "zero", 0.0)
    with pytest.raises(RecipeError, match=r"extensions\[0\].*token_scale.batches must be >= 1"):
        _recipe(conf_dir, data_dir, tmp_path / "none", 0.5, batches=0)
    with pytest.raises(RecipeError, match=r"extensions\[0\].*unexpected keyword argument 'weight'"):
        _recipe(conf_dir, data_dir, tmp_path / "weighted", 0.5, weight=2.0)
