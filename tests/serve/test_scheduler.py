"""Admission: arrival order, and work per step bounded however long the queue grows."""

import pytest

from loraforge.serve import Engine
from loraforge.serve.scheduler import Sequence

from .helpers import greedy

LOOKAHEAD = 32


class CountingSequence(Sequence):
    """A sequence that counts how often admission looks at it (admission reads ``tokens`` once per look)."""

    looks = 0

    @property
    def tokens(self) -> list[int]:
        CountingSequence.looks += 1
        return super().tokens


@pytest.fixture
def engine(llama, tokenizer):
    """An engine whose pool holds four KV pages."""
    page_bytes = Engine(llama, max_rank=16, pool_bytes=1 << 22).pool.page_bytes
    return Engine(llama, tokenizer, max_rank=16, pool_bytes=4 * page_bytes, max_lookahead=LOOKAHEAD)


def seq(engine, name: str, pages: int) -> CountingSequence:
    return CountingSequence(name, [1] * (pages * engine.block_size), greedy(), 1)


def schedule(engine, queue: list[Sequence]):
    for s in queue:
        engine.scheduler.add(s)
    CountingSequence.looks = 0
    return engine.scheduler.schedule()


def test_requests_that_fit_are_admitted_in_arrival_order(engine):
    queue = [seq(engine, f"s{i}", 1) for i in range(3)]
    plan = schedule(engine, queue)
    assert plan.prefills == queue and engine.scheduler.running == queue and not engine.scheduler.waiting


def test_a_long_queue_that_does_not_fit_costs_a_step_at_most_max_lookahead_looks(engine):
    too_big = [seq(engine, f"big{i}", 5) for i in range(10_000)]
    plan = schedule(engine, too_big + [seq(engine, "small", 1)])
    assert plan.prefills == [] and CountingSequence.looks <= LOOKAHEAD
    assert len(engine.scheduler.waiting) == 10_001  # the small one is beyond the lookahead: it waits


def test_within_the_lookahead_a_request_that_fits_overtakes_ones_that_do_not(engine):
    small = seq(engine, "small", 1)
    plan = schedule(engine, [seq(engine, f"big{i}", 5) for i in range(10)] + [small]
                    + [seq(engine, f"later{i}", 5) for i in range(10_000)])
    assert plan.prefills == [small] and CountingSequence.looks <= LOOKAHEAD
    assert next(iter(engine.scheduler.waiting.values())).bypassed == 1


def test_a_full_pool_stops_admission_before_it_looks_at_anyone(engine):
    running = [seq(engine, f"run{i}", 1) for i in range(4)]
    assert schedule(engine, running).prefills == running and engine.pool.num_free == 0
    plan = schedule(engine, [seq(engine, f"wait{i}", 1) for i in range(10_000)])
    assert [s for s in plan.prefills if s not in running] == [] and CountingSequence.looks == 0
    engine.scheduler.free(running[0])
    assert [s.request_id for s in schedule(engine, []).prefills if s not in running] == ["wait0"]
