"""A serve config fitted to the cluster's CPUs, or refused with what it asks and what there is."""

from __future__ import annotations

import pytest

from cluster.sizing import demand_of, fit


def test_defaults_shrink_the_workers_to_fit_two_cpus():
    # Two workers at 1 CPU and a replica at 0.5 ask for 2.5: the replica would wait forever.
    args = fit({"cluster": {"engine": {"model": "tiny-llama"}}}, cluster_cpus=2)
    assert args["cluster"]["worker_cpus"] == 0.75
    assert args["cluster"]["engine"] == {"model": "tiny-llama"}
    assert demand_of(args).total == 2.0


def test_a_config_that_fits_is_left_alone():
    args = {"cluster": {"num_workers": 2}, "replicas": 1}
    assert fit(args, cluster_cpus=16) == args


def test_what_was_set_is_not_changed_and_a_misfit_is_named():
    with pytest.raises(ValueError) as info:
        fit({"cluster": {"worker_cpus": 1.0}}, cluster_cpus=2)
    message = str(info.value)
    assert "2 worker(s) x (1) CPUs and 1 router replica(s) x 0.5 CPUs = 2.5 CPUs" in message
    assert "the cluster has 2 CPUs" in message and "worker_cpus" in message


def test_tensor_parallel_ranks_count_and_too_many_workers_fail():
    args = {"cluster": {"num_workers": 2, "engine": {"tensor_parallel_size": 2, "tp_cpus_per_rank": 1.0}}}
    with pytest.raises(ValueError, match=r"1 tensor-parallel rank\(s\) x 1\) CPUs .* = 4.5 CPUs"):
        fit(args, cluster_cpus=2)
    fitted = fit(args, cluster_cpus=4)  # the workers shrink; the ranks keep what they asked
    assert fitted["cluster"]["worker_cpus"] == 0.75 and demand_of(fitted).total == 4.0


def test_prefill_and_decode_pools_count_with_their_own_settings():
    args = {"cluster": {"num_workers": 0, "engine": {"tensor_parallel_size": 1},
                        "pools": {"prefill": {"num_workers": 1, "worker_cpus": 2.0},
                                  "decode": {"num_workers": 2}}}}
    demand = demand_of(args)
    assert [(g.pool, g.workers, g.worker_cpus) for g in demand.groups] == [("prefill", 1, 2.0), ("decode", 2, 1.0)]
    fitted = fit(args, cluster_cpus=4)  # only the decode pool's cluster-wide worker_cpus shrinks
    assert fitted["cluster"]["worker_cpus"] == 0.75 and demand_of(fitted).total == 4.0
    with pytest.raises(ValueError, match=r"1 prefill worker\(s\) x \(2\) CPUs, 2 decode worker\(s\) x \(0\.1\) "):
        fit({**args, "cluster": {**args["cluster"], "worker_cpus": 0.1}}, cluster_cpus=2)


def test_a_further_pool_and_the_engine_shorthand_count():
    args = {"cluster": {"num_workers": 1, "engine": "vllm",
                        "pools": {"vllm-tp2": {"worker_cpus": 2.0, "engine": {"tensor_parallel_size": 2}}}}}
    demand = demand_of(args)
    assert [(g.pool, g.workers, g.worker_cpus, g.tp_ranks_per_worker) for g in demand.groups] == \
        [("mixed", 1, 1.0, 0), ("vllm-tp2", 1, 2.0, 1)]
    assert demand.describe().startswith("1 worker(s) x (1) CPUs, 1 vllm-tp2 worker(s) x (2 + 1 tensor-parallel")
