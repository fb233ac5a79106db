"""benchmarks/bench_train.py --adapters: the random base is built as the trainer loads one (quantized layers
installed quantized, nothing left on the meta device) and computes finite logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dsvl2.quant.linear import QuantizedLinear
from tests.benchmarks import load_bench


@pytest.mark.parametrize(("quantize", "dtype"), [("int4", torch.float32), ("none", torch.bfloat16)])
def test_random_base_has_every_weight_and_computes(conf_dir: Path, quantize: str, dtype: torch.dtype) -> None:
    raw = json.loads((conf_dir / "small_like" / "config.json").read_text())
    model = load_bench("bench_train").random_base(raw, quantize, dtype)
    assert not any(p.is_meta for p in model.parameters())
    quantized = [n for n, m in model.named_modules() if isinstance(m, QuantizedLinear)]
    assert bool(quantized) == (quantize != "none")
    assert all(n.startswith("language.model.") or n == "language.lm_head" for n in quantized)  # lm_head: default
    assert model.language.model.layers[1].mlp.gate.weight.dtype == torch.float32  # routers stay float32
    assert model.language.model.norm.weight.eq(1).all()
    with torch.no_grad():
        logits = model(input_ids=torch.arange(3, 11)[None]).logits
    assert logits.dtype == dtype and torch.isfinite(logits.float()).all()
