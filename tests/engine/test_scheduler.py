"""The continuous-batching scheduler's admission order and slot bookkeeping, without a model."""

from __future__ import annotations

import pytest

from dsvl2.engine.sampling import SamplingParams
from dsvl2.engine.scheduler import Phase, Scheduler, Sequence


def _sequence(request_id: str) -> Sequence:
    # Admission reads only the id and phase: the model-facing fields can stay empty.
    return Sequence(request_id, sample=None, sampling=SamplingParams(), stop_ids=frozenset(), generator=None,
                    decoder=None, stop_filter=None)


def test_one_slot_admits_three_queued_requests_first_come_first_served() -> None:
    scheduler = Scheduler(max_batch=1, prefill_chunk=8)
    for request_id in ("first", "second", "third"):
        scheduler.add(_sequence(request_id))
    order = []
    while scheduler.num_waiting:
        admitted = scheduler.admit()
        assert len(admitted) == 1 and scheduler.admit() == []  # the one slot is taken until released
        seq = admitted[0]
        assert seq.slot == 0 and seq.phase is Phase.PREFILL
        order.append(seq.request_id)
        scheduler.release(seq)
        assert seq.slot == -1 and seq.phase is Phase.FINISHED
    assert order == ["first", "second", "third"]


def test_free_slots_go_to_the_oldest_waiting_requests_lowest_slot_first() -> None:
    scheduler = Scheduler(max_batch=2, prefill_chunk=8)
    sequences = [_sequence(str(i)) for i in range(4)]
    for seq in sequences:
        scheduler.add(seq)
    assert [(s.request_id, s.slot) for s in scheduler.admit()] == [("0", 0), ("1", 1)]
    scheduler.release(sequences[0])
    assert [(s.request_id, s.slot) for s in scheduler.admit()] == [("2", 0)]
    assert scheduler.num_waiting == 1 and [s.request_id for s in scheduler.running] == ["1", "2"]


def test_a_cancelled_waiting_request_is_never_admitted() -> None:
    scheduler = Scheduler(max_batch=1, prefill_chunk=8)
    for request_id in ("a", "b", "c"):
        scheduler.add(_sequence(request_id))
    scheduler.cancel("b")
    assert [s.request_id for s in scheduler.take_cancelled()] == ["b"]
    assert not scheduler.is_active("b")
    first = scheduler.admit()
    scheduler.release(first[0])
    assert [first[0].request_id, scheduler.admit()[0].request_id] == ["a", "c"]


def test_duplicate_request_ids_are_refused() -> None:
    scheduler = Scheduler(max_batch=1, prefill_chunk=8)
    scheduler.add(_sequence("same"))
    with pytest.raises(ValueError, match="already queued or running"):
        scheduler.add(_sequence("same"))
