"""The routing function for every gate, and expert mixing."""

from __future__ import annotations

import pytest
import torch

from dsvl2.language.moe import MLP, route, run_experts


def test_greedy_route_picks_best_scores() -> None:
    scores = torch.tensor([[0.1, 0.5, 0.2, 0.9]])
    weights, idx = route(scores, 2, "greedy")
    assert sorted(idx[0].tolist()) == [1, 3]
    assert sorted(weights[0].tolist()) == pytest.approx([0.5, 0.9])


def test_run_experts_mixes_the_chosen_experts_for_one_token_and_for_many() -> None:
    torch.manual_seed(0)
    experts = torch.nn.ModuleList(MLP(8, 4) for _ in range(5))
    x = torch.randn(3, 8)
    indices = torch.tensor([[4, 1], [1, 2], [0, 4]])
    weights = torch.rand(3, 2)
    expected = torch.stack([sum(weights[n, j] * experts[int(indices[n, j])](x[n]) for j in range(2))
                            for n in range(3)])
    with torch.no_grad():
        together = run_experts(experts, x, weights, indices)
        alone = torch.cat([run_experts(experts, x[n:n + 1], weights[n:n + 1], indices[n:n + 1]) for n in range(3)])
    torch.testing.assert_close(together, expected)
    torch.testing.assert_close(alone, expected)


def test_group_limited_greedy_only_uses_best_groups() -> None:
    # groups of two experts: g0 = (0.30, 0.29), g1 = (0.31, 0.02), g2 = (0.05, 0.05)
    scores = torch.tensor([[0.30, 0.29, 0.31, 0.02, 0.05, 0.05]])
    _, idx = route(scores, 2, "group_limited_greedy", n_group=3, topk_group=1)
    assert sorted(idx[0].tolist()) == [2, 3]  # only group 1 survives: its best expert scores highest
    _, idx = route(scores, 2, "group_limited_greedy", n_group=3, topk_group=2)
    assert sorted(idx[0].tolist()) == [0, 2]


def test_noaux_tc_selects_with_bias_but_weights_without() -> None:
    scores = torch.tensor([[0.9, 0.8, 0.1, 0.2]])
    bias = torch.tensor([0.0, 0.0, 5.0, 0.0])
    weights, idx = route(scores, 2, "noaux_tc", n_group=2, topk_group=2, correction_bias=bias)
    chosen = dict(zip(idx[0].tolist(), weights[0].tolist(), strict=True))
    assert set(chosen) == {0, 2}  # expert 2 is chosen only because of its bias
    assert chosen[2] == pytest.approx(0.1)  # ...but weighted by its raw score
    # group ranking uses the sum of the two best corrected scores: group 1 = 5.1 + 0.2 beats 0.9 + 0.8
    _, idx = route(scores, 2, "noaux_tc", n_group=2, topk_group=1, correction_bias=bias)
    assert sorted(idx[0].tolist()) == [2, 3]
