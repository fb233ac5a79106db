"""The model against the official implementation's outputs on the conformance checkpoints.

Inputs are the fixtures' own processor outputs (input_ids, tiles, masks), so a failure here is
a model bug, independent of our processor. Tolerances are the conformance README's.
"""

from __future__ import annotations

import json
from functools import cache

import pytest
import torch
from safetensors.torch import load_file

from dsvl2.checkpoint import load_model
from dsvl2.language.moe import MoE
from dsvl2.model import DeepseekVL2
from tests.conformance_data import conformance_cases, conformance_dir, conformance_variants

VARIANTS = conformance_variants()
CASES = list(conformance_cases())


@cache
def model(variant: str, dtype: torch.dtype = torch.float32) -> DeepseekVL2:
    return load_model(conformance_dir() / variant, dtype=dtype)


@cache
def processor_fixture() -> dict[str, torch.Tensor]:
    return load_file(conformance_dir() / "processor.safetensors")


@cache
def outputs(variant: str) -> dict[str, torch.Tensor]:
    return load_file(conformance_dir() / variant / "outputs.safetensors")


def case_inputs(case: str) -> dict[str, torch.Tensor | None]:
    proc = processor_fixture()
    info = conformance_cases()[case]
    tiles = None
    if info["num_image_tokens"]:
        tiles = (proc[info["tiles"]].float() / 255 - 0.5) / 0.5
        tiles = tiles[None]
    return {
        "input_ids": proc[f"{case}.input_ids"][None],
        "images": tiles,
        "images_seq_mask": proc[f"{case}.images_seq_mask"][None].bool(),
        "images_spatial_crop": proc[f"{case}.images_spatial_crop"][None],
    }


@cache
def forward(variant: str, case: str, dtype: torch.dtype = torch.float32):
    with torch.no_grad():
        return model(variant, dtype)(**case_inputs(case), output_hidden_states=True)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()


pytestmark = pytest.mark.skipif(not VARIANTS, reason=f"no conformance fixtures at {conformance_dir()}")


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", CASES)
def test_inputs_embeds(variant: str, case: str) -> None:
    m = model(variant)
    with torch.no_grad():
        embeds = m.embed_inputs(**case_inputs(case))
    assert max_diff(embeds[0], outputs(variant)[f"{case}.inputs_embeds"]) <= 1e-4


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", CASES)
def test_logits(variant: str, case: str) -> None:
    logits = forward(variant, case).logits[0]
    ref = outputs(variant)
    assert max_diff(logits[-4:], ref[f"{case}.logits_last4"]) <= 1e-3
    assert max_diff(logits.logsumexp(-1), ref[f"{case}.logits_logsumexp"]) <= 1e-3
    agree = (logits.argmax(-1) == ref[f"{case}.logits_argmax"]).float().mean().item()
    assert agree >= 0.995


@pytest.mark.parametrize("variant", VARIANTS)
def test_hidden_states_per_layer(variant: str) -> None:
    ref = outputs(variant)
    for case in ("text_only", "one_square"):
        if f"{case}.hidden_states" not in ref:
            continue
        ours = torch.stack([h[0] for h in forward(variant, case).hidden_states])
        for layer, (a, b) in enumerate(zip(ours, ref[f"{case}.hidden_states"], strict=True)):
            assert max_diff(a, b) <= 1e-4, f"{case}: layer {layer} differs first"


@pytest.mark.parametrize("variant", VARIANTS)
def test_vision_features_and_projector(variant: str) -> None:
    ref = outputs(variant)
    m = model(variant)
    tiles = case_inputs("one_wide")["images"][0]
    with torch.no_grad():
        features = m.vision(tiles)
        projected = m.projector(features)
    assert max_diff(features, ref["one_wide.vision_features"]) <= 1e-4
    assert max_diff(projected, ref["one_wide.projector_output"]) <= 1e-4


def training_loss_inputs(variant: str) -> tuple[dict, dict]:
    """The `_loss` conversation: its ids and labels from cases.json, its image's tiles from the
    `multi_turn` case, which shows the same photo alone in its prompt (same tiling)."""
    cases = json.loads((conformance_dir() / variant / "cases.json").read_text())
    ids = torch.tensor(cases["_loss"]["input_ids"])[None]
    proc = processor_fixture()
    assert cases["_loss"]["images"] == conformance_cases()["multi_turn"]["conversation"][0]["images"]
    inputs = {
        "input_ids": ids,
        "images": case_inputs("multi_turn")["images"],
        "images_seq_mask": ids == int(proc["multi_turn.input_ids"][proc["multi_turn.images_seq_mask"].bool()][0]),
        "images_spatial_crop": proc["multi_turn.images_spatial_crop"][None],
        "labels": torch.tensor(cases["_loss"]["labels"])[None],
    }
    return inputs, cases


@pytest.mark.parametrize("variant", VARIANTS)
def test_training_loss(variant: str) -> None:
    inputs, cases = training_loss_inputs(variant)
    with torch.no_grad():
        out = model(variant)(**inputs)
    assert abs(out.loss.item() - cases["_loss"]["loss"]) <= 1e-4


def aux_loss_inputs(variant: str) -> tuple[dict, dict | None]:
    """The `_aux_loss` conversation's ids and attention mask from cases.json, its image's tiles from the
    `one_square` case, which shows the same image alone in its prompt (same tiling)."""
    fixture = json.loads((conformance_dir() / variant / "cases.json").read_text())["_aux_loss"]
    if fixture is None:
        return {}, None
    square = conformance_cases()["one_square"]
    assert [fixture["images"]] == [m["images"] for m in square["conversation"] if "images" in m]
    ids = torch.tensor(fixture["input_ids"])[None]
    prompt = case_inputs("one_square")
    image_token = int(prompt["input_ids"][prompt["images_seq_mask"]][0])
    inputs = {
        "input_ids": ids,
        "images": prompt["images"],
        "images_seq_mask": ids == image_token,
        "images_spatial_crop": prompt["images_spatial_crop"],
        "attention_mask": torch.tensor(fixture["attention_mask"], dtype=torch.long)[None],
    }
    assert torch.equal(ids[0, : prompt["input_ids"].shape[1]], prompt["input_ids"][0])  # the prompt, then the answer
    return inputs, fixture


# The README's bound for losses, 1e-4, exceeds these values (~0.0016 per layer); float32 reproduces them to
# about 1e-9, so they are compared to 1e-4 of their size.
AUX_LOSS_RELATIVE = 1e-4


@pytest.mark.parametrize("variant", VARIANTS)
def test_moe_aux_loss_per_layer_and_summed(variant: str) -> None:
    inputs, fixture = aux_loss_inputs(variant)
    m = load_model(conformance_dir() / variant).train()  # the balance loss exists in training mode only
    layer_losses = []
    for layer in m.language.model.layers:
        if isinstance(layer.mlp, MoE):
            layer.mlp.register_forward_hook(lambda _module, _args, output: layer_losses.append(output[1]))
    with torch.no_grad():
        out = m(**inputs) if fixture is not None else m(**case_inputs("one_square"))
    if fixture is None:  # base_like: a noaux_tc gate is balanced by its correction bias, with no loss
        assert out.aux_loss is None and all(loss is None for loss in layer_losses)
        return
    ours = [loss.item() for loss in layer_losses]
    assert len(ours) == len(fixture["per_layer"])
    for layer, (a, b) in enumerate(zip(ours, fixture["per_layer"], strict=True)):
        assert abs(a - b) <= AUX_LOSS_RELATIVE * b, f"MoE layer {layer}: {a} against {b}"
    assert abs(out.aux_loss.item() - fixture["sum"]) <= AUX_LOSS_RELATIVE * fixture["sum"]


# Measured on these checkpoints (bfloat16 weights and activations against the float32 reference,
# all cases): max |logit difference| over the last four positions 0.08 (tiny_like), 0.31
# (small_like), 0.74 (base_like); logsumexp within 0.06; argmax agreement >= 0.88, the rest
# being near-ties of random weights and MoE routing flips. The bounds leave ~35% headroom.
BF16_TOLERANCE = {"last4": 1.0, "logsumexp": 0.08, "argmax": 0.85}
# bfloat16 matmuls are slow on CPUs without native support: three cases keep the check affordable.
BF16_CASES = [c for c in ("text_only", "one_square", "system_turn") if c in CASES]


@pytest.mark.parametrize("variant", VARIANTS)
def test_bfloat16_logits_within_measured_tolerance(variant: str) -> None:
    ref = outputs(variant)
    for case in BF16_CASES:
        logits = forward(variant, case, torch.bfloat16).logits[0].float()
        assert max_diff(logits[-4:], ref[f"{case}.logits_last4"]) <= BF16_TOLERANCE["last4"], case
        lse = (logits.logsumexp(-1) - ref[f"{case}.logits_logsumexp"]).abs().max().item()
        assert lse <= BF16_TOLERANCE["logsumexp"], case
        agree = (logits.argmax(-1) == ref[f"{case}.logits_argmax"]).float().mean().item()
        assert agree >= BF16_TOLERANCE["argmax"], case
