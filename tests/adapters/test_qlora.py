"""QLoRA: the same LoRA layer over an int4/int8 quantized base (dsvl2.quant), trained and served."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from dsvl2.adapters.lora import LoraLinear, LoraSettings, apply_lora, freeze_all_but_adapter, selection_of
from dsvl2.engine.generate import Engine, Request
from dsvl2.engine.sampling import SamplingParams
from dsvl2.quant.linear import QuantizedLinear
from dsvl2.train.recipe import recipe_from_dict
from dsvl2.train.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("bits", [8, 4])
def test_lora_over_a_quantized_layer_trains_only_the_adapter(bits: int) -> None:
    torch.manual_seed(0)
    base = QuantizedLinear.from_weight(torch.randn(48, 64), bits, 32 if bits == 4 else None)
    model = nn.Sequential(nn.Linear(64, 64), base)
    apply_lora(model, LoraSettings(r=4, target_modules=("1",)))
    assert isinstance(model[1], LoraLinear) and model[1].base is base
    freeze_all_but_adapter(model)
    x = torch.randn(5, 64)
    with selection_of(model).use("default"):
        assert torch.equal(model(x), base(model[0](x)))  # B zero: the quantized base alone
        model(x).square().sum().backward()
        pair = model[1].adapters["default"]
        assert pair.lora_B.weight.grad.abs().sum() > 0 and model[0].weight.grad is None


def test_qlora_run_lowers_the_loss_and_its_adapter_serves_on_the_quantized_base(
        conf_dir: Path, grounding_dir: Path, tmp_path: Path) -> None:
    recipe = recipe_from_dict({
        "stage": "sft", "seed": 0,
        "model": {"checkpoint": str(conf_dir / "small_like")},
        "data": {"sources": [{"name": "g", "paths": [str(grounding_dir)]}], "shuffle_buffer": 1},
        "optimizer": {"lr": 1e-2, "weight_decay": 0.0},
        "schedule": {"kind": "constant"},
        "training": {"steps": 10, "micro_batch_size": 2, "dtype": "bfloat16", "activation_checkpointing": True},
        "output": {"dir": str(tmp_path / "out"), "save_every": 100, "progress": False},
        "adapter": {"r": 8, "alpha": 16, "quantize": "int4", "base_dtype": "bfloat16",
                    "target_modules": ["q_proj", "kv_b_proj", "o_proj", "up_proj", "down_proj"]},
    }, tmp_path)
    trainer = Trainer(recipe)
    quantized = [m for m in trainer.model.language.modules() if isinstance(m, QuantizedLinear)]
    assert quantized and all(isinstance(m, LoraLinear) for name, m in trainer.model.named_modules()
                             if name.endswith(".q_proj"))
    history = trainer.train()
    assert history[-1]["loss"] < 0.8 * history[0]["loss"]
    engine = Engine.from_pretrained(conf_dir / "small_like", dtype="float32", device="cpu", quantize="int4",
                                    adapters={"tuned": tmp_path / "out" / "checkpoint-0000010"},
                                    check_memory=False)
    request = lambda adapter: Request([{"role": "user", "content": "Hello"}], [],  # noqa: E731
                                      SamplingParams(max_new_tokens=6), adapter=adapter)
    assert engine.generate(request("tuned")).token_ids != engine.generate(request(None)).token_ids
