"""Pool scaling (cluster/pool_scaling.py) with an injected clock and made-up loads:
the exact decision at each moment."""

from __future__ import annotations

import pytest

from cluster.pool_scaling import AddWorkers, PoolScaler, PoolScaling, PoolWorker, RemoveWorker

SCALING = PoolScaling(min_workers=1, max_workers=3, add_above_queued_tokens=1000, remove_below_queued_tokens=50,
                      add_below_freeness=20, remove_above_freeness=500, sustain_s=2, idle_s=30, cooldown_s=5)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def prefill(*queued: int, booting: int = 0) -> list[PoolWorker]:
    return ([PoolWorker(f"p{i}", False, queued_prefill_tokens=q, num_requests=q // 100) for i, q in enumerate(queued)]
            + [PoolWorker(f"new{i}", True) for i in range(booting)])


def decode(*freeness: float, requests: tuple[int, ...] = ()) -> list[PoolWorker]:
    return [PoolWorker(f"d{i}", False, freeness=f, num_requests=requests[i] if requests else 0)
            for i, f in enumerate(freeness)]


def test_prefill_pool_grows_after_the_queue_stays_long_and_not_twice_for_one_burst():
    clock = Clock()
    scaler = PoolScaler("prefill", SCALING, 1, clock)
    assert scaler.decide(prefill(3000)) is None  # hot, not yet for sustain_s
    clock.now += 1.9
    assert scaler.decide(prefill(3000)) is None
    clock.now += 0.1
    assert scaler.decide(prefill(3000)) == AddWorkers("prefill", 1, "queued prefill tokens per worker 3000.0 for 2.0 s")
    # The new worker is starting: it counts as idle, the mean halves, and the cooldown holds.
    clock.now += 3
    assert scaler.decide(prefill(3000, booting=1)) is None
    clock.now += 10
    assert scaler.decide(prefill(1500, booting=1)) is None  # 750 per worker: no longer hot
    # Hot again across the cooldown: a third worker, then the maximum holds.
    assert scaler.decide(prefill(4000, 4000)) is None
    clock.now += 2
    assert scaler.decide(prefill(4000, 4000)) == AddWorkers("prefill", 1,
                                                            "queued prefill tokens per worker 4000.0 for 2.0 s")
    clock.now += 60
    assert scaler.decide(prefill(4000, 4000, 4000)) is None
    clock.now += 60
    assert scaler.decide(prefill(4000, 4000, 4000)) is None  # at max_workers


def test_a_blip_resets_the_sustain_timer():
    clock = Clock()
    scaler = PoolScaler("prefill", SCALING, 1, clock)
    scaler.decide(prefill(3000))
    clock.now += 1.5
    scaler.decide(prefill(10))  # the queue emptied
    clock.now += 1.0
    assert scaler.decide(prefill(3000)) is None  # hot for 0 s, not 2.5 s
    clock.now += 2.0
    assert isinstance(scaler.decide(prefill(3000)), AddWorkers)


def test_decode_pool_shrinks_after_a_long_idle_spell_by_its_least_busy_worker():
    clock = Clock()
    scaler = PoolScaler("decode", SCALING, 2, clock)
    idle = decode(900, 800, requests=(3, 1))
    assert scaler.decide(idle) is None
    clock.now += 29
    assert scaler.decide(idle) is None
    clock.now += 1
    assert scaler.decide(idle) == RemoveWorker("decode", "d1", "freeness 850.0 for 30.0 s")
    clock.now += 100
    assert scaler.decide(decode(900)) is None  # at min_workers


def test_decode_pool_grows_when_freeness_runs_low():
    clock = Clock()
    scaler = PoolScaler("decode", SCALING, 1, clock)
    assert scaler.decide(decode(5)) is None
    clock.now += 2
    assert scaler.decide(decode(5)) == AddWorkers("decode", 1, "freeness 5.0 for 2.0 s")


def test_a_fixed_pool_never_scales_and_bad_bounds_are_refused():
    clock = Clock()
    fixed = PoolScaler("decode", PoolScaling(), 2, clock)
    assert not fixed.scales
    assert fixed.decide(decode(1, 1)) is None
    clock.now += 1000
    assert fixed.decide(decode(1, 1)) is None
    with pytest.raises(ValueError, match=r"num_workers \(4\) must lie within scaling.min_workers \(1\) and "
                                         r"max_workers \(3\)"):
        PoolScaler("prefill", SCALING, 4, clock)
    with pytest.raises(ValueError, match="scaling.min_workers \\(3\\) exceeds max_workers \\(2\\)"):
        PoolScaling(min_workers=3, max_workers=2)
    with pytest.raises(ValueError, match="unknown scaling settings \\['max'\\]"):
        PoolScaling.from_dict({"max": 3})
