"""The cluster manager resizes a decode pool: it starts a worker when the pool runs
hot, and removes one by draining it, its running request moving (KV and all) to the
other decode worker and ending exactly as undisturbed."""

from __future__ import annotations

import threading
from typing import Any

from conditions import wait_until
from worker_streams import Follower, prompt, run, tokens, undisturbed

from cluster.config import ClusterConfig
from cluster.manager import ClusterManager
from cluster.pool_scaling import AddWorkers, RemoveWorker
from workers import SamplingParams
from workers.events import WorkerRequest

LONG = SamplingParams(temperature=0, max_tokens=600, ignore_eos=True)


def pd_config(name: str, model: str, decode: dict[str, Any]) -> ClusterConfig:
    # The loop never fires on its own (scaling_interval_s): the test calls scale_pools.
    return ClusterConfig.from_dict({
        "name": name, "num_workers": 0, "worker_cpus": 0.25, "load_poll_interval_s": 0.1,
        "scaling_interval_s": 3600, "engine": {"model": model, "kv_cache_memory_gib": 0.1},
        "pools": {"prefill": {"num_workers": 1}, "decode": decode}})


def decode_workers(ray, manager) -> dict[str, Any]:
    return {s.worker_id: s for s in ray.get(manager.snapshot.remote()) if s.role == "decode"}


def test_a_hot_decode_pool_gets_a_worker_up_to_its_max_and_keeps_it_when_the_manager_restarts(ray_local,
                                                                                                make_model):
    from router.config import MANAGER_NAMESPACE

    hot = {"num_workers": 1, "scaling": {"max_workers": 2, "add_below_freeness": 1e9, "remove_above_freeness": 2e9,
                                         "sustain_s": 0, "cooldown_s": 0}}
    options = {"name": "yard-manager-t-grow", "namespace": MANAGER_NAMESPACE, "lifetime": "detached",
               "max_restarts": -1, "max_task_retries": -1}  # as router/app.py's ensure_cluster
    manager = ray_local.remote(ClusterManager).options(**options).remote(
        pd_config("t-grow", str(make_model("tiny-llama")), hot))
    try:
        assert ray_local.get(manager.start.remote(), timeout=120) == 2
        decision = ray_local.get(manager.scale_pools.remote())
        assert [type(d) for d in decision] == [AddWorkers] and decision[0].role == "decode"
        wait_until(lambda: sum(s.healthy for s in decode_workers(ray_local, manager).values()) == 2, 120,
                   "a second healthy decode worker")
        assert ray_local.get(manager.scale_pools.remote()) == []  # at max_workers
        assert ray_local.get(manager.status.remote())["pools"]["decode"] == {"size": 2, "min": 1, "max": 2}
        grown = sorted(decode_workers(ray_local, manager))

        ray_local.kill(manager, no_restart=False)  # Ray restarts it; it adopts the workers, the pool's size too
        def adopted_at_size_2() -> bool:
            status = ray_local.get(manager.status.remote())
            return status["restarted"] and status["pools"]["decode"] == {"size": 2, "min": 1, "max": 2}

        wait_until(adopted_at_size_2, 120, "the restarted manager to keep the decode pool at 2")
        assert sorted(decode_workers(ray_local, manager)) == grown
        assert ray_local.get(manager.status.remote())["pools"]["prefill"] == {"size": 1, "min": 1, "max": 1}
    finally:
        ray_local.get(manager.shutdown.remote())
        ray_local.kill(manager)


def test_an_idle_decode_pool_drains_a_worker_and_loses_nothing(ray_local, make_model):
    model = str(make_model("tiny-llama"))
    idle = {"num_workers": 2, "scaling": {"min_workers": 1, "add_below_freeness": 0.1, "remove_above_freeness": 0.5,
                                          "idle_s": 0, "cooldown_s": 0}}
    manager = ray_local.remote(ClusterManager).remote(pd_config("t-shrink", model, idle))
    try:
        assert ray_local.get(manager.start.remote(), timeout=120) == 3
        workers = decode_workers(ray_local, manager)
        victim, keeper = sorted(workers)  # one request each: the lower id goes
        handles = {wid: s.handle for wid, s in workers.items()}
        p = prompt(30, 60)
        other = handles[keeper].generate.remote(WorkerRequest("keeper-own", prompt(31, 60), LONG))
        removed: list[Any] = []

        def remove_when_both_run() -> None:
            wait_until(lambda: all(s.load and s.load.num_running == 1
                                   for s in decode_workers(ray_local, manager).values()), 60, "both to run")
            removed.extend(ray_local.get(manager.scale_pools.remote()))

        scaler = threading.Thread(target=remove_when_both_run)
        scaler.start()
        events, _ = run(Follower(handles, victim).run(WorkerRequest("on-victim", p, LONG), 1 << 30, [], victim))
        scaler.join()
        assert removed == [RemoveWorker("decode", victim, removed[0].why)]
        assert tokens(events) == undisturbed(model, p, LONG)
        ray_local.get(handles[keeper].abort.remote("keeper-own"))
        for ref in other:
            ray_local.get(ref)
        wait_until(lambda: list(decode_workers(ray_local, manager)) == [keeper], 60, "the victim to be removed")
        assert ray_local.get(manager.status.remote())["pools"]["decode"] == {"size": 1, "min": 1, "max": 2}
        groups = {g["name"]: g["state"] for g in ray_local.util.placement_group_table().values()}
        assert groups[f"yard-{victim}"] == "REMOVED"
    finally:
        ray_local.get(manager.shutdown.remote())
        ray_local.kill(manager)
