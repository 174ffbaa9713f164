"""Worker pools in the cluster config: prefill and decode beside mixed workers, and
further mixed pools with engines of their own."""

from __future__ import annotations

import pytest

from cluster.config import ClusterConfig


def pd(**pools) -> dict:
    return {"num_workers": 0, "engine": {"model": "tiny-llama", "block_size": 8},
            "pools": {"prefill": {"num_workers": 1}, "decode": {"num_workers": 2}, **pools}}


def test_pools_take_the_cluster_settings_and_their_own():
    config = ClusterConfig.from_dict(pd(prefill={"num_workers": 1, "worker_cpus": 2.0,
                                                 "engine": {"max_num_batched_tokens": 4096}}))
    assert config.pool_sizes() == [("prefill", 1), ("decode", 2)] and config.disaggregated
    assert config.engine_for("prefill").max_num_batched_tokens == 4096
    assert config.engine_for("decode") == config.engine and config.engine.block_size == 8
    assert config.worker_bundles("prefill") == [{"CPU": 2.0}] and config.worker_bundles("decode") == [{"CPU": 1.0}]
    assert ClusterConfig().pool_sizes() == [("mixed", 2)] and not ClusterConfig().disaggregated


@pytest.mark.parametrize("raw, message", [
    ({"pools": {"prefill": {}}}, r"prefill and decode come together .* got only \['prefill'\]"),
    ({"pools": {"mixed": {}}}, r"'mixed' is the pool of num_workers"),
    ({"pools": {"vLLM": {}}}, r"pools: name 'vLLM' must be lowercase letters, digits and '-'"),
    ({"pools": {"vllm": {"scaling": {"max_workers": 3}}}}, r"pools.vllm: only the prefill and decode pools scale"),
    ({"pools": {"v": {"engine": {"backend": "vllm", "num_kv_blocks": 8}}}},
     r"pools.v.engine: num_kv_blocks is not supported with backend 'vllm'"),
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
    ({"stream_full_at": -1}, r"stream_full_at must be an integer >= 0, got -1"),
    ({"stream_full_at": 2.5}, r"stream_full_at must be an integer >= 0, got 2.5"),
    ({"stream_interval_max_s": 1.5}, r"stream_interval_max_s must be in \[0, 1\], got 1.5"),
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


def test_vllm_backend_in_the_cluster_config():
    short = ClusterConfig.from_dict({"engine": "vllm"})
    assert short.engine.backend == "vllm" and short.engine.model == "tiny-llama"
    tp2 = ClusterConfig.from_dict({"worker_cpus": 2.0, "gpus_per_rank": 1,
                                   "engine": {"backend": "vllm", "tensor_parallel_size": 2, "tp_cpus_per_rank": 3}})
    # vLLM's ranks are processes of the worker actor: one bundle holds them all.
    assert tp2.worker_bundles() == [{"CPU": 5.0, "GPU": 2}]
    assert ClusterConfig.from_dict({"engine": {"tensor_parallel_size": 2}}).worker_bundles() == [{"CPU": 1.0}] * 2


@pytest.mark.parametrize("raw, message", [
    ({"engine": "tgi"}, r"backend must be one of \['yard', 'vllm'\], got 'tgi'"),
    ({"engine": {"backend": "vllm", "num_kv_blocks": 64}}, r"num_kv_blocks is not supported with backend 'vllm'"),
    ({"engine": {"backend": "vllm", "attention_offload": {"workers": 1}}},
     r"attention_offload is not supported with backend 'vllm'"),
    ({"engine": {"backend": "vllm", "tensor_parallel_size": 2, "expert_parallel_size": 2}},
     r"expert_parallel_size is not supported with backend 'vllm' \(got 2\)"),
    ({**pd(), "engine": {"backend": "vllm"}}, r"pools.prefill: backend 'vllm' cannot hand KV"),
])
def test_vllm_backend_refuses_what_it_cannot_do_by_name(raw, message):
    with pytest.raises(ValueError, match=message):
        ClusterConfig.from_dict(raw)


def test_a_further_mixed_pool_runs_its_own_engine_beside_the_mixed_workers():
    config = ClusterConfig.from_dict({"num_workers": 1, "engine": {"model": "tiny-llama"},
                                      "pools": {"vllm": {"num_workers": 2, "worker_cpus": 2.0,
                                                         "engine": {"backend": "vllm"}}}})
    assert config.pool_sizes() == [("mixed", 1), ("vllm", 2)] and not config.disaggregated
    assert [config.pool_role(p) for p in ("mixed", "vllm", "prefill", "decode")] == \
        ["mixed", "mixed", "prefill", "decode"]
    assert config.engine_for("vllm").backend == "vllm" and config.engine_for("mixed").backend == "yard"
    assert config.worker_bundles("vllm") == [{"CPU": 2.0}] and config.worker_bundles() == [{"CPU": 1.0}]
    only_pools = ClusterConfig.from_dict({"num_workers": 0, "pools": {"a": {}, "b": {"engine": "vllm"}}})
    assert only_pools.pool_sizes() == [("a", 1), ("b", 1)]


def test_a_pools_worker_runs_its_engine_and_the_clusters_stream_migration_and_handoff_settings():
    config = ClusterConfig.from_dict({
        **pd(prefill={"num_workers": 1, "engine": {"max_num_batched_tokens": 4096}}),
        "stream_interval_s": 0.03, "stream_full_at": 7, "stream_interval_max_s": 0.4,
        "migration_call_timeout_s": 12.0, "migration": {"stage_threshold_blocks": 3},
        "handoff_wait_s": 2.5, "handoff_streaming": False, "handoff_stream_unit": "chunk"})
    wc = config.worker_config("w-p", "prefill")
    assert (wc.worker_id, wc.role, wc.pool) == ("w-p", "prefill", "prefill")
    assert wc.engine == config.engine_for("prefill") and wc.engine.max_num_batched_tokens == 4096
    assert (wc.stream_interval_s, wc.stream_full_at, wc.stream_interval_max_s) == (0.03, 7, 0.4)
    assert (wc.migration_pause_blocks, wc.migration_call_timeout_s) == (3, 12.0)
    assert (wc.handoff_wait_s, wc.handoff_streaming, wc.handoff_stream_unit) == (2.5, False, "chunk")
    assert config.worker_config("w-d", "decode").engine.max_num_batched_tokens == 2048
