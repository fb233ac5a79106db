"""Can the language model learn to answer from image tokens that hold the answer exactly?

The vision tower and projector are replaced by exact features computed from the renderer's objects;
a fresh language model (the default model's configuration) is trained on synthetic counting questions
and scored on held-out ones, by question kind, beside the score of always giving the most common
answer. This separates what the language model learns in a number of steps from what the tower
delivers: the same questions, labels and language model run on exact features and on the tower's own
tokens (`--features tower`).

Features of the image tokens (`--features`), the first two each a sum of learned vectors:
  scene   every global-view token holds the scene's counts (of each colour, of each kind, in all),
          the scene labels stage vision teaches every global-view token (default_recipe/vision_stage.py).
  object  a global-view token whose centre lies on an object holds that object's colour, its kind,
          the count of its colour and the count of its kind; every global-view token holds the total.
  tower   the image tokens a checkpoint's frozen vision tower and projector make of the pixels (`--tower DIR`,
          the default model's by default), every view, newline and separator included: what the language
          model of that checkpoint receives. Same questions, labels and language model as above, so the
          difference from `object` is the tower's.
With scene and object features, local-view, newline and separator tokens are one learned vector: they carry
nothing.

`--freeze-features` keeps the features at their random starting values (only the language model learns);
`--feature-scale X` multiplies them (the default model's image tokens are ~50x the text embeddings' RMS);
`--colour-noise P` / `--kind-noise P` make an object token name a wrong colour / kind with probability P,
drawn afresh at every forward (the tower's tokens are not exact: a linear probe reads 0.86 / 0.57 of them);
`--tower-mix X` adds the tower's tokens (as `--features tower` makes them) at X times the features' RMS;
`--tower-rms R` multiplies the tower's tokens by one factor that gives them RMS R (the default model's are
~90x its text embeddings' 0.026, and the language model learns nothing from them at that scale).

`--token-relevance LAYER` adds the loss of `default_recipe.token_relevance` at that decoder layer's output:
each global-view token that shows the image learns whether it lies on a shape the question counts (of
the named colour or kind; any shape for a total); the held-out share of tokens it gets right is reported
as `relevance` (beside `relevance_majority`, the share of tokens that are not relevant).

    python benchmarks/bench_reader.py [--features scene|object|tower] [--tower DIR]
        [--questions all|total|colour|kind]
        [--token-relevance LAYER] [--relevance-weight 1.0] [--freeze-features] [--feature-scale 1.0]
        [--colour-noise 0] [--kind-noise 0] [--tower-mix 0] [--whiten RMS] [--tower-rms RMS]
        [--steps 1000] [--batch 4] [--lr 3e-4]
        [--n-train 6000] [--n-test 400] [--threads N] [--out F]

Accuracy is the argmax at the answer's first token under teacher forcing, which is the first token
greedy decoding writes; every answer is one digit token. Prints a table and writes
benchmarks/results/reader-<features>-<questions>.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dsvl2.checkpoint import build_model, load_model
from dsvl2.config import load_json, model_config_from_dict
from dsvl2.defaults import default_model_dir
from dsvl2.language.model import LayerOutput, shifted_cross_entropy
from dsvl2.model import DeepseekVL2, init_weights
from dsvl2.processor import Processor, Sample
from dsvl2.train.synthetic import SHAPE_KINDS as KINDS
from dsvl2.train.synthetic import generate_records

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes" / "default"))  # the recipe's package
from default_recipe.image_tokens import image_token_centres  # noqa: E402
from default_recipe.token_relevance import relevance_logits  # noqa: E402
from default_recipe.vision_labels import COLOURS, MAX_COUNT  # noqa: E402

QUESTION_KINDS = ("total", "colour", "kind")


def question_kind(record: dict[str, Any]) -> str:
    query = record.get("query") or {}
    return "colour" if "color" in query else "kind" if "shape" in query else "total"


class ExactFeatures(nn.Module):
    """Image-token embeddings built from a record's objects instead of its pixels."""

    def __init__(self, dim: int, mode: str, scale: float = 1.0, colour_noise: float = 0.0,
                 kind_noise: float = 0.0, seed: int = 0, tower_mix: float = 0.0) -> None:
        super().__init__()
        self.scale = scale
        self.tower_mix = tower_mix  # add a record's tower tokens at this multiple of the features' RMS
        # The tower's tokens name a shape's colour and kind only so often (a linear probe: 0.86 and 0.57);
        # noise draws a wrong one, afresh at every forward, with these probabilities.
        self.colour_noise, self.kind_noise = colour_noise, kind_noise
        self.rng = random.Random(seed)
        if mode not in ("scene", "object"):
            raise ValueError(f"features must be scene or object, got {mode!r}")
        self.mode = mode
        attributes = len(COLOURS) + len(KINDS) + 1  # each colour, each kind, all shapes
        self.count = nn.Parameter(torch.randn(attributes, MAX_COUNT + 1, dim) * 0.02)
        self.colour = nn.Parameter(torch.randn(len(COLOURS), dim) * 0.02)
        self.kind = nn.Parameter(torch.randn(len(KINDS), dim) * 0.02)
        self.background = nn.Parameter(torch.randn(dim) * 0.02)
        self.blank = nn.Parameter(torch.randn(dim) * 0.02)

    def _count(self, attribute: int, n: int) -> torch.Tensor:
        return self.count[attribute, min(n, MAX_COUNT)]

    def forward(self, objects: list[dict[str, Any]], centres: list[tuple[float, float] | None],
                global_tokens: int) -> torch.Tensor:
        """[len(centres), dim]: features of the first `global_tokens` tokens (the global view, newlines
        included, whose centre is None), `blank` elsewhere."""
        colours = Counter(o["color"] for o in objects)
        kinds = Counter(o["shape"] for o in objects)
        total = self._count(len(COLOURS) + len(KINDS), len(objects))
        if self.mode == "scene":
            counts = torch.tensor([colours[c] for c in COLOURS] + [kinds[k] for k in KINDS] + [len(objects)])
            scene = self.count[torch.arange(len(counts)), counts.clamp(max=MAX_COUNT)].sum(dim=0)
        rows = []
        for index, centre in enumerate(centres):
            if index >= global_tokens or centre is None:
                rows.append(self.blank)
            elif self.mode == "scene":
                rows.append(scene)
            else:
                rows.append(total + self._object_feature(objects, centre, colours, kinds))
        return self.scale * torch.stack(rows)

    def _object_feature(self, objects: list[dict[str, Any]], centre: tuple[float, float],
                        colours: Counter, kinds: Counter) -> torch.Tensor:
        x, y = centre
        for o in objects:
            x1, y1, x2, y2 = o["box"]
            if x1 <= x <= x2 and y1 <= y <= y2:
                # a garbled token is wrong throughout: it names the other colour and that colour's count
                c = self._garble(COLOURS.index(o["color"]), len(COLOURS), self.colour_noise)
                k = self._garble(KINDS.index(o["shape"]), len(KINDS), self.kind_noise)
                return (self.colour[c] + self.kind[k] + self._count(c, colours[COLOURS[c]])
                        + self._count(len(COLOURS) + k, kinds[KINDS[k]]))
        return self.background

    def embed(self, record: dict[str, Any], centres: list[tuple[float, float] | None], global_tokens: int
              ) -> torch.Tensor:
        features = self(record["objects"], centres, global_tokens)
        if not self.tower_mix:
            return features
        tokens = record["image_tokens"]
        return features + self.tower_mix * _rms(features).detach() / _rms(tokens) * tokens

    def _garble(self, index: int, choices: int, noise: float) -> int:
        """`index`, or with probability `noise` one of the other `choices`."""
        if noise and self.rng.random() < noise:
            return (index + self.rng.randrange(1, choices)) % choices
        return index


def _rms(x: torch.Tensor) -> torch.Tensor:
    return x.pow(2).mean().sqrt()


class TowerFeatures:
    """The image tokens of a checkpoint's frozen vision tower and projector, made once per record by
    `prepare` (kept in the record as `image_tokens`) so that training pays for no vision forward."""

    def __init__(self, folder: Path) -> None:
        self.model = load_model(folder).eval().requires_grad_(False)

    @torch.no_grad()
    def prepare(self, record: dict[str, Any], sample: Sample) -> None:
        crop = tuple(int(v) for v in sample.images_spatial_crop[0])
        record["image_tokens"] = self.model.image_embeddings(sample.pixel_values, [crop])[0]

    def embed(self, record: dict[str, Any], centres: list[tuple[float, float] | None], global_tokens: int
              ) -> torch.Tensor:
        return record["image_tokens"]

    def whiten(self, examples: list, rms: float = 1.0) -> None:
        """Map every prepared record's tokens by the ZCA whitening of these examples' tokens (mean removed,
        every direction given the same variance, scaled to `rms`): an affine map, which the projector's
        last linear layer could absorb."""
        tokens = torch.cat([record["image_tokens"] for record, _, _ in examples]).double()
        self.mean = tokens.mean(0)
        values, vectors = torch.linalg.eigh(torch.cov((tokens - self.mean).T))
        self.matrix = (vectors * values.clamp(min=1e-6).rsqrt()) @ vectors.T * rms

    def rescale(self, rms: float, fit: list, *others: list) -> float:
        """Multiply the prepared tokens of `fit` and `others` by the one factor that gives `fit`'s tokens RMS
        `rms` (the text embeddings' is ~0.026; the default recipe's `token_scale` extension does this to a model)."""
        factor = rms / _rms(torch.cat([record["image_tokens"] for record, _, _ in fit])).item()
        for examples in (fit, *others):
            for record, _, _ in examples:
                record["image_tokens"] = record["image_tokens"] * factor
        return factor

    def apply_whitening(self, examples: list) -> None:
        for record, _, _ in examples:
            record["image_tokens"] = ((record["image_tokens"].double() - self.mean) @ self.matrix).float()


def make_examples(processor: Processor, n: int, seed: int, split: str, questions: str,
                  tower: TowerFeatures | None = None
                  ) -> list[tuple[dict[str, Any], Sample, list[tuple[float, float] | None]]]:
    """Counting records of (seed, split) of the asked question kind, each with its encoded sample
    (pixels dropped: the features come from the objects, or from `tower`, which sees them first) and the
    0..999 centre of every image token."""
    out = []
    tile = processor.tile_size
    side = processor.tokens_per_side
    for record, image in generate_records(n, seed, split, ["counting"]):
        if questions != "all" and question_kind(record) != questions:
            continue
        sample = processor.encode(record["messages"], [image], inference=False)
        columns, rows = (int(v) for v in sample.images_spatial_crop[0])
        centres = image_token_centres(image.width, image.height, columns * tile, rows * tile, tile, side)
        if len(centres) != int(sample.images_seq_mask.sum()):
            raise RuntimeError("the image-token layout and the processor disagree")
        if tower is not None:
            tower.prepare(record, sample)
        sample.pixel_values = sample.pixel_values[:0].clone()  # a view would keep every pixel alive
        out.append((record, sample, centres))
    return out


def relevance_labels(record: dict[str, Any], centres: list[tuple[float, float] | None], global_tokens: int
                     ) -> list[tuple[int, float]]:
    """(index among the image tokens, 1.0 if on a shape the question counts else 0.0) for every global-view
    token whose centre lies in the image."""
    query = record.get("query") or {}
    wanted = [o for o in record["objects"] if all(o[key] == value for key, value in query.items())]
    labels = []
    for index, centre in enumerate(centres[:global_tokens]):
        if centre is not None:
            x, y = centre
            on = any(o["box"][0] <= x <= o["box"][2] and o["box"][1] <= y <= o["box"][3] for o in wanted)
            labels.append((index, float(on)))
    return labels


class KeptHidden:
    """Keeps the hidden states a decoder layer returned in the last forward."""

    def __init__(self, layer: nn.Module) -> None:
        self.hidden: torch.Tensor | None = None
        layer.register_forward_hook(self._keep)

    def _keep(self, module: nn.Module, args: tuple, output: LayerOutput) -> None:
        self.hidden = output.hidden


def forward(model: DeepseekVL2, processor: Processor, features: ExactFeatures | TowerFeatures, examples: list,
            relevance: KeptHidden | None = None) -> tuple[torch.Tensor, torch.Tensor, tuple | None]:
    """Logits [B, T, V] and labels [B, T] of a left-padded batch whose image tokens are exact features,
    and with `relevance` the relevance logits and 0/1 labels of the global-view tokens that show the image."""
    batch = processor.batch([sample for _, sample, _ in examples])
    side = processor.tokens_per_side
    embeds = [features.embed(record, centres, side * (side + 1)) for record, _, centres in examples]
    inputs = model.embed_with_images(batch.input_ids, batch.images_seq_mask, embeds)
    out = model(inputs_embeds=inputs, attention_mask=batch.attention_mask)
    if relevance is None:
        return out.logits, batch.labels, None
    logits, targets = [], []
    for row, (record, _, centres) in enumerate(examples):
        positions = batch.images_seq_mask[row].nonzero().flatten()
        labelled = relevance_labels(record, centres, side * (side + 1))
        logits.append(relevance_logits(relevance.hidden[row, positions[[i for i, _ in labelled]]]))
        targets.append(torch.tensor([label for _, label in labelled]))
    return out.logits, batch.labels, (torch.cat(logits), torch.cat(targets))


def answer_positions(labels: torch.Tensor) -> torch.Tensor:
    """Index of each row's first labelled token after the first one (the BOS): the answer's first token."""
    labelled = labels != -100
    first = labelled.int().argmax(dim=1)
    labelled[torch.arange(labels.shape[0]), first] = False
    return labelled.int().argmax(dim=1)


@torch.no_grad()
def evaluate(model: DeepseekVL2, processor: Processor, features: ExactFeatures | TowerFeatures, examples: list,
             relevance: KeptHidden | None = None) -> dict[str, float]:
    model.eval()
    right: Counter = Counter()
    total: Counter = Counter()
    for start in range(0, len(examples), 16):
        chunk = examples[start:start + 16]
        logits, labels, scored = forward(model, processor, features, chunk, relevance)
        if scored is not None:
            right["relevance"] += int(((scored[0] > 0).float() == scored[1]).sum())
            total["relevance"] += scored[1].numel()
            right["relevance_majority"] += int((scored[1] == 0).sum())
        positions = answer_positions(labels)
        rows = torch.arange(len(chunk))
        predicted = logits[rows, positions - 1].argmax(-1)
        for (record, _, _), hit in zip(chunk, (predicted == labels[rows, positions]).tolist(), strict=True):
            kind = question_kind(record)
            total[kind] += 1
            right[kind] += int(hit)
    model.train()
    scores = {kind: right[kind] / total[kind] for kind in QUESTION_KINDS if total[kind]}
    scores["all"] = sum(right[kind] for kind in QUESTION_KINDS) / max(sum(total[kind] for kind in QUESTION_KINDS), 1)
    if total["relevance"]:
        scores["relevance"] = right["relevance"] / total["relevance"]
        scores["relevance_majority"] = right["relevance_majority"] / total["relevance"]
    return scores


def majority_scores(examples: list) -> dict[str, float]:
    """Accuracy of always answering the most common answer of each question kind (of these examples)."""
    by_kind: dict[str, Counter] = {}
    for record, _, _ in examples:
        by_kind.setdefault(question_kind(record), Counter())[record["answers"][0]] += 1
    scores = {kind: c.most_common(1)[0][1] / sum(c.values()) for kind, c in by_kind.items()}
    scores["all"] = sum(c.most_common(1)[0][1] for c in by_kind.values()) / max(len(examples), 1)
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", choices=("scene", "object", "tower"), default="scene")
    parser.add_argument("--tower", type=Path, default=None,
                        help="checkpoint whose vision tower and projector make the tower features (default model)")
    parser.add_argument("--questions", choices=("all", *QUESTION_KINDS), default="all")
    parser.add_argument("--token-relevance", type=int, default=None, metavar="LAYER",
                        help="add the token-relevance loss at this decoder layer's output")
    parser.add_argument("--relevance-weight", type=float, default=1.0)
    parser.add_argument("--freeze-features", action="store_true", help="the features keep their random values")
    parser.add_argument("--feature-scale", type=float, default=1.0, help="multiply every feature by this")
    parser.add_argument("--tower-mix", type=float, default=0.0, metavar="X",
                        help="add the tower's tokens to the exact features at X times their RMS")
    parser.add_argument("--whiten", type=float, default=None, metavar="RMS",
                        help="whiten the tower features to this RMS (see TowerFeatures.whiten)")
    parser.add_argument("--tower-rms", type=float, default=None, metavar="RMS",
                        help="scale the tower features to this RMS (see TowerFeatures.rescale)")
    parser.add_argument("--colour-noise", type=float, default=0.0,
                        help="probability that an object token names a wrong colour (object features)")
    parser.add_argument("--kind-noise", type=float, default=0.0,
                        help="probability that an object token names a wrong kind (object features)")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--n-train", type=int, default=6000, help="counting records generated (before the filter)")
    parser.add_argument("--n-test", type=int, default=400)
    parser.add_argument("--eval-every", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.whiten is not None and args.features != "tower":
        parser.error("--whiten applies to --features tower")
    if args.tower_rms is not None and (args.features != "tower" or args.whiten is not None):
        parser.error("--tower-rms applies to --features tower without --whiten")
    if args.tower_mix and args.features == "tower":
        parser.error("--tower-mix applies to exact features (scene, object)")
    if (args.colour_noise or args.kind_noise) and args.features != "object":
        parser.error("--colour-noise and --kind-noise apply to --features object")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)

    folder = default_model_dir()
    raw = load_json(folder / "config.json")
    model = init_weights(build_model(model_config_from_dict(raw), device="cpu"), seed=args.seed)
    processor = Processor.from_pretrained(folder)
    tower = TowerFeatures(args.tower or folder) if args.features == "tower" or args.tower_mix else None
    if tower is not None and tower.model.cfg != model.cfg:
        raise SystemExit(f"--tower {args.tower}: its configuration differs from the default model's")
    exact = args.features != "tower"
    features = ExactFeatures(model.cfg.language.hidden_size, args.features, args.feature_scale, args.colour_noise,
                             args.kind_noise, args.seed, args.tower_mix) if exact else tower
    if exact:
        features.requires_grad_(not args.freeze_features)

    started = time.perf_counter()
    train = make_examples(processor, args.n_train, 1, "train", args.questions, tower)
    test = make_examples(processor, args.n_test, 7, "test", args.questions, tower)
    print(f"{len(train)} train and {len(test)} test questions in {time.perf_counter() - started:.0f}s")
    if args.whiten is not None:
        tower.whiten(train, args.whiten)
        tower.apply_whitening(train)
        tower.apply_whitening(test)
    if args.tower_rms is not None:
        tower.rescale(args.tower_rms, train, test)

    params = [p for name, p in model.named_parameters() if name.startswith("language.")]
    params += list(features.parameters()) if exact and not args.freeze_features else []
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.05)
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 50))
    relevance = None
    if args.token_relevance is not None:
        relevance = KeptHidden(model.language.model.layers[args.token_relevance])
    history = []
    started = time.perf_counter()
    for step in range(1, args.steps + 1):
        logits, labels, scored = forward(model, processor, features, rng.sample(train, min(args.batch, len(train))),
                                         relevance)
        loss = shifted_cross_entropy(logits, labels)
        if scored is not None:
            loss = loss + args.relevance_weight * F.binary_cross_entropy_with_logits(*scored)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        warmup.step()
        if step % args.eval_every == 0 or step == args.steps:
            scores = evaluate(model, processor, features, test, relevance)
            history.append({"step": step, "seconds": round(time.perf_counter() - started, 1), **scores})
            print(f"step {step}: " + ", ".join(f"{k} {v:.2f}" for k, v in scores.items()), flush=True)

    majority = majority_scores(test)
    final = history[-1] if history else {}
    print(f"\n{'questions':<10}{'n':>6}{'accuracy':>10}{'majority':>10}")
    for kind in (*QUESTION_KINDS, "all"):
        if kind in majority:
            n = len(test) if kind == "all" else sum(question_kind(r) == kind for r, _, _ in test)
            print(f"{kind:<10}{n:>6}{final.get(kind, float('nan')):>10.2f}{majority[kind]:>10.2f}")
    result = {
        "benchmark": "reader", "features": args.features, "questions": args.questions, "steps": args.steps,
        "token_relevance": args.token_relevance, "relevance_weight": args.relevance_weight,
        "freeze_features": args.freeze_features, "feature_scale": args.feature_scale,
        "colour_noise": args.colour_noise, "kind_noise": args.kind_noise, "whiten": args.whiten,
        "tower_rms": args.tower_rms, "tower_mix": args.tower_mix,
        "tower": str(args.tower) if args.tower else None,
        "batch": args.batch, "lr": args.lr, "train_questions": len(train), "test_questions": len(test),
        "accuracy": {k: v for k, v in final.items() if k not in ("step", "seconds")}, "majority": majority,
        "history": history, "threads": torch.get_num_threads(), "machine": platform.machine(),
        "cpus": os.cpu_count(), "torch": torch.__version__,
    }
    suffix = "" if args.token_relevance is None else f"-relevance{args.token_relevance}"
    out = args.out or Path(__file__).parent / "results" / f"reader-{args.features}-{args.questions}{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
