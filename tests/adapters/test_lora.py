"""LoRA layers: zero B is the base, merging gives the adapter's logits, targets match as peft matches them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dsvl2.adapters.lora import (
    ALL_LINEAR,
    AdapterError,
    LoraLinear,
    LoraSettings,
    apply_lora,
    freeze_all_but_adapter,
    lora_layers,
    matches,
    merge_lora,
    selection_of,
)
from dsvl2.checkpoint import load_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _randomise(model: nn.Module, name: str = "default", seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            if name not in layer.adapters:
                continue
            pair = layer.adapters[name]
            pair.lora_B.weight.copy_(torch.randn(pair.lora_B.weight.shape, generator=generator) * 0.05)


def _logits(model: nn.Module, adapter: str | None = "default") -> torch.Tensor:
    ids = torch.arange(3, 19).view(2, 8)
    selection = selection_of(model)
    context = selection.use(adapter) if selection is not None else torch.no_grad()
    with torch.no_grad(), context:
        return model(input_ids=ids).logits


def test_zero_b_lora_layer_equals_the_base_layer() -> None:
    base = nn.Linear(12, 7)
    x = torch.randn(3, 5, 12)
    expected = base(x)
    model = nn.Sequential(base)
    apply_lora(model, LoraSettings(r=4, target_modules=("0",)))
    layer = model[0]
    assert isinstance(layer, LoraLinear) and layer.base is base
    with selection_of(model).use("default"):
        assert torch.equal(model(x), expected)
        layer.adapters["default"].lora_B.weight.data.fill_(0.1)  # a non-zero B must change the output
        assert not torch.allclose(model(x), expected)


@pytest.mark.parametrize("variant", ["tiny_like", "small_like", "base_like"])
def test_merged_weights_give_the_logits_of_base_plus_adapter(conf_dir, variant: str) -> None:
    model = load_model(conf_dir / variant)
    base_logits = _logits(model)
    targets = apply_lora(model, LoraSettings(r=4, alpha=8, target_modules=ALL_LINEAR))
    assert "language.lm_head" not in targets and any(".experts." in t for t in targets)
    assert torch.equal(_logits(model), base_logits)  # B starts at zero
    _randomise(model)
    adapted = _logits(model)
    assert not torch.allclose(adapted, base_logits, atol=1e-3)
    assert torch.equal(_logits(model, None), base_logits)  # no adapter selected: the base model
    assert merge_lora(model) == len(targets)
    assert not list(lora_layers(model))
    assert {n for n, _ in model.named_parameters()} == {n for n, _ in load_model(conf_dir / variant).named_parameters()}
    torch.testing.assert_close(_logits(model), adapted, atol=1e-4, rtol=1e-4)


def test_absorbed_attention_reads_the_adapted_kv_b_weight(conf_dir) -> None:
    """Decoding reads kv_b_proj's weight directly (absorbed MLA): it must be the adapted one."""
    from dsvl2.engine.cache import KVCache

    model = load_model(conf_dir / "small_like")
    apply_lora(model, LoraSettings(r=4, target_modules=("kv_b_proj",)))
    _randomise(model)
    embeds = model.embed_tokens(torch.arange(3, 9)[None])
    positions = torch.arange(6)[None]
    with torch.no_grad(), selection_of(model).use("default"):
        outs = []
        for absorbed in (False, True):
            cache = KVCache(model.cfg.language, 1, 16)
            model.decode_step(embeds[:, :5], positions[:, :5], cache, torch.tensor([0]), absorbed=False)
            outs.append(model.decode_step(embeds[:, 5:], positions[:, 5:], cache, torch.tensor([0]), absorbed=absorbed))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-4, rtol=1e-4)


def test_targets_match_as_peft_matches_them() -> None:
    name = "language.model.layers.3.self_attn.q_proj"
    assert matches(["q_proj"], name) and matches(["self_attn.q_proj"], name)
    assert not matches(["proj"], name)  # a list entry matches whole name parts
    assert matches(r".*\.3\.self_attn\.q_proj", name) and not matches(r"q_proj", name)  # a regex: the whole name
    assert matches(ALL_LINEAR, name) and not matches(ALL_LINEAR, "language.lm_head")


def test_unknown_target_names_and_bad_settings_are_named(conf_dir) -> None:
    model = load_model(conf_dir / "tiny_like")
    with pytest.raises(AdapterError, match=r"\['kv_b_proj'\] match no linear layer"):
        apply_lora(model, LoraSettings(target_modules=("q_proj", "kv_b_proj")))
    with pytest.raises(AdapterError, match="rank r must be >= 1"):
        LoraSettings(r=0)
    with pytest.raises(AdapterError, match="not a regular expression"):
        LoraSettings(target_modules="(q_proj")


def test_only_the_adapter_trains(conf_dir) -> None:
    model = load_model(conf_dir / "tiny_like")
    apply_lora(model, LoraSettings(r=2, target_modules=("q_proj", "down_proj")))
    trainable = freeze_all_but_adapter(model)
    assert trainable and all(".adapters.default.lora_" in n for n, _ in trainable)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {n for n, _ in trainable}


def test_several_adapters_share_one_base(conf_dir) -> None:
    model = load_model(conf_dir / "tiny_like")
    apply_lora(model, LoraSettings(r=2, target_modules=("q_proj",)), "a")
    apply_lora(model, LoraSettings(r=3, target_modules=("q_proj", "o_proj")), "b")
    _randomise(model, "a", seed=1)
    _randomise(model, "b", seed=2)
    layers = dict(lora_layers(model))
    assert {set(layer.adapters) == {"a", "b"} for path, layer in layers.items() if path.endswith("q_proj")} == {True}
    assert all(list(layer.adapters) == ["b"] for path, layer in layers.items() if path.endswith("o_proj"))
    assert not torch.allclose(_logits(model, "a"), _logits(model, "b"))
    with pytest.raises(AdapterError, match="no adapter named 'c'; loaded: a, b"):
        _logits(model, "c")
