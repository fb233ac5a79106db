"""FusedExperts: a MoE layer's selected routed experts and its shared experts in one call of the C++ kernels
give what the layer computes expert by expert, and the layer falls back to that path wherever the fused call
does not apply (gradients, a layer replaced after fusing, float experts)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dsvl2.config import LanguageConfig
from dsvl2.language.moe import MoE
from dsvl2.quant import kernels
from dsvl2.quant.experts import FusedExperts, fuse_experts
from dsvl2.quant.linear import quantize_module
from dsvl2.quant.scheme import QuantScheme

SCHEMES = [QuantScheme(8), QuantScheme(4, 32), QuantScheme(4, 64)]
IDS = ["int8", "int4-g32", "int4-g64"]


@pytest.fixture(autouse=True)
def cpp_kernels(monkeypatch):
    monkeypatch.setenv(kernels.ENV_KERNEL, "auto")
    lib, line = kernels.extension()
    if lib is None:
        pytest.skip(line)


def moe_layer(scheme: QuantScheme, shared: int | None = 2, experts: int = 8, seed: int = 0) -> MoE:
    cfg = LanguageConfig(hidden_size=128, moe_intermediate_size=128, n_routed_experts=experts,
                         num_experts_per_tok=3, n_shared_experts=shared, norm_topk_prob=True)
    torch.manual_seed(seed)
    moe = MoE(cfg).eval()
    for p in moe.parameters():
        p.data.normal_(0, 0.1)
    quantize_module(moe, scheme, prefix="language.model.layers.1.mlp")
    return moe


def both_paths(moe: MoE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        fused = moe(x)[0]
        kept, moe.fused = moe.fused, None
        reference = moe(x)[0]
        moe.fused = kept
    return fused, reference


@pytest.mark.parametrize("scheme", SCHEMES, ids=IDS)
@pytest.mark.parametrize("shared", [2, None], ids=["shared", "no-shared"])
@pytest.mark.parametrize("tokens", [1, 5, 70])
def test_fused_equals_expert_by_expert(scheme, shared, tokens):
    moe = moe_layer(scheme, shared)
    assert fuse_experts(moe) == 1 and moe.fused is not None
    x = torch.randn(2, tokens, 128)
    fused, reference = both_paths(moe, x)
    assert fused.shape == reference.shape == x.shape
    # Both quantize each activation row the same way; only the order of float32 sums differs.
    torch.testing.assert_close(fused, reference, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_in_16_bit_activations(dtype):
    moe = moe_layer(QuantScheme(4, 32))
    fuse_experts(moe)
    x = torch.randn(1, 4, 128).to(dtype)
    fused, reference = both_paths(moe, x)
    assert fused.dtype == dtype
    # The expert-by-expert path rounds each product to 16 bits; the fused one rounds the sum once.
    scale = reference.float().abs().max()
    assert (fused.float() - reference.float()).abs().max() <= 0.02 * scale


def test_gradients_run_expert_by_expert():
    moe = moe_layer(QuantScheme(8))
    fuse_experts(moe)
    x = torch.randn(1, 3, 128, requires_grad=True)
    assert not moe.fused.applies(x.view(-1, 128))
    moe(x)[0].sum().backward()
    assert x.grad is not None and bool(x.grad.abs().sum() > 0)


def test_a_layer_replaced_after_fusing_is_honoured():
    """An adapter (or anything) that wraps an expert's layer after fusing must not be skipped."""
    moe = moe_layer(QuantScheme(4, 64))
    fuse_experts(moe)
    x = torch.randn(1, 6, 128)
    before = both_paths(moe, x)[0]
    moe.experts[0].up_proj = nn.Linear(128, 128, bias=False)
    moe.shared_experts.down_proj = nn.Linear(256, 128, bias=False)
    assert not moe.fused.applies(x.view(-1, 128))
    after, reference = both_paths(moe, x)
    torch.testing.assert_close(after, reference)
    assert not torch.allclose(after, before)


def test_float_or_mixed_experts_are_not_fused():
    cfg = LanguageConfig(hidden_size=128, moe_intermediate_size=128, n_routed_experts=4, num_experts_per_tok=2,
                         n_shared_experts=1)
    moe = MoE(cfg).eval()
    assert fuse_experts(moe) == 0 and moe.fused is None
    quantize_module(moe.experts, QuantScheme(8), prefix="language.model.layers.1.mlp.experts")
    assert FusedExperts.build(moe.experts, moe.shared_experts) is None  # shared experts still float
    assert FusedExperts.build(moe.experts, None) is not None


def test_an_expert_index_outside_the_table_is_refused():
    moe = moe_layer(QuantScheme(8))
    fuse_experts(moe)
    x = torch.randn(2, 128)
    weights = torch.ones(2, 3)
    with pytest.raises(RuntimeError, match="refused"):
        moe.fused(x, weights, torch.tensor([[0, 1, 8], [2, 3, 4]]))
