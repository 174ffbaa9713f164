"""Worker pools in the cluster config: prefill and decode beside mixed workers."""

from __future__ import annotations

import pytest

from cluster.config import ClusterConfig


def pd(**pools) -> dict:
    return {"num_workers": 0, "engine": {"model": "tiny-llama", "block_size": 8},
            "pools": {"prefill": {"num_workers": 1}, "decode": {"num_workers": 2}, **pools}}


def test_pools_take_the_cluster_settings_and_their_own():
    config = ClusterConfig.from_dict(pd(prefill={"num_workers": 1, "worker_cpus": 2.0,
                                                 "engine": {"max_num_batched_tokens": 4096}}))
    assert config.role_counts() == [("prefill", 1), ("decode", 2)] and config.disaggregated
    assert config.engine_for("prefill").max_num_batched_tokens == 4096
    assert config.engine_for("decode") == config.engine and config.engine.block_size == 8
    assert config.worker_bundles("prefill") == [{"CPU": 2.0}] and config.worker_bundles("decode") == [{"CPU": 1.0}]
    assert ClusterConfig().role_counts() == [("mixed", 2)] and not ClusterConfig().disaggregated


@pytest.mark.parametrize("raw, message", [
    ({"pools": {"prefill": {}}}, r"prefill and decode come together .* got only \['prefill'\]"),
    ({"pools": {"mixed": {}}}, r"unknown role\(s\) \['mixed'\]"),
    (pd(decode={"engine": {"block_size": 16}}), r"lay out KV alike; block_size: prefill 8, decode 16"),
    (pd(decode={"engine": {"tensor_parallel_size": 2}}), r"tensor_parallel_size: prefill 1, decode 2"),
    (pd(decode={"num_workers": 0}), r"num_workers must be an integer >= 1, got 0"),
    (pd(decode={"engine": {"blok_size": 4}}), r"unknown engine settings \['blok_size'\]"),
    (pd(decode={"workers": 4}), r"unknown pools.decode settings \['workers'\]"),
    ({"num_workers": 0}, r"num_workers must be an integer >= 1, got 0"),
    (pd(decode={"num_workers": 2, "scaling": {"max_workers": 1}}),
     r"num_workers \(2\) must lie within scaling.min_workers \(2\) and max_workers \(1\)"),
    (pd(decode={"scaling": {"max": 4}}), r"unknown scaling settings \['max'\]"),
    ({"handoff_wait_s": -1}, r"handoff_wait_s must be >= 0, got -1"),
    ({"handoff_stream_unit": "block"}, r"handoff_stream_unit must be one of \('layer', 'chunk'\), got 'block'"),
    ({"migration_call_timeout_s": 0}, r"migration_call_timeout_s must be > 0, got 0"),
])
def test_bad_pools_are_named(raw, message):
    with pytest.raises(ValueError, match=message):
        ClusterConfig.from_dict(raw)


def test_a_pool_scales_within_its_bounds_and_handoff_settings_reach_the_config():
    config = ClusterConfig.from_dict({**pd(decode={"num_workers": 2, "scaling": {"min_workers": 1, "max_workers": 6,
                                                                               "add_below_freeness": 10}}),
                                      "handoff_streaming": False, "handoff_wait_s": 1.5,
                                      "handoff_stream_unit": "chunk"})
    scaling = config.pools["decode"].scaling
    assert scaling.bounds(2) == (1, 6) and scaling.add_below_freeness == 10
    assert config.pools["prefill"].scaling.bounds(1) == (1, 1)  # unset: a fixed size
    assert (config.handoff_streaming, config.handoff_wait_s, config.migration_call_timeout_s) == (False, 1.5, 30.0)
    assert config.handoff_stream_unit == "chunk"
