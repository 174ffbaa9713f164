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
])
def test_bad_pools_are_named(raw, message):
    with pytest.raises(ValueError, match=message):
        ClusterConfig.from_dict(raw)
