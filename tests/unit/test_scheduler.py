"""Scheduler: token budget, decode-first chunking, priorities and preemption order."""

from __future__ import annotations

from workers.engine.block_manager import BlockManager
from workers.engine.scheduler import Scheduler, SchedulerConfig
from workers.engine.sequence import Sequence, Status
from workers.sampling_params import SamplingParams


def seq(rid: str, n: int, priority: int = 0, arrival: float = 0.0, base: int = 0) -> Sequence:
    return Sequence(rid, list(range(base, base + n)), n, SamplingParams(), max_tokens=100,
                    priority=priority, arrival_time=arrival)


def make(num_blocks: int = 64, block_size: int = 4, budget: int = 16, chunked: bool = True,
         max_seqs: int = 8) -> Scheduler:
    return Scheduler(SchedulerConfig(budget, max_seqs, chunked),
                     BlockManager(num_blocks, block_size, enable_prefix_caching=False))


def run(s: Scheduler, plan, seqs: dict[str, Sequence]) -> None:
    """What the engine does after the model ran: advance, and 'sample' token 7."""
    for rid, n in plan.chunks.items():
        q = seqs[rid]
        q.num_computed_tokens += n
        if q.num_computed_tokens == q.num_tokens:
            q.token_ids.append(7)


def test_chunked_prefill_fills_budget_after_decodes():
    s = make(budget=16)
    seqs = {q.request_id: q for q in (seq("a", 10, arrival=0), seq("b", 30, arrival=1))}
    for q in seqs.values():
        s.add(q)
    p1 = s.schedule()
    assert p1.chunks == {"a": 10, "b": 6}
    run(s, p1, seqs)
    p2 = s.schedule()
    # a decodes (one token, listed first); b's prefill continues with the rest.
    assert list(p2.chunks.items()) == [("a", 1), ("b", 15)]
    run(s, p2, seqs)
    p3 = s.schedule()
    assert list(p3.chunks.items()) == [("a", 1), ("b", 9)]


def test_without_chunking_a_prompt_waits_for_a_whole_budget():
    s = make(budget=16, chunked=False)
    seqs = {q.request_id: q for q in (seq("a", 10), seq("b", 12, arrival=1))}
    for q in seqs.values():
        s.add(q)
    p1 = s.schedule()
    assert p1.chunks == {"a": 10}
    run(s, p1, seqs)
    assert s.schedule().chunks == {"a": 1, "b": 12}


def test_priority_orders_admission_and_max_num_seqs():
    s = make(budget=100, max_seqs=2)
    for q in (seq("low", 4, priority=0, arrival=0), seq("high", 4, priority=5, arrival=1),
              seq("mid", 4, priority=1, arrival=2)):
        s.add(q)
    assert list(s.schedule().chunks) == ["high", "mid"]
    assert [q.request_id for q in s.waiting] == ["low"]


def test_preemption_takes_lowest_priority_latest_arrival_and_recomputes():
    # 6 blocks of 4 tokens. Three sequences of 8 tokens take 2 blocks each.
    s = make(num_blocks=6, budget=64)
    seqs = {q.request_id: q for q in (seq("a", 8, priority=1, arrival=0), seq("b", 8, arrival=1),
                                      seq("c", 8, arrival=2))}
    for q in seqs.values():
        s.add(q)
    p = s.schedule()
    assert p.chunks == {"a": 8, "b": 8, "c": 8}
    run(s, p, seqs)
    # Each now needs a third block for its 9th token; none are free.
    p = s.schedule()
    # c's two blocks are enough for a and b to grow by one each.
    assert [q.request_id for q in p.preempted] == ["c"]
    assert list(p.chunks.items()) == [("a", 1), ("b", 1)]
    assert seqs["c"].status is Status.WAITING and seqs["c"].num_computed_tokens == 0
    assert seqs["c"].token_ids == list(range(8)) + [7]  # its sampled token is kept
    assert s.blocks.num_free_blocks == 0
    run(s, p, seqs)
    # Back in the queue it is recomputed from prompt plus output once room returns.
    s.remove(seqs["a"])
    p = s.schedule()
    assert p.chunks == {"b": 1, "c": 9}
    assert s.num_preemptions == 1


def test_higher_priority_arrival_preempts_lower_priority_runner():
    s = make(num_blocks=4, budget=64)
    low = seq("low", 12, priority=0, arrival=0)
    s.add(low)
    run(s, s.schedule(), {"low": low})
    high = seq("high", 8, priority=3, arrival=1, base=100)
    s.add(high)
    p = s.schedule()
    assert "high" in p.chunks and "low" not in p.chunks
    assert [q.request_id for q in p.preempted] == ["low"]
    # Equal priority never preempts: it waits.
    s2 = make(num_blocks=4, budget=64)
    first = seq("first", 12)
    s2.add(first)
    run(s2, s2.schedule(), {"first": first})
    s2.add(seq("second", 8, arrival=1))
    assert list(s2.schedule().chunks) == ["first"]


def test_remove_frees_blocks_wherever_the_request_is():
    s = make(num_blocks=8)
    a, b = seq("a", 8), seq("b", 8, arrival=1)
    s.add(a)
    s.add(b)
    s.schedule()
    s.remove(a)
    s.remove(b)
    assert s.blocks.num_free_blocks == 8
    assert not s.has_work
