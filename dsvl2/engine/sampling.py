"""Choosing the next token (greedy, temperature, top-k, top-p, repetition penalty) and stopping rules.

Each request owns a `torch.Generator` seeded from its `seed`, and every row of a batch is sampled
with its own generator, so a seeded request gives the same tokens whatever else runs beside it.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dsvl2.errors import InputError


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 -> greedy
    top_k: int = 0  # 0 -> off
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()  # the tokenizer's eos is always added by the engine unless ignore_eos
    stop: tuple[str, ...] = ()  # stop strings: generation ends, the stop text is removed
    ignore_eos: bool = False

    def validate(self) -> None:
        """Raise InputError naming the first out-of-range field."""
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if not self.temperature >= 0.0:  # also rejects NaN
            raise InputError(f"temperature must be >= 0, got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise InputError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise InputError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not self.repetition_penalty > 0.0:
            raise InputError(f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise InputError(f"stop_token_ids must be non-negative integers, got {self.stop_token_ids!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise InputError(f"stop strings must be non-empty strings, got {self.stop!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded by `seed`, or by fresh randomness when the request gave none."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed if seed is not None else random.SystemRandom().getrandbits(63))
    return generator


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty on one row [V]: positive logits of seen tokens are divided, negative multiplied."""
    if penalty == 1.0 or seen.numel() == 0:
        return logits
    seen = seen[(seen >= 0) & (seen < logits.shape[-1])].unique()
    values = logits[seen]
    logits = logits.clone()
    logits[seen] = torch.where(values > 0, values / penalty, values * penalty)
    return logits


def filter_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Set logits [V] outside the top-p nucleus to -inf (the best token always survives)."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(descending=True)
    probs = sorted_logits.softmax(-1)
    # Drop a token when the tokens ranked above it already reach top_p.
    drop_sorted = (probs.cumsum(-1) - probs) >= top_p
    drop_sorted[0] = False
    drop = torch.zeros_like(drop_sorted).scatter_(0, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample_row(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None, seen: torch.Tensor | None
) -> int:
    """The next token of one sequence from its logits [V]."""
    logits = logits.float()
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.greedy:
        return int(logits.argmax())
    logits = logits / params.temperature
    candidates = None
    if 0 < params.top_k < logits.shape[-1]:
        # Only the k best can be drawn: the rest of the work happens on those k.
        logits, candidates = logits.topk(params.top_k)
    logits = filter_top_p(logits, params.top_p)
    index = draw_from(logits.softmax(-1), generator)
    return int(candidates[index]) if candidates is not None else index


def draw_from(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    """One index drawn with probabilities `probs` [V] by inverting the cumulative distribution
    (cheaper than torch.multinomial on a large vocabulary)."""
    cdf = probs.float().cumsum(-1)  # float32 rounding moves at most ~1e-6 of probability mass
    u = torch.rand((), generator=generator, device=probs.device) * cdf[-1]
    # The first position whose cumulative probability exceeds u; zero-probability tokens never are.
    return int(torch.searchsorted(cdf, u.reshape(1), right=True).clamp(max=probs.shape[-1] - 1))


def sample_next(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
    history: Sequence[Sequence[int] | torch.Tensor | None],
) -> list[int]:
    """Next token of each row of `logits` [B, V]; `history` holds the tokens each penalty applies to."""
    if not len(params) == len(generators) == len(history) == logits.shape[0]:
        raise ValueError(
            f"sample_next: {logits.shape[0]} logit rows but {len(params)} params, "
            f"{len(generators)} generators, {len(history)} histories"
        )
    rows = logits.detach()
    if all(p.greedy and p.repetition_penalty == 1.0 for p in params):
        return rows.float().argmax(-1).tolist()
    tokens = []
    for row, p, generator, seen in zip(rows, params, generators, history, strict=True):
        if seen is not None and not isinstance(seen, torch.Tensor):
            seen = torch.tensor(list(seen), dtype=torch.long, device=row.device)
        tokens.append(sample_row(row, p, generator, seen))
    return tokens


class StopStringFilter:
    """Releases streamed text, holding back any tail that could still grow into a stop string.

    `push` returns (text safe to emit, whether a stop string was completed); once one is found
    the text before it is released and everything from it on is dropped.
    """

    def __init__(self, stop: Sequence[str]) -> None:
        self.stop = tuple(s for s in stop if s)
        self._pending = ""
        self.stopped = False

    def _held_tail(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
        longest = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), longest, -1):
                if text.endswith(s[:n]):
                    longest = n
                    break
        return longest

    def push(self, text: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        buffer = self._pending + text
        found = [i for i in (buffer.find(s) for s in self.stop) if i >= 0]
        if found:
            self.stopped = True
            self._pending = ""
            return buffer[:min(found)], True
        hold = self._held_tail(buffer)
        self._pending = buffer[len(buffer) - hold:] if hold else ""
        return buffer[:len(buffer) - hold], False

    def flush(self) -> str:
        """At the end of generation the held tail did not become a stop string: release it."""
        pending, self._pending = self._pending, ""
        return "" if self.stopped else pending
