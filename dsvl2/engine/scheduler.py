"""Continuous batching: a waiting queue, KV-cache slots, chunked prefill and one shared decode batch.

Between two steps requests join (they wait until a slot is free) and leave (finished, cancelled or
failed: their slot is free for the next step). Within a step, at most `prefill_chunk` prompt
tokens are prefilled, so a long multi-image prompt is spread over several steps while the
sequences already decoding keep producing a token every step.

The queue and the cancellation set are the only state touched by other threads (`add`,
`cancel`); everything else belongs to the thread that calls `step`.
"""

from __future__ import annotations

import enum
import heapq
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

from dsvl2.engine.sampling import SamplingParams, StopStringFilter


class Phase(enum.Enum):
    WAITING = "waiting"
    PREFILL = "prefill"
    DECODE = "decode"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """One request's state from queueing to its final event."""

    request_id: str
    sample: Any  # dsvl2.processor.Sample: input_ids, images_seq_mask, pixel values, image digests
    sampling: SamplingParams
    stop_ids: frozenset[int]
    generator: torch.Generator | None
    decoder: Any  # dsvl2.tokenizer.StreamDecoder
    stop_filter: StopStringFilter
    arrival: float = field(default_factory=time.monotonic)
    phase: Phase = Phase.WAITING
    slot: int = -1
    prefilled: int = 0  # prompt tokens already written to the cache
    prompt_embeds: torch.Tensor | None = None  # [T, D] while prefilling
    images: Any = None  # dsvl2.engine.generate.ImageEncoding while the prompt's images are encoded
    output_ids: list[int] = field(default_factory=list)
    first_token_time: float | None = None
    adapter: str | None = None  # the LoRA adapter it runs (dsvl2.adapters); None: the base model

    @property
    def prompt_len(self) -> int:
        return int(self.sample.input_ids.shape[0])

    @property
    def prompt_ids(self) -> list[int]:
        return self.sample.input_ids.tolist()

    @property
    def next_position(self) -> int:
        """Cache position of the last sampled token, which the next decode step feeds."""
        return self.prompt_len + len(self.output_ids) - 1


class Scheduler:
    def __init__(self, max_batch: int, prefill_chunk: int) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk
        self._lock = threading.Lock()
        self._waiting: deque[Sequence] = deque()
        self._cancel_requests: set[str] = set()
        self._active_ids: set[str] = set()  # queued or running, for duplicate-id checks from any thread
        self._free_slots = list(range(max_batch))  # a heap: the lowest free slot first keeps batches contiguous
        self.running: list[Sequence] = []  # admitted, in admission order

    # -- called from any thread -----------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        with self._lock:
            if seq.request_id in self._active_ids:
                raise ValueError(f"request id {seq.request_id!r} is already queued or running")
            self._active_ids.add(seq.request_id)
            self._waiting.append(seq)

    def cancel(self, request_id: str) -> None:
        with self._lock:
            self._cancel_requests.add(request_id)

    def is_active(self, request_id: str) -> bool:
        with self._lock:
            return request_id in self._active_ids

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_work(self) -> bool:
        return bool(self._waiting or self.running or self._cancel_requests)

    # -- called by the stepping thread ----------------------------------------------------------

    def take_cancelled(self) -> list[Sequence]:
        """Remove the sequences whose cancellation was asked since the last step; frees their slots."""
        with self._lock:
            wanted, self._cancel_requests = self._cancel_requests, set()
            if not wanted:
                return []
            cancelled = [s for s in self._waiting if s.request_id in wanted]
            self._waiting = deque(s for s in self._waiting if s.request_id not in wanted)
        cancelled += [s for s in self.running if s.request_id in wanted]
        for seq in cancelled:
            self.release(seq)
        return cancelled

    def admit(self) -> list[Sequence]:
        """Give free slots to waiting sequences, first come first served."""
        admitted = []
        with self._lock:
            while self._waiting and self._free_slots:
                seq = self._waiting.popleft()
                seq.slot = heapq.heappop(self._free_slots)
                seq.phase = Phase.PREFILL
                self.running.append(seq)
                admitted.append(seq)
        return admitted

    def prefill_plan(self) -> list[tuple[Sequence, int, int]]:
        """(sequence, start, stop) prompt blocks to prefill this step, `prefill_chunk` tokens in all."""
        budget = self.prefill_chunk
        plan = []
        for seq in self.running:
            if budget == 0:
                break
            if seq.phase is not Phase.PREFILL:
                continue
            stop = min(seq.prompt_len, seq.prefilled + budget)
            plan.append((seq, seq.prefilled, stop))
            budget -= stop - seq.prefilled
        return plan

    def decode_batch(self) -> list[Sequence]:
        """Every sequence that has a sampled token to feed, in slot order."""
        return sorted((s for s in self.running if s.phase is Phase.DECODE), key=lambda s: s.slot)

    def release(self, seq: Sequence) -> None:
        """Take a sequence out of the running set (or the queue) and free its slot."""
        if seq in self.running:
            self.running.remove(seq)
        with self._lock:
            if seq in self._waiting:
                self._waiting.remove(seq)
            self._active_ids.discard(seq.request_id)
        if seq.slot >= 0:
            heapq.heappush(self._free_slots, seq.slot)
            seq.slot = -1
        seq.phase = Phase.FINISHED
        seq.prompt_embeds = seq.images = None


def contiguous_range(slots: list[int]) -> tuple[int, int] | None:
    """(start, stop) when sorted `slots` are consecutive, so the cache can hand out views."""
    if slots and slots == list(range(slots[0], slots[0] + len(slots))):
        return slots[0], slots[0] + len(slots)
    return None
