"""Sampling rules and stop-string handling, on hand-made logits (no model)."""

from __future__ import annotations

import pytest
import torch

from dsvl2.engine.sampling import (
    SamplingParams,
    StopStringFilter,
    apply_repetition_penalty,
    draw_from,
    filter_top_p,
    make_generator,
    sample_next,
)
from dsvl2.errors import InputError


def draw(params: SamplingParams, logits: torch.Tensor, n: int, seed: int | None = None) -> list[int]:
    generator = make_generator(params.seed if seed is None else seed)
    return [sample_next(logits[None], [params], [generator], [None])[0] for _ in range(n)]


def test_greedy_takes_the_argmax_of_each_row() -> None:
    logits = torch.tensor([[0.1, 3.0, -1.0, 2.9], [5.0, 0.0, 0.0, 0.0]])
    params = [SamplingParams()] * 2
    assert sample_next(logits, params, [None, None], [None, None]) == [1, 0]


def test_seeded_sampling_is_reproducible_and_depends_on_the_seed() -> None:
    logits = torch.zeros(50)
    params = SamplingParams(temperature=1.0, seed=1234)
    first = draw(params, logits, 30)
    assert draw(params, logits, 30) == first
    assert draw(params, logits, 30, seed=4321) != first


def test_top_k_only_draws_from_the_k_best() -> None:
    logits = torch.tensor([0.0, 4.0, 1.0, 3.0, 2.0])
    tokens = draw(SamplingParams(temperature=5.0, top_k=2, seed=0), logits, 200)
    assert set(tokens) == {1, 3}


def test_top_p_keeps_the_smallest_nucleus_reaching_p() -> None:
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()
    kept = filter_top_p(logits, 0.75)
    # 0.5 alone < 0.75, 0.5 + 0.3 >= 0.75: the two best survive.
    assert torch.isfinite(kept).tolist() == [True, True, False, False]
    tokens = draw(SamplingParams(temperature=1.0, top_p=0.75, seed=0), logits, 300)
    assert set(tokens) == {0, 1}


def test_top_p_always_keeps_the_best_token() -> None:
    kept = filter_top_p(torch.tensor([2.0, 1.0, 0.0]), 1e-6)
    assert torch.isfinite(kept).tolist() == [True, False, False]


def test_sampling_follows_the_softmax_distribution() -> None:
    logits = torch.tensor([0.0, 1.0]) / 0.5  # temperature applied below instead
    tokens = draw(SamplingParams(temperature=0.5, seed=7), torch.tensor([0.0, 1.0]), 4000)
    expected = torch.softmax(logits, -1)[1].item()  # e^2 / (1 + e^2) = 0.881
    assert abs(sum(tokens) / len(tokens) - expected) < 0.03


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits() -> None:
    logits = torch.tensor([2.0, -2.0, 1.0, -1.0])
    out = apply_repetition_penalty(logits, torch.tensor([0, 1, 1]), 2.0)
    assert out.tolist() == [1.0, -4.0, 1.0, -1.0]
    assert logits.tolist() == [2.0, -2.0, 1.0, -1.0]  # the input is not modified


def test_repetition_penalty_changes_the_greedy_choice() -> None:
    logits = torch.tensor([[3.0, 2.0]])
    params = [SamplingParams(repetition_penalty=2.0)]
    assert sample_next(logits, params, [None], [[0]]) == [1]
    assert sample_next(logits, params, [None], [[]]) == [0]


def test_rows_use_their_own_generators() -> None:
    """A seeded row gives the same tokens whatever the other rows of the batch are."""
    logits = torch.zeros(3, 40)
    mine = SamplingParams(temperature=1.0, seed=99)
    alone = draw(mine, logits[0], 10)
    gen = make_generator(99)
    others = [make_generator(i) for i in range(2)]
    params = [SamplingParams(temperature=1.0), mine, SamplingParams()]
    batched = [sample_next(logits, params, [others[0], gen, others[1]], [None] * 3)[1] for _ in range(10)]
    assert batched == alone


@pytest.mark.parametrize("bad", [
    {"max_new_tokens": 0}, {"temperature": -0.1}, {"temperature": float("nan")}, {"top_k": -1},
    {"top_p": 0.0}, {"top_p": 1.5}, {"repetition_penalty": 0.0}, {"stop": ("",)}, {"stop_token_ids": (-3,)},
])
def test_invalid_params_are_rejected_by_name(bad: dict) -> None:
    # The message opens with the option's own name (top_k and top_p, stop and stop_token_ids apart).
    with pytest.raises(InputError, match=rf"^{next(iter(bad))} "):
        SamplingParams(**bad).validate()


def feed(stop: tuple[str, ...], pieces: list[str]) -> tuple[list[str], bool]:
    f = StopStringFilter(stop)
    out, stopped = [], False
    for piece in pieces:
        text, stopped = f.push(piece)
        out.append(text)
        if stopped:
            return out, True
    out.append(f.flush())
    return out, stopped


def test_stop_string_spanning_pieces_is_removed_and_never_emitted() -> None:
    out, stopped = feed(("STOP",), ["Hello S", "T", "OP after"])
    assert stopped
    assert "".join(out) == "Hello "
    assert all("S" not in piece for piece in out)  # the stop text's start was held back


def test_text_held_for_a_stop_prefix_is_released_when_it_diverges_or_ends() -> None:
    out, stopped = feed(("STOP",), ["a ST", "X b S"])
    assert not stopped
    assert out == ["a ", "STX b ", "S"]


def test_earliest_of_several_stop_strings_wins() -> None:
    out, stopped = feed(("world", "lo"), ["hello world"])
    assert stopped and "".join(out) == "hel"


def test_draw_never_picks_a_zero_probability_token() -> None:
    probs = torch.tensor([0.0, 0.25, 0.0, 0.75, 0.0])
    generator = make_generator(3)
    counts = torch.bincount(torch.tensor([draw_from(probs, generator) for _ in range(4000)]), minlength=5)
    assert counts[[0, 2, 4]].tolist() == [0, 0, 0]
    assert abs(counts[3].item() / 4000 - 0.75) < 0.03
