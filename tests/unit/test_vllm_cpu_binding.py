"""How a vLLM worker shares its CPUs among vLLM's tensor-parallel ranks on CPU."""

from __future__ import annotations

import os

import pytest

from workers.vllm.cpu_binding import BIND_VARIABLE, bind_ranks, rank_cpu_lists


def test_cpus_are_split_into_contiguous_shares_as_even_as_they_go() -> None:
    assert rank_cpu_lists([3, 0, 2, 1], 2) == [[0, 1], [2, 3]]
    assert rank_cpu_lists(range(5), 2) == [[0, 1, 2], [3, 4]]
    assert rank_cpu_lists([4, 6, 8], 3) == [[4], [6], [8]]
    assert rank_cpu_lists([0, 1], 1) == [[0, 1]]


def test_fewer_cpus_than_ranks_share_them_round_robin() -> None:
    assert rank_cpu_lists([5], 2) == [[5], [5]]
    assert rank_cpu_lists([0, 1], 3) == [[0], [1], [0]]


def test_bad_sizes_are_refused_by_name() -> None:
    with pytest.raises(ValueError, match="ranks must be >= 1, got 0"):
        rank_cpu_lists([0], 0)
    with pytest.raises(ValueError, match="no CPU"):
        rank_cpu_lists([], 2)


def test_the_binding_comes_from_this_processs_cpus_unless_the_operator_chose_one() -> None:
    shares = rank_cpu_lists(sorted(os.sched_getaffinity(0)), 2)
    environ: dict[str, str] = {}
    assert bind_ranks(2, environ) == "|".join(",".join(map(str, s)) for s in shares)
    assert environ[BIND_VARIABLE].count("|") == 1
    assert bind_ranks(2, {BIND_VARIABLE: "0-3|4-7"}) == "0-3|4-7"
    assert bind_ranks(2, {BIND_VARIABLE: "auto"}) == environ[BIND_VARIABLE]  # vLLM's default, as unset
    one_rank: dict[str, str] = {}
    assert bind_ranks(1, one_rank) == "auto" and one_rank == {}  # one rank: vLLM's own binding stands
