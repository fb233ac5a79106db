"""The MoE balance losses on small cases worked by hand.

The official values, on the conformance checkpoints, are checked by
tests/test_conformance.py::test_moe_aux_loss_per_layer_and_summed.
"""

from __future__ import annotations

import pytest
import torch

from dsvl2.language.moe import sequence_aux_loss, token_aux_loss


def test_single_sequence_worked_by_hand() -> None:
    # T=2, E=2, k=1: expert 0 chosen twice -> f = (2, 0); P = (0.7, 0.3); sum f*P = 1.4.
    scores = torch.tensor([[0.6, 0.4], [0.8, 0.2]])
    indices = torch.tensor([[0], [0]])
    assert sequence_aux_loss(scores, indices, batch=1, alpha=0.5).item() == pytest.approx(0.7)


def test_two_sequences_two_experts_per_token_worked_by_hand() -> None:
    # E=3, k=2, T=2 per sequence, so f_e = count_e * 3 / 4.
    # Sequence 1: counts (1, 2, 1) -> f = (0.75, 1.5, 0.75); P = (0.35, 0.4, 0.25); sum f*P = 1.05.
    # Sequence 2: counts (2, 2, 0) -> f = (1.5, 1.5, 0); P = (0.65, 0.25, 0.1); sum f*P = 1.35.
    # alpha 0.1 * mean(1.05, 1.35) = 0.12.
    scores = torch.tensor([[0.5, 0.3, 0.2], [0.2, 0.5, 0.3], [0.6, 0.3, 0.1], [0.7, 0.2, 0.1]])
    indices = torch.tensor([[0, 1], [1, 2], [0, 1], [0, 1]])
    assert sequence_aux_loss(scores, indices, batch=2, alpha=0.1).item() == pytest.approx(0.12)


def test_sequences_are_balanced_separately() -> None:
    # Two sequences each routed entirely to a different expert: the batch as a whole is balanced,
    # but each sequence is not, so the sequence-level loss is larger than the token-level one.
    scores = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.1, 0.9], [0.1, 0.9]])
    indices = torch.tensor([[0], [0], [1], [1]])
    seq = sequence_aux_loss(scores, indices, batch=2, alpha=1.0).item()
    tok = token_aux_loss(scores, indices, alpha=1.0).item()
    assert seq == pytest.approx(1.8)  # per sequence f = (2, 0), P = (0.9, 0.1)
    assert tok == pytest.approx(1.0)  # f = (1, 1), P = (0.5, 0.5)
