"""benchmarks/bench_reader.py: exact image features a language model can learn to read."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests.benchmarks import load_bench
from tests.conformance_data import REPO

SCRIPT = REPO / "benchmarks" / "bench_reader.py"


def test_object_features_sit_on_the_tokens_under_each_object():
    bench = load_bench("bench_reader")
    features = bench.ExactFeatures(8, "object")
    objects = [{"color": "red", "shape": "circle", "box": [0, 0, 499, 499]},
               {"color": "red", "shape": "square", "box": [500, 500, 999, 999]}]
    centres = [(100.0, 100.0), (700.0, 700.0), (700.0, 100.0), None, (100.0, 100.0)]
    out = features(objects, centres, global_tokens=4)
    red, circle, square = bench.COLOURS.index("red"), bench.KINDS.index("circle"), bench.KINDS.index("square")
    kinds = len(bench.COLOURS)
    total = features.count[kinds + len(bench.KINDS), 2]
    expected_circle = total + features.colour[red] + features.kind[circle] + features.count[red, 2] \
        + features.count[kinds + circle, 1]
    expected_square = total + features.colour[red] + features.kind[square] + features.count[red, 2] \
        + features.count[kinds + square, 1]
    torch.testing.assert_close(out[0], expected_circle)
    torch.testing.assert_close(out[1], expected_square)
    torch.testing.assert_close(out[2], total + features.background)
    torch.testing.assert_close(out[3], features.blank)  # a newline of the global view
    torch.testing.assert_close(out[4], features.blank)  # past the global view


def test_scene_features_give_every_global_token_the_same_counts():
    bench = load_bench("bench_reader")
    features = bench.ExactFeatures(8, "scene")
    objects = [{"color": "red", "shape": "circle", "box": [0, 0, 10, 10]}]
    out = features(objects, [(500.0, 500.0), (5.0, 5.0), None], global_tokens=2)
    torch.testing.assert_close(out[0], out[1])
    assert not torch.equal(out[0], out[2])
    with pytest.raises(ValueError, match="scene or object"):
        bench.ExactFeatures(8, "pixels")


def test_the_language_model_learns_total_counts_from_scene_features(tmp_path):
    out = tmp_path / "reader.json"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--questions", "total", "--steps", "150", "--eval-every", "150",
         "--n-train", "500", "--n-test", "250", "--threads", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["test_questions"] >= 30
    assert report["majority"]["total"] < 0.5
    assert report["accuracy"]["total"] >= 0.9, report
    assert "majority" in result.stdout


def test_relevance_labels_mark_the_tokens_on_the_shapes_the_question_counts():
    bench = load_bench("bench_reader")
    objects = [{"color": "red", "shape": "circle", "box": [0, 0, 499, 499]},
               {"color": "blue", "shape": "circle", "box": [500, 500, 999, 999]}]
    centres = [(100.0, 100.0), (700.0, 700.0), (700.0, 100.0), None, (100.0, 100.0)]
    red = bench.relevance_labels({"objects": objects, "query": {"color": "red"}}, centres, global_tokens=4)
    assert red == [(0, 1.0), (1, 0.0), (2, 0.0)]  # no label for the newline or past the global view
    circles = bench.relevance_labels({"objects": objects, "query": {"shape": "circle"}}, centres, global_tokens=4)
    assert circles == [(0, 1.0), (1, 1.0), (2, 0.0)]
    total = bench.relevance_labels({"objects": objects, "query": {}}, centres, global_tokens=4)
    assert [label for _, label in total] == [1.0, 1.0, 0.0]
    assert all(label == 0.0 for _, label in
               bench.relevance_labels({"objects": objects, "query": {"color": "green"}}, centres, 4))


def test_the_relevance_loss_runs_and_is_reported(tmp_path):
    out = tmp_path / "reader.json"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--features", "object", "--questions", "colour", "--token-relevance", "1",
         "--steps", "60", "--eval-every", "60", "--n-train", "200", "--n-test", "100", "--threads", "1",
         "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["token_relevance"] == 1
    accuracy = report["accuracy"]
    # 60 steps teach at least the share of tokens that are not on a counted shape
    assert accuracy["relevance"] >= accuracy["relevance_majority"] - 0.02 > 0.5, accuracy


def test_feature_scale_multiplies_every_feature_and_frozen_features_run(tmp_path):
    bench = load_bench("bench_reader")
    torch.manual_seed(0)
    plain = bench.ExactFeatures(8, "object")
    scaled = bench.ExactFeatures(8, "object", scale=50.0)
    scaled.load_state_dict(plain.state_dict())
    objects = [{"color": "red", "shape": "circle", "box": [0, 0, 499, 499]}]
    centres = [(100.0, 100.0), (700.0, 700.0), None]
    torch.testing.assert_close(scaled(objects, centres, 3), 50.0 * plain(objects, centres, 3))
    out = tmp_path / "frozen.json"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--features", "object", "--freeze-features", "--feature-scale", "50",
         "--steps", "10", "--eval-every", "10", "--n-train", "60", "--n-test", "30", "--threads", "1",
         "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["freeze_features"] is True and report["feature_scale"] == 50.0


def test_noise_names_a_wrong_colour_or_kind_at_the_asked_rate():
    bench = load_bench("bench_reader")
    objects = [{"color": "red", "shape": "circle", "box": [0, 0, 999, 999]}]
    red, circle = bench.COLOURS.index("red"), bench.KINDS.index("circle")
    colours, kinds = len(bench.COLOURS), len(bench.KINDS)
    features = bench.ExactFeatures(8, "object", colour_noise=0.3, kind_noise=1.0, seed=1)
    total = features.count[colours + kinds, 1]
    named = []
    for _ in range(400):
        out = features(objects, [(500.0, 500.0)], 1)[0]
        # which (colour, kind) the token names, its counts included (0 for a colour or kind the scene lacks)
        matches = [(c, k) for c in range(colours) for k in range(kinds) if torch.allclose(out, total
                   + features.colour[c] + features.kind[k] + features.count[c, int(c == red)]
                   + features.count[colours + k, int(k == circle)])]
        assert len(matches) == 1
        named.append(matches[0])
    wrong_colour = sum(c != red for c, _ in named) / len(named)
    assert 0.22 < wrong_colour < 0.38
    assert all(k != circle for _, k in named)  # kind noise 1.0: always another kind
    assert len({c for c, _ in named}) == colours  # every other colour is drawn
    clean = bench.ExactFeatures(8, "object")
    clean.load_state_dict(features.state_dict())
    expected = total + clean.colour[red] + clean.kind[circle] + clean.count[red, 1] + clean.count[colours + circle, 1]
    torch.testing.assert_close(clean(objects, [(500.0, 500.0)], 1)[0], expected)


def test_tower_features_are_the_image_tokens_the_checkpoint_gives_its_language_model():
    from dsvl2.defaults import default_model_dir
    from dsvl2.processor import Processor
    from dsvl2.train.synthetic import generate_records

    bench = load_bench("bench_reader")
    processor = Processor.from_pretrained(default_model_dir())
    tower = bench.TowerFeatures(default_model_dir())
    (record, sample, centres), *_ = bench.make_examples(processor, 12, 7, "test", "all", tower)
    assert sample.pixel_values.numel() == 0  # the pixels are dropped once the tokens are made
    image = next(image for generated, image in generate_records(12, 7, "test", ["counting"])
                 if generated["messages"] == record["messages"])
    batch = processor.batch([processor.encode(record["messages"], [image], inference=False)])
    with torch.no_grad():
        embeds = tower.model.embed_inputs(batch.input_ids, batch.images, batch.images_seq_mask,
                                          batch.images_spatial_crop)[0]
    expected = embeds[batch.images_seq_mask[0]]
    tokens = tower.embed(record, centres, 0)
    assert tokens.shape == expected.shape == (len(centres), tower.model.cfg.language.hidden_size)
    torch.testing.assert_close(tokens, expected)
    assert not tokens.requires_grad


def test_whitening_gives_the_tower_features_zero_mean_and_equal_variance_in_every_direction():
    bench = load_bench("bench_reader")
    generator = torch.Generator().manual_seed(0)
    mixing = torch.randn(6, 6, generator=generator) * torch.tensor([5.0, 3.0, 1.0, 0.5, 0.1, 0.01])
    examples = [({"image_tokens": torch.randn(50, 6, generator=generator) @ mixing + 3.0}, None, None)
                for _ in range(8)]
    tower = bench.TowerFeatures.__new__(bench.TowerFeatures)  # no checkpoint: only the whitening is tested
    tower.whiten(examples, rms=0.05)
    tower.apply_whitening(examples)
    tokens = torch.cat([record["image_tokens"] for record, _, _ in examples]).double()
    assert tokens.mean(0).abs().max() < 1e-6
    torch.testing.assert_close(torch.cov(tokens.T), 0.05**2 * torch.eye(6, dtype=torch.float64), atol=1e-6, rtol=1e-4)


def test_rescaling_gives_the_fitted_tower_features_the_rms_and_the_others_the_same_factor():
    bench = load_bench("bench_reader")
    generator = torch.Generator().manual_seed(0)
    fit = [({"image_tokens": torch.randn(50, 6, generator=generator) * 2.0 + 1.0}, None, None) for _ in range(4)]
    other = [({"image_tokens": torch.randn(50, 6, generator=generator) * 7.0}, None, None)]
    original = other[0][0]["image_tokens"].clone()
    tower = bench.TowerFeatures.__new__(bench.TowerFeatures)  # no checkpoint: only the scaling is tested
    factor = tower.rescale(0.05, fit, other)
    tokens = torch.cat([record["image_tokens"] for record, _, _ in fit])
    assert tokens.pow(2).mean().sqrt().item() == pytest.approx(0.05, rel=1e-5)
    torch.testing.assert_close(other[0][0]["image_tokens"], original * factor)


@pytest.mark.parametrize("flags", [["--features", "tower", "--whiten", "0.05"],
                                   ["--features", "tower", "--tower-rms", "0.05"],
                                   ["--features", "object", "--tower-mix", "3"]])
def test_the_benchmark_runs_on_tower_tokens(tmp_path, flags):
    out = tmp_path / "tower.json"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), *flags, "--questions", "colour",
         "--token-relevance", "1", "--steps", "5", "--eval-every", "5", "--n-train", "60", "--n-test", "30",
         "--threads", "1", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text())
    expected = {"--whiten": (0.05, None, 0.0), "--tower-rms": (None, 0.05, 0.0), "--tower-mix": (None, None, 3.0)}
    assert report["features"] == flags[1]
    assert (report["whiten"], report["tower_rms"], report["tower_mix"]) == expected[flags[2]]
    assert 0.0 <= report["accuracy"]["colour"] <= 1.0 and "relevance" in report["accuracy"]


@pytest.mark.parametrize(("flags", "message"), [(["--whiten", "1"], "--whiten applies to --features tower"),
                                                (["--features", "tower", "--colour-noise", "0.1"],
                                                 "--colour-noise and --kind-noise apply to --features object"),
                                                (["--features", "tower", "--tower-mix", "1"],
                                                 "--tower-mix applies to exact features"),
                                                (["--features", "tower", "--whiten", "1", "--tower-rms", "1"],
                                                 "--tower-rms applies to --features tower without --whiten")])
def test_settings_of_other_features_are_refused(flags, message):
    result = subprocess.run([sys.executable, str(SCRIPT), *flags], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and message in result.stderr


def test_tower_mix_adds_the_tower_tokens_at_a_multiple_of_the_features_size():
    bench = load_bench("bench_reader")
    objects = [{"color": "red", "shape": "circle", "box": [0, 0, 499, 499]}]
    centres = [(100.0, 100.0), (700.0, 700.0), None]
    plain = bench.ExactFeatures(8, "object")
    mixed = bench.ExactFeatures(8, "object", tower_mix=3.0)
    mixed.load_state_dict(plain.state_dict())
    tokens = torch.randn(3, 8) * 40.0
    record = {"objects": objects, "image_tokens": tokens}
    exact = plain.embed(record, centres, 3)
    added = mixed.embed(record, centres, 3) - exact
    torch.testing.assert_close(added / added.norm(), tokens / tokens.norm())  # the tower's tokens, rescaled
    torch.testing.assert_close(added.pow(2).mean().sqrt(), 3.0 * exact.pow(2).mean().sqrt())
