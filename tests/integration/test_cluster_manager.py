"""The cluster manager on a local Ray: registry, load polling, replacing a dead worker."""

from __future__ import annotations

import time

import pytest
from conditions import wait_until

from cluster.config import ClusterConfig
from cluster.manager import ClusterManager
from workers import LLM, SamplingParams
from workers.engine.config import EngineConfig
from workers.events import Failed, Tokens, WorkerRequest

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


def test_manager_registers_polls_and_replaces(ray_local, make_model):
    config = ClusterConfig(name="t-manager", engine=EngineConfig(model=str(make_model("tiny-llama"))),
                           num_workers=2, worker_cpus=0.5, load_poll_interval_s=0.2, health_timeout_s=10.0)
    manager = ray_local.remote(ClusterManager).remote(config)
    try:
        assert ray_local.get(manager.start.remote(), timeout=120) == 2
        snapshot = ray_local.get(manager.snapshot.remote())
        assert sorted(s.worker_id for s in snapshot) == ["t-manager-w0", "t-manager-w1"]
        assert all(s.healthy and s.load.free_blocks == s.load.total_blocks for s in snapshot)
        check_snapshot_versions(ray_local, manager)
        ray_local.kill(snapshot[0].handle)
        # Every router whose stream broke reports it, all at once: the worker is
        # replaced once, and polling goes on.
        ray_local.get([manager.report_failure.remote("t-manager-w0") for _ in range(8)])
        wait_for_workers(ray_local, manager, {"t-manager-w1": True, "t-manager-w2": True})
        assert ray_local.get(manager.status.remote())["replaced"] == 1
        groups = {g["name"]: g["state"] for g in ray_local.util.placement_group_table().values()}
        assert groups["yard-t-manager-w0"] == "REMOVED"  # the dead worker's bundles came back
        assert groups["yard-t-manager-w2"] == "CREATED"

        # A worker whose stepping thread dies fails its requests at once, with a code
        # routers retry elsewhere, says it is unhealthy, and is replaced.
        def break_the_stepping_thread(worker) -> None:
            """Runs inside the worker actor (a local function travels by value): the
            next step's events raise, outside the engine's guard, as a worker bug would."""
            def broken(output):
                raise RuntimeError("injected fault")
            worker._events_of = broken

        w1 = next(s.handle for s in ray_local.get(manager.snapshot.remote()) if s.worker_id == "t-manager-w1")
        ray_local.get(w1.__ray_call__.remote(break_the_stepping_thread))
        events = [e for ref in w1.generate.remote(WorkerRequest("doomed", (5, 6, 7), GREEDY))
                  for e in ray_local.get(ref)]
        assert [type(e) for e in events] == [Failed] and events[0].code == "worker_unhealthy"
        assert "injected fault" in events[0].message
        assert ray_local.get(w1.health.remote()) == (False, events[0].message)
        wait_for_workers(ray_local, manager, {"t-manager-w2": True, "t-manager-w3": True})
        assert ray_local.get(manager.status.remote())["replaced"] == 2
    finally:
        ray_local.get(manager.shutdown.remote())
        ray_local.kill(manager)


def test_a_restarted_manager_adopts_the_running_workers(ray_local, make_model):
    """Ray restarts a manager that dies; the new one takes over the same workers, and a
    request running on one meanwhile goes on undisturbed. A manager that Ray did not
    restart (a fresh deploy) removes what an earlier one left, and reuses no id."""
    from router.config import MANAGER_NAMESPACE

    config = ClusterConfig(name="t-adopt", engine=EngineConfig(model=str(make_model("tiny-llama"))),
                           num_workers=2, worker_cpus=0.5, load_poll_interval_s=0.2, health_timeout_s=10.0)
    options = {"name": "yard-manager-t-adopt", "namespace": MANAGER_NAMESPACE, "lifetime": "detached",
               "max_restarts": -1, "max_task_retries": -1}  # as router/app.py's ensure_cluster
    manager = ray_local.remote(ClusterManager).options(**options).remote(config)
    try:
        assert ray_local.get(manager.start.remote(), timeout=120) == 2
        before = {s.worker_id: s.handle for s in ray_local.get(manager.snapshot.remote())}
        long = SamplingParams(temperature=0, max_tokens=300, ignore_eos=True)
        expected = LLM(model=config.engine.model).generate([[5, 6, 7]], long)[0].token_ids
        running = before["t-adopt-w0"].generate.remote(WorkerRequest("survivor", (5, 6, 7), long))
        first = ray_local.get(next(running))  # the request runs: now the manager dies
        ray_local.kill(manager, no_restart=False)
        # The kill lands a moment later: calls made before then reach the old instance.
        wait_until(lambda: ray_local.get(manager.status.remote())["restarted"], 60, "the manager restarted by Ray")

        wait_for_workers(ray_local, manager, {"t-adopt-w0": True, "t-adopt-w1": True})
        status = ray_local.get(manager.status.remote())
        assert status["restarted"] and status["replaced"] == 0
        tokens = [t for e in first + [e for ref in running for e in ray_local.get(ref)] if isinstance(e, Tokens)
                  for t in e.token_ids]
        assert tokens == expected
        groups = {g["name"]: g["state"] for g in ray_local.util.placement_group_table().values()}
        assert {n: st for n, st in groups.items() if n.startswith("yard-t-adopt")} == {
            "yard-t-adopt-w0": "CREATED", "yard-t-adopt-w1": "CREATED"}

        # Killed for good, without shutdown: the next manager is new, not restarted.
        ray_local.kill(manager)
        manager = ray_local.remote(ClusterManager).options(**options).remote(config)
        assert ray_local.get(manager.start.remote(), timeout=120) == 2
        assert sorted(s.worker_id for s in ray_local.get(manager.snapshot.remote())) == ["t-adopt-w2", "t-adopt-w3"]
        groups = {g["name"]: g["state"] for g in ray_local.util.placement_group_table().values()}
        assert groups["yard-t-adopt-w0"] == groups["yard-t-adopt-w1"] == "REMOVED"
        for old in before.values():
            with pytest.raises(ray_local.exceptions.RayActorError):
                ray_local.get(old.load.remote(), timeout=30)
    finally:
        ray_local.get(manager.shutdown.remote())
        ray_local.kill(manager)


def check_snapshot_versions(ray, manager) -> None:
    """What routers pull: the whole snapshot when its version moved, nothing while it
    is the version they hold; a new load report (after a request) moves it."""
    version, whole = ray.get(manager.snapshot_if_changed.remote(None))
    assert sorted(s.worker_id for s in whole) == sorted(s.worker_id for s in ray.get(manager.snapshot.remote()))
    held = {"version": version, "reported": max(s.load.reported_at for s in whole)}

    def pull(want_unchanged: bool):
        v, snapshot = ray.get(manager.snapshot_if_changed.remote(held["version"]))
        assert (snapshot is None) == (v == held["version"])  # nothing comes only for the version held
        if snapshot is not None:
            held["version"] = v
            return not want_unchanged and max(s.load.reported_at for s in snapshot) > held["reported"]
        return want_unchanged

    wait_until(lambda: pull(want_unchanged=True), 10, "a pull with the version held to bring nothing")
    # Idle workers that never ran a request keep their first report: a request makes a new one.
    events = [e for ref in whole[0].handle.generate.remote(WorkerRequest("versions", (5, 6, 7), GREEDY))
              for e in ray.get(ref)]
    assert any(isinstance(e, Tokens) for e in events)
    wait_until(lambda: pull(want_unchanged=False), 10, "a new load report to bring a new version")


def wait_for_workers(ray, manager, expected: dict[str, bool], timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ids = {s.worker_id: s.healthy for s in ray.get(manager.snapshot.remote())}
        if ids == expected:
            return
        time.sleep(0.2)
    assert ids == expected


def test_tensor_parallel_worker_is_rank_0_in_its_own_placement_group(ray_local, make_model):
    from workers import LLM, SamplingParams
    from workers.events import Finished, Tokens, WorkerRequest

    model = str(make_model("tiny-llama"))
    config = ClusterConfig(name="t-tp", engine=EngineConfig(model=model, tensor_parallel_size=2, tp_cpus_per_rank=0.5),
                           num_workers=1, worker_cpus=0.5, load_poll_interval_s=0.2, health_timeout_s=10.0)
    assert config.worker_bundles() == [{"CPU": 0.5}, {"CPU": 0.5}]
    manager = ray_local.remote(ClusterManager).remote(config)
    try:
        assert ray_local.get(manager.start.remote(), timeout=180) == 1
        (worker,) = ray_local.get(manager.snapshot.remote())
        group = next(g for g in ray_local.util.placement_group_table().values() if g["name"] == "yard-t-tp-w0")
        assert group["state"] == "CREATED" and len(group["bundles"]) == 2
        # Both bundles are taken: the worker (rank 0) holds bundle 0, its rank 1 bundle 1.
        pg = group["placement_group_id"]
        free = ray_local.available_resources()
        assert [free.get(f"CPU_group_{i}_{pg}", 0.0) for i in (0, 1)] == [0.0, 0.0]

        greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
        expected = LLM(model=model).generate([[5, 6, 7, 8]], greedy)[0].token_ids
        events = [e for ref in worker.handle.generate.remote(WorkerRequest("tp", (5, 6, 7, 8), greedy))
                  for e in ray_local.get(ref)]
        assert [t for e in events if isinstance(e, Tokens) for t in e.token_ids] == expected
        assert isinstance(events[-1], Finished)
    finally:
        ray_local.get(manager.shutdown.remote())
        ray_local.kill(manager)


def test_attention_workers_sit_in_the_worker_group_and_their_death_replaces_it(ray_local, make_model):
    """An offloading worker's attention workers take the last bundles of the worker's
    own group (no second group), after its tensor-parallel ranks': one per rank here.
    When one dies, the running request fails with a code routers retry elsewhere, and
    the manager replaces the whole instance."""
    model = str(make_model("tiny-llama"))
    engine = EngineConfig(model=model, tp_timeout_s=20.0, tensor_parallel_size=2, tp_cpus_per_rank=0.5,
                          attention_offload={"workers": 2, "cpus_per_worker": 0.5})
    config = ClusterConfig(name="t-off", engine=engine, num_workers=1, worker_cpus=0.5, load_poll_interval_s=0.2,
                           health_timeout_s=10.0)
    assert config.worker_bundles() == [{"CPU": 0.5}] * 4
    groups_before = set(ray_local.util.placement_group_table())
    manager = ray_local.remote(ClusterManager).remote(config)
    try:
        assert ray_local.get(manager.start.remote(), timeout=180) == 1
        (worker,) = ray_local.get(manager.snapshot.remote())
        made = [g for pg, g in ray_local.util.placement_group_table().items()
                if pg not in groups_before and g["state"] == "CREATED"]
        assert [(g["name"], len(g["bundles"])) for g in made] == [("yard-t-off-w0", 4)]
        pg = made[0]["placement_group_id"]
        free = ray_local.available_resources()
        assert [free.get(f"CPU_group_{i}_{pg}", 0.0) for i in range(4)] == [0.0] * 4  # every bundle taken

        expected = LLM(model=model).generate([[5, 6, 7, 8]], GREEDY)[0].token_ids
        events = [e for ref in worker.handle.generate.remote(WorkerRequest("off", (5, 6, 7, 8), GREEDY))
                  for e in ray_local.get(ref)]
        assert [t for e in events if isinstance(e, Tokens) for t in e.token_ids] == expected

        long = SamplingParams(temperature=0, max_tokens=2000, ignore_eos=True)
        running = worker.handle.generate.remote(WorkerRequest("cut", (5, 6, 7), long))
        first = ray_local.get(next(running))
        # Rank 1's attention worker: rank 1's exchange breaks, and with it the step.
        rank_1 = ray_local.get(worker.handle.__ray_call__.remote(lambda w: w.engine.executor.ranks[0]))
        ray_local.kill(ray_local.get(rank_1.__ray_call__.remote(lambda r: r.offload.workers[0])))
        events = first + [e for ref in running for e in ray_local.get(ref)]
        assert isinstance(events[-1], Failed) and events[-1].code == "worker_unhealthy", events[-1]
        assert "attention worker" in events[-1].message
        wait_for_workers(ray_local, manager, {"t-off-w1": True})
        groups = {g["name"]: g["state"] for g in ray_local.util.placement_group_table().values()}
        assert groups["yard-t-off-w0"] == "REMOVED" and groups["yard-t-off-w1"] == "CREATED"

        # An idle instance whose (rank 0's) attention worker dies is replaced too: no
        # step notices it, the worker's idle check does.
        (worker,) = ray_local.get(manager.snapshot.remote())
        ray_local.kill(ray_local.get(worker.handle.__ray_call__.remote(lambda w: w.engine.offload.workers[0])))
        wait_for_workers(ray_local, manager, {"t-off-w2": True})
    finally:
        ray_local.get(manager.shutdown.remote())
        ray_local.kill(manager)


def test_config_errors_name_the_setting():
    with pytest.raises(ValueError, match="num_workers must be an integer >= 1, got 0"):
        ClusterConfig(num_workers=0)
    with pytest.raises(ValueError, match=r"unknown engine settings \['blok_size'\]"):
        ClusterConfig.from_dict({"engine": {"blok_size": 8}})
    assert ClusterConfig.from_dict({"num_workers": 3, "engine": {"block_size": 8}}).engine.block_size == 8
    with pytest.raises(ValueError, match=r"rank_resources\['GPU'\] must be a custom resource"):
        ClusterConfig(rank_resources={"GPU": 1})
    with pytest.raises(ValueError, match=r"rank_resources\['model-gpu'\] must be a custom resource with a number "
                                         r"> 0 \(CPUs and GPUs are worker_cpus and gpus_per_rank\), got 0"):
        ClusterConfig(rank_resources={"model-gpu": 0})
    labelled = ClusterConfig(gpus_per_rank=1, rank_resources={"model-gpu": 1},
                             engine=EngineConfig(attention_offload={"workers": 1, "resources": {"GPU": 1, "kv": 1}}))
    assert labelled.worker_bundles() == [{"CPU": 1.0, "GPU": 1, "model-gpu": 1}, {"CPU": 1.0, "GPU": 1, "kv": 1}]
