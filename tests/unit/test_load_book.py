"""The router's load book: the corrected loads it keeps worker by worker equal the
snapshot corrected from scratch, after any mix of snapshots, dispatches, ends and
forgotten workers; and the choice of a worker made from it."""

from __future__ import annotations

import random

import pytest

from router.dispatch import DispatchRequest, NoWorkerAvailable
from router.load_book import LoadBook, adjusted, place
from router.policies import LeastLoad, RoundRobin
from tests.unit.test_policies import load


def from_scratch(book: LoadBook) -> list:
    return [adjusted(w, book.sent[wid] - book.ended[wid], book.sent_tokens[wid]) for wid, w in book.loads.items()]


def test_the_book_kept_worker_by_worker_equals_the_snapshot_corrected_from_scratch():
    rng = random.Random(3)
    book = LoadBook()
    ids = ["w0", "w1", "w2", "w3"]
    for step in range(400):
        op = rng.random()
        if op < 0.1:
            # A snapshot in which some reports are fresh and some are the old ones.
            book.refresh({wid: load(wid, num_running=rng.randrange(5), num_waiting=rng.randrange(3),
                                    freeness=rng.uniform(-5, 50), healthy=rng.random() < 0.9,
                                    reported_at=float(step if rng.random() < 0.5 else 0))
                          for wid in ids if rng.random() < 0.9})
        elif op < 0.2:
            book.refresh(dict(book.loads))  # the same snapshot again (no poll since)
        elif op < 0.6:
            book.dispatched(rng.choice(ids), rng.randrange(100))
        elif op < 0.95:
            book.finished(rng.choice(ids))
        else:
            book.forget(rng.choice(ids))
        assert book.current() == from_scratch(book), step
        healthy = [w for w in from_scratch(book) if w.healthy]
        for limit in (1, 3, 6):
            assert book.saturated(limit) == (bool(healthy) and all(w.queue_length >= limit for w in healthy))


def test_a_dispatch_counts_at_once_and_a_fresh_report_absorbs_it():
    book = LoadBook()
    book.refresh({"a": load("a", num_running=1, freeness=40.0), "b": load("b", num_running=1, freeness=30.0)})
    assert place(DispatchRequest("r1", (1, 2)), book.current(), LeastLoad(), 16).worker_id == "a"
    book.dispatched("a", 2)  # a now shares its free KV with one more: 40 * 1/2 = 20 < 30
    assert place(DispatchRequest("r2", (1, 2)), book.current(), LeastLoad(), 16).worker_id == "b"
    book.refresh({"a": load("a", num_running=2, freeness=20.0, reported_at=1.0), "b": book.loads["b"]})
    assert (book.sent["a"], book.current()[0].num_waiting) == (0, 0)  # the report counts it now


def test_place_keeps_a_preferred_healthy_worker_and_names_the_decode_worker_of_a_split():
    loads = [load("p0", role="prefill"), load("d0", role="decode", freeness=10.0),
             load("d1", role="decode", freeness=90.0)]
    split = place(DispatchRequest("r", tuple(range(40))), loads, RoundRobin(), 16)
    assert (split.worker_id, split.handoff_to, split.policy) == ("p0", "d1", "prefill_tokens")
    mixed = [load("m0"), load("m1")]
    kept = place(DispatchRequest("r", (1,)), mixed, RoundRobin(), 16, prefer="m1")
    assert (kept.worker_id, kept.policy) == ("m1", "same_prompt")


def test_the_books_indexed_least_load_choice_is_the_choice_over_all_current_loads():
    """The book's place() reads least-load's choice from its heap; after any mix of
    snapshots, dispatches, ends, forgotten workers and pools coming and going, it is the
    choice place() makes over the whole list: the same worker, policy and decode worker."""
    rng = random.Random(5)
    book, policy = LoadBook(), LeastLoad()
    ids = [f"w{i}" for i in range(12)]
    checked = 0
    for step in range(3000):
        op = rng.random()
        if op < 0.05:
            split = rng.random() < 0.2
            book.refresh({wid: load(wid, num_running=rng.randrange(5), num_waiting=rng.randrange(3),
                                    freeness=float(rng.randrange(4)), healthy=rng.random() < 0.8,
                                    role=rng.choice(["prefill", "decode"]) if split else "mixed",
                                    reported_at=float(step if rng.random() < 0.7 else 0))
                          for wid in ids if rng.random() < 0.9})
        elif op < 0.5:
            book.dispatched(rng.choice(ids), rng.randrange(100))
        elif op < 0.9:
            book.finished(rng.choice(ids))
        elif op < 0.92:
            book.forget(rng.choice(ids))
        request = DispatchRequest(f"r{step}", tuple(range(rng.randrange(1, 40))))
        prefer = rng.choice(ids) if rng.random() < 0.1 else None
        excluded = frozenset(rng.sample(ids, 2)) if rng.random() < 0.1 else frozenset()
        everywhere = [w for w in book.current() if w.worker_id not in excluded]
        try:
            expected = place(request, everywhere, policy, 16, prefer=prefer)
        except NoWorkerAvailable:
            with pytest.raises(NoWorkerAvailable):
                book.place(request, policy, 16, prefer=prefer, excluded=excluded)
            continue
        assert book.place(request, policy, 16, prefer=prefer, excluded=excluded) == expected, step
        checked += 1
    assert checked > 2000  # most steps had a healthy worker to choose


def test_the_index_forgets_a_worker_and_follows_a_snapshot_that_makes_one_unhealthy():
    book, policy = LoadBook(), LeastLoad()
    book.refresh({"a": load("a", freeness=90.0), "b": load("b", freeness=50.0), "c": load("c", freeness=10.0)})
    assert book.place(DispatchRequest("r1", (1,)), policy, 16).worker_id == "a"
    book.forget("a")
    assert book.place(DispatchRequest("r2", (1,)), policy, 16).worker_id == "b"
    book.refresh({"b": load("b", freeness=50.0, healthy=False, reported_at=1.0), "c": book.loads["c"]})
    assert book.place(DispatchRequest("r3", (1,)), policy, 16).worker_id == "c"
    book.refresh({"c": load("c", healthy=False, reported_at=2.0)})
    with pytest.raises(NoWorkerAvailable, match="r4"):
        book.place(DispatchRequest("r4", (1,)), policy, 16)
