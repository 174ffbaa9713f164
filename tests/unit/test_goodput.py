"""DistServe's attainment and goodput (bench/goodput.py), on hand-computed cases."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from goodput import SLO, Latency, attainment, goodput, median  # noqa: E402

SLO_ = SLO(ttft_s=1.0, tpot_s=0.1)


def test_a_request_attains_only_when_both_targets_are_met():
    requests = [Latency(0.5, 0.05, True),   # both met
                Latency(1.5, 0.05, True),   # TTFT missed
                Latency(0.5, 0.2, True),    # TPOT missed
                Latency(1.0, 0.1, True),    # exactly on both: met
                Latency(0.3, None, True),   # one token: TTFT decides
                Latency(0.1, 0.01, False)]  # failed: missed
    assert attainment(requests, SLO_) == 3 / 6
    assert attainment(requests, SLO_.scaled(2.0)) == 5 / 6


def test_goodput_interpolates_the_crossing_of_the_target():
    # 0.95 at rate 2, 0.85 at rate 4: 0.9 is crossed halfway.
    assert goodput([(1.0, 1.0), (4.0, 0.85), (2.0, 0.95), (6.0, 0.5)]) == pytest.approx(3.0)
    # Once below, a later recovery does not count: the first crossing is the goodput.
    assert goodput([(1.0, 0.92), (2.0, 0.88), (3.0, 0.95)]) == pytest.approx(1.0 + 0.02 / 0.04)


def test_goodput_edges():
    assert goodput([(1.0, 0.8), (2.0, 0.5)]) is None  # never met
    assert goodput([(1.0, 0.99), (2.0, 0.9)]) == 2.0  # met at every rate: the highest is a lower bound
    assert goodput([]) is None


def test_median():
    assert median([3.0, 1.0, 2.0]) == 2.0 and median([4.0, 1.0, 2.0, 3.0]) == 2.5
    with pytest.raises(ValueError):
        median([])
