"""A worker with vLLM's engine inside (EngineConfig.backend "vllm"), on a local Ray:
the same events as vLLM's own offline LLM, failover both ways between a yard worker
and a vLLM worker, load reports and metrics that match the traffic, KV migration
refused by name and moves by recompute instead."""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import pytest
from ray import cloudpickle

from conditions import wait_until
from router.prefix_policy import leading_hits, prompt_block_hashes
from tests.e2e.test_metrics import scrape, total
from vllm_reference import same_text, vllm_generate_soon
from worker_streams import Follower, prompt, run, start, tokens, undisturbed
from workers import LLM, SamplingParams
from workers.engine.config import EngineConfig
from workers.events import Failed, Finished, Tokens, WorkerRequest
from workers.migration import MigrationOrder
from workers.worker import Worker

# Ray workers cannot import this module: the test worker classes travel by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

PROMPTS = [prompt(seed, n) for seed, n in ((1, 7), (2, 30), (3, 65), (4, 140))]
GREEDY = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True, logprobs=2)


@pytest.fixture(scope="module")
def model_dir(make_model):
    return str(make_model("tiny-llama"))


@pytest.fixture(scope="module", autouse=True)
def greedy_soon(model_dir, tmp_path_factory):
    """vLLM's offline LLM.generate for PROMPTS with GREEDY, in a process of its own,
    started before the module's workers (autouse fixtures come first)."""
    return vllm_generate_soon(model_dir, PROMPTS, GREEDY.max_tokens, GREEDY.logprobs,
                              tmp_path_factory.mktemp("vllm-reference"))


@pytest.fixture(scope="module")
def vllm_worker(ray_local, model_dir):
    handle = start(ray_local, "vllm-w0", model_dir, backend="vllm")
    yield handle
    ray_local.get(handle.shutdown.remote())
    ray_local.kill(handle)


def stream(ray, worker, request: WorkerRequest) -> list:
    return [e for ref in worker.generate.remote(request) for e in ray.get(ref)]


@pytest.fixture(scope="module")
def greedy_offline(greedy_soon) -> list[dict]:
    """vLLM's offline output for PROMPTS with GREEDY: one dict per prompt."""
    return greedy_soon.result(timeout=600)


def test_events_match_vllm_offline(ray_local, vllm_worker, greedy_offline):
    expected = greedy_offline
    refs = [vllm_worker.generate.remote(WorkerRequest(f"parity-{i}", p, GREEDY)) for i, p in enumerate(PROMPTS)]
    for i, (gen, want) in enumerate(zip(refs, expected)):
        events = [e for ref in gen for e in ray_local.get(ref)]
        assert tokens(events) == want["token_ids"]  # absolute indexes, no gap, no repeat
        assert same_text(text(events), want["text"])
        logprobs = [lp for e in events if isinstance(e, Tokens) for lp in e.logprobs]
        assert [lp.token_id for lp in logprobs] == want["token_ids"]
        assert max(abs(lp.logprob - w) for lp, w in zip(logprobs, want["logprobs"])) < 1e-4
        assert all(len(lp.top) == 2 and lp.top[0][1] >= lp.top[1][1] for lp in logprobs)
        end = events[-1]
        assert isinstance(end, Finished) and end.reason == "length"
        assert (end.usage.prompt_tokens, end.usage.completion_tokens) == (len(PROMPTS[i]), GREEDY.max_tokens)


def test_vllm_and_yard_agree_on_the_model(model_dir, greedy_offline):
    """What failover between the two engines relies on: the same greedy tokens."""
    ours = LLM(model=model_dir, kv_cache_memory_gib=0.25).generate([list(p) for p in PROMPTS],
                                                                    SamplingParams(temperature=0, max_tokens=64,
                                                                                   ignore_eos=True))
    assert [o.token_ids for o in ours] == [t["token_ids"] for t in greedy_offline]


def test_abort_and_bad_input_as_with_our_engine(ray_local, vllm_worker, model_dir):
    long = SamplingParams(temperature=0, max_tokens=2000, ignore_eos=True)
    gen = vllm_worker.generate.remote(WorkerRequest("long", prompt(5, 10), long))
    assert isinstance(ray_local.get(next(gen))[0], Tokens)
    bad = stream(ray_local, vllm_worker, WorkerRequest("bad", (1, 99999), GREEDY))
    ray_local.get(vllm_worker.abort.remote("long"))
    rest = [e for ref in gen for e in ray_local.get(ref)]
    assert isinstance(rest[-1], Finished) and rest[-1].reason == "abort"
    yard_engine = LLM(model=model_dir, kv_cache_memory_gib=0.25).engine
    with pytest.raises(ValueError) as ours:
        yard_engine.add_request("bad", (1, 99999), GREEDY)
    assert bad == [Failed("bad", "invalid_request", str(ours.value))]
    too_long = stream(ray_local, vllm_worker, WorkerRequest("too-long", prompt(6, 2048), GREEDY))
    assert too_long[0].code == "invalid_request" and "max_model_len (2048)" in too_long[0].message
    resumed_past_end = stream(ray_local, vllm_worker, WorkerRequest(
        "past-end", prompt(7, 5), SamplingParams(temperature=0, max_tokens=3), resume_token_ids=(5, 6, 7)))
    assert resumed_past_end[0].code == "invalid_request" and "output_token_ids" in resumed_past_end[0].message


@pytest.mark.parametrize("victim", ["vllm", "yard"])
def test_killed_worker_resumes_on_the_other_engine(ray_local, model_dir, vllm_worker, yard_worker, victim):
    """One yard worker and one vLLM worker: the one serving a stream dies mid-way, and
    the router's request state machine resumes it on the other (the module's worker of
    that engine), with no gap and no repeated token, equal to an undisturbed run."""
    backends = {"vllm": {"backend": "vllm"}, "yard": {}}
    survivor = "yard" if victim == "vllm" else "vllm"
    handles = {victim: start(ray_local, f"mixed-{victim}", model_dir, **backends[victim]),
               survivor: {"vllm": vllm_worker, "yard": yard_worker}[survivor]}
    p, params = prompt(8, 20), SamplingParams(temperature=0, max_tokens=160, ignore_eos=True)
    follower = Follower(handles, first=victim, fallback=survivor)

    async def kill() -> None:
        ray_local.kill(handles[victim], no_restart=True)

    try:
        events, _ = run(follower.run(WorkerRequest(f"mixed-{victim}", p, params), 10, [], victim, then=kill))
        assert follower.failures == [victim]
        assert tokens(events) == undisturbed(model_dir, p, params)
        assert isinstance(events[-1], Finished) and events[-1].usage.completion_tokens == 160
    finally:
        ray_local.kill(handles[victim])


def test_load_reports_and_metrics_match_traffic(ray_local, model_dir, metrics_port):
    worker = start(ray_local, "vllm-load", model_dir, backend="vllm")
    try:
        idle = ray_local.get(worker.load.remote())
        assert (idle.backend, idle.kv_migration, idle.num_running, idle.requests) == ("vllm", False, 0, ())
        assert idle.total_blocks > 0 and idle.free_blocks == idle.total_blocks and not idle.cached_block_hashes
        params = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)
        gens = [worker.generate.remote(WorkerRequest(f"load-{i}", p, params)) for i, p in enumerate(PROMPTS)]
        busy = wait_until(lambda: (r := ray_local.get(worker.load.remote())).num_running == len(PROMPTS) and r,
                          60, "the vLLM worker reports its four requests running")
        assert busy.free_blocks < busy.total_blocks and busy.mean_step_time_s > 0
        for gen in gens:
            assert tokens([e for ref in gen for e in ray_local.get(ref)]) != []
        done = wait_until(lambda: (r := ray_local.get(worker.load.remote())).num_running == 0 and r, 30,
                          "the vLLM worker reports nothing running")
        assert done.free_blocks == done.total_blocks

        def counted() -> dict:
            samples = scrape(metrics_port)
            return {"prompt": total(samples, "ray_yard_worker_prompt_tokens_total", worker="vllm-load"),
                    "generated": total(samples, "ray_yard_worker_generation_tokens_total", worker="vllm-load"),
                    "vllm_generated": total(samples, "ray_vllm_generation_tokens_total")}
        want = {"prompt": sum(map(len, PROMPTS)), "generated": 400 * len(PROMPTS)}
        got = wait_until(lambda: (c := counted())["prompt"] == want["prompt"] and c["generated"] == want["generated"]
                         and c["vllm_generated"] >= want["generated"] and c, 40,
                         "yard's and vLLM's token counters to reach the traffic sent")
        assert got["prompt"] == want["prompt"]
    finally:
        ray_local.get(worker.shutdown.remote())
        ray_local.kill(worker)


def test_the_load_report_names_vllms_cached_prefix_as_the_router_hashes_it(ray_local, vllm_worker):
    """What prefix_aware dispatch reads of a vLLM worker: after a request, the blocks
    the router would count as cached for the same prompt are the tokens vLLM then
    takes from its own prefix cache, exactly."""
    p, params = prompt(31, 300), SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    stream(ray_local, vllm_worker, WorkerRequest("prefix-first", p, params))
    unit = EngineConfig.block_size  # the router's block size for this cluster (router/app.py)
    hashes = prompt_block_hashes(p, unit)
    hits = wait_until(lambda: leading_hits(hashes, ray_local.get(vllm_worker.load.remote()).cached_block_hashes),
                      30, "the vLLM worker to report the prompt's blocks")
    again = stream(ray_local, vllm_worker, WorkerRequest("prefix-again", p, params))
    assert hits * unit == again[-1].usage.cached_tokens > 0


@pytest.fixture(scope="module")
def yard_worker(ray_local, model_dir):
    """A worker with yard's engine beside the module's vLLM worker."""
    handle = start(ray_local, "yard-beside-vllm", model_dir)
    yield handle
    ray_local.get(handle.shutdown.remote())
    ray_local.kill(handle)


def test_kv_migration_into_vllm_is_refused_by_name(ray_local, vllm_worker, yard_worker, model_dir):
    handles = {"yard": yard_worker, "vllm": vllm_worker}
    params = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)
    p = prompt(9, 12)
    events, results = run(Follower(handles, first="yard").run(
        WorkerRequest("stays", p, params), 5, [MigrationOrder("m-in", "stays", "vllm", vllm_worker, "manual")],
        "yard"))
    assert results[0].outcome != "committed" and "cannot move a request's KV" in results[0].error
    assert tokens(events) == undisturbed(model_dir, p, params)  # it went on at the source
    out = ray_local.get(vllm_worker.migrate.remote(MigrationOrder("m-out", "nobody", "yard", yard_worker, "manual")))
    assert out.outcome == "aborted" and out.error.startswith("not_here: request 'nobody'")


DESTINATIONS = {"yard": {}, "vllm": {"backend": "vllm"}, "vllm-blocks-64": {"backend": "vllm", "block_size": 64}}


@pytest.mark.parametrize("destination", list(DESTINATIONS))
def test_vllm_request_moves_by_recompute(ray_local, vllm_worker, model_dir, destination):
    """A vLLM worker cannot live-migrate: a running request moves by recompute instead,
    to either engine; its router follows the Moved event, and nothing is lost or
    repeated. To a vLLM worker with the same KV layout its KV goes along (its full
    blocks pre-copied while it decodes, the rest in the pause), and the destination
    computes none of its prompt (its usage counts the whole prompt as cached), also
    where the prompt's first blocks are in its prefix cache already; to one with
    another block size it is computed again."""
    source_id, destination_id = "vllm-w0", "rc-dst-" + destination
    handles = {source_id: vllm_worker,
               destination_id: start(ray_local, destination_id, model_dir, **DESTINATIONS[destination])}
    # 300 prompt tokens: two full blocks of vLLM's 128 on CPU, then a partial one.
    p, params = prompt(10, 300), SamplingParams(temperature=0, max_tokens=120, ignore_eos=True)
    want = undisturbed(model_dir, p, params)
    try:
        for rid in ("moves", "moves-again") if destination == "vllm" else ("moves",):
            order = MigrationOrder(f"rc-{rid}", rid, destination_id, handles[destination_id], "manual")
            events, results = run(Follower(handles, first=source_id).run(
                WorkerRequest(rid, p, params), 10, [order], source_id))
            assert results[0].outcome == "committed", results[0]
            assert 10 <= results[0].next_index < 120
            assert tokens(events) == want
            assert isinstance(events[-1], Finished) and events[-1].usage.completion_tokens == 120
            carried = results[0].blocks > 0
            assert carried == (destination == "vllm"), results[0]
            if carried:  # two full blocks ahead, the partial third in the pause
                assert (results[0].stages, results[0].blocks) == (2, 3), results[0]
            # The first move finds a fresh destination: a cached prompt token there can
            # only have come with the KV. The second finds the first two blocks cached
            # there, and loads the rest.
            assert events[-1].usage.cached_tokens == (len(p) if carried else 0)
        wait_until(lambda: (r := ray_local.get(handles[source_id].load.remote())).requests == ()
                   and r.num_running == 0 and r.free_blocks == r.total_blocks, 10,
                   "the source to report the moved request gone and its blocks free")
    finally:
        ray_local.get(handles[destination_id].shutdown.remote())
        ray_local.kill(handles[destination_id])


class SlowAdoptWorker(Worker):
    """A destination whose adopt call outlasts the source's patience, stuck either before
    it takes the request ("late": it lands after the source gave up) or after ("slow":
    the request is already computing here when the source gives up)."""

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.mode = "late"
        self.gate = asyncio.Event()
        self.adopt_errors: list[str] = []

    async def set_mode(self, mode: str) -> None:
        self.mode = mode
        self.gate.clear()

    async def release(self) -> None:
        self.gate.set()

    async def abandoned_moves(self) -> list[str]:
        return list(self._abandoned)

    async def errors(self) -> list[str]:
        return self.adopt_errors

    async def adopt(self, request: WorkerRequest, source_id: str, migration_id: str, kv: Any = None) -> None:
        if self.mode == "late":
            await self.gate.wait()
        try:
            await super().adopt(request, source_id, migration_id, kv)
        except ValueError as e:
            self.adopt_errors.append(str(e))
            raise
        if self.mode == "slow":
            await self.gate.wait()


def test_a_move_by_recompute_that_times_out_runs_on_the_source_only(ray_local, model_dir):
    """The source stops waiting for adopt and takes the request back; the destination
    must not compute it beside the source until its attach timeout, whether adopt ran
    before the source's abandon arrived or after."""
    source = start(ray_local, "impatient-src", model_dir, worker={"migration_call_timeout_s": 1.0}, backend="vllm")
    destination = start(ray_local, "slow-adopt", model_dir, actor_class=SlowAdoptWorker)
    handles = {"impatient-src": source, "slow-adopt": destination}
    params = SamplingParams(temperature=0, max_tokens=80, ignore_eos=True)

    def holds_nothing() -> bool:
        report = ray_local.get(destination.load.remote())
        return report.requests == () and report.free_blocks == report.total_blocks

    try:
        for mode in ("late", "slow"):
            ray_local.get(destination.set_mode.remote(mode))
            rid, p = f"patience-{mode}", prompt(12, 15)
            order = MigrationOrder(f"rc-{mode}", rid, "slow-adopt", destination, "manual")
            events, results = run(Follower(handles, first="impatient-src").run(
                WorkerRequest(rid, p, params), 5, [order], "impatient-src"))
            assert results[0].outcome == "aborted" and "TimeoutError" in results[0].error, results[0]
            assert tokens(events) == undisturbed(model_dir, p, params)  # all of it from the source
            if mode == "late":
                wait_until(lambda: order.migration_id in ray_local.get(destination.abandoned_moves.remote()), 10,
                           "the destination to hear that the move was abandoned")
                ray_local.get(destination.release.remote())
                wait_until(lambda: any("was abandoned" in e for e in ray_local.get(destination.errors.remote())),
                           10, "the late adopt to be refused")
            # Well within the 30 s attach timeout, after which a parked request is dropped anyway.
            wait_until(holds_nothing, 10, "the destination to drop the request its source took back")
            ray_local.get(destination.release.remote())
    finally:
        for handle in handles.values():
            ray_local.get(handle.shutdown.remote())
            ray_local.kill(handle)


def test_seeded_request_is_not_moved_by_recompute(ray_local, vllm_worker, yard_worker):
    handles = {"vllm-w0": vllm_worker, "yard": yard_worker}
    seeded = SamplingParams(temperature=0.8, seed=7, max_tokens=60, ignore_eos=True)
    order = MigrationOrder("rc-seeded", "seeded", "yard", yard_worker, "manual")
    events, results = run(Follower(handles, first="vllm-w0").run(
        WorkerRequest("seeded", prompt(11, 9), seeded), 5, [order], "vllm-w0"))
    assert results[0].outcome == "failed" and "seeded sampling (seed 7)" in results[0].error
    assert len(tokens(events)) == 60 and isinstance(events[-1], Finished)  # it went on where it was
    assert ray_local.get(vllm_worker.load.remote()).requests == ()


def text(events: list) -> str:
    return "".join(e.text for e in events if isinstance(e, Tokens))


def tokens_from(events: list, start: int) -> list[int]:
    """A resumed stream's tokens, whose indexes start at `start`, with no gap."""
    out: list[int] = []
    for e in events:
        if isinstance(e, Tokens):
            assert e.start_index == start + len(out)
            out.extend(e.token_ids)
    return out


def yard_token_texts(model_dir: str, p: tuple[int, ...], params: SamplingParams) -> tuple[list[int], list[str]]:
    """An undisturbed run on yard's engine, one token per step: each token's id and the
    text released with it (what a client of a yard worker had after it)."""
    engine = LLM(model=model_dir, kv_cache_memory_gib=0.25).engine
    engine.add_request("undisturbed", p, params)
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    assert all(len(o.new_token_ids) == 1 for o in outputs)
    return [o.new_token_ids[0] for o in outputs], [o.new_text for o in outputs]


def test_text_continues_across_a_resume_at_every_split(ray_local, vllm_worker, model_dir):
    """A stream served by yard's engine up to token k and resumed on a vLLM worker
    reads exactly as the undisturbed stream, for every k: also where k splits a UTF-8
    character, where vLLM's own detokenizer repeated the prompt's text."""
    p, params = prompt(3, 20), SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    ids, texts = yard_token_texts(model_dir, p, params)
    splits = range(1, len(ids))
    assert any(texts[k - 1] == "" for k in splits)  # some split falls inside a character
    refs = {k: vllm_worker.generate.remote(WorkerRequest(f"split-{k}", p, params, resume_token_ids=tuple(ids[:k])))
            for k in splits}
    for k, gen in refs.items():
        events = [e for ref in gen for e in ray_local.get(ref)]
        assert tokens_from(events, k) == ids[k:], k
        assert "".join(texts[:k]) + text(events) == "".join(texts), k


@pytest.mark.parametrize("include", [False, True])
def test_stop_strings_end_a_vllm_request_as_ours(ray_local, vllm_worker, yard_worker, model_dir, include):
    """Stop strings are matched by yard's detokenizer on a vLLM worker too: the same
    tokens, text, finish and stop reason as on a yard worker, also when resumed."""
    p = prompt(3, 20)
    _, texts = yard_token_texts(model_dir, p, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
    full = "".join(texts)
    stop = full[30:33]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop=("zzzz", stop),
                            include_stop_str_in_output=include)
    _, stop_texts = yard_token_texts(model_dir, p, params)
    ours = stream(ray_local, yard_worker, WorkerRequest("stop-yard", p, params))
    theirs = stream(ray_local, vllm_worker, WorkerRequest("stop-vllm", p, params))
    resumed = stream(ray_local, vllm_worker, WorkerRequest("stop-resumed", p, params,
                                                           resume_token_ids=tuple(tokens(ours)[:3])))
    assert text(ours) == full[:full.index(stop)] + (stop if include else "")
    assert (ours[-1].reason, ours[-1].stop_reason) == ("stop", stop)
    for events in (theirs, resumed):
        assert (events[-1].reason, events[-1].stop_reason) == ("stop", stop)
    assert tokens(theirs) == tokens(ours) and text(theirs) == text(ours)
    assert tokens(ours)[:3] + tokens_from(resumed, 3) == tokens(ours)
    assert "".join(stop_texts) == text(ours) and "".join(stop_texts[:3]) + text(resumed) == text(ours)
    wait_until(lambda: ray_local.get(vllm_worker.load.remote()).requests == (), 10,
               "the vLLM worker to hold no request after its stop")


@pytest.fixture(scope="module")
def vllm_tp2_worker(ray_local, model_dir):
    handle = start(ray_local, "vllm-tp2", model_dir, backend="vllm", tensor_parallel_size=2)
    yield handle
    ray_local.get(handle.shutdown.remote())
    ray_local.kill(handle)


def test_tensor_parallel_vllm_worker_gives_the_same_tokens(ray_local, vllm_tp2_worker, greedy_offline):
    """tensor_parallel_size 2: vLLM's own rank processes, started from the worker actor,
    each bound to its share of the actor's CPUs, give one rank's greedy tokens."""
    for i, (p, want) in enumerate(zip(PROMPTS, greedy_offline)):
        events = stream(ray_local, vllm_tp2_worker, WorkerRequest(f"tp2-{i}", p, GREEDY))
        assert tokens(events) == want["token_ids"]
        assert isinstance(events[-1], Finished) and events[-1].usage.completion_tokens == GREEDY.max_tokens


def test_tensor_parallel_vllm_request_moves_with_its_kv(ray_local, model_dir, vllm_worker, vllm_tp2_worker):
    """Between two vLLM workers of two ranks each, a request's KV goes along, each rank
    sending its share of the heads: the destination computes none of the prompt, and
    the tokens are an undisturbed run's. Into a worker of one rank, the layouts differ
    and the request is computed again there, as correct."""
    handles = {"vllm-tp2": vllm_tp2_worker, "vllm-w0": vllm_worker,
               "tp2-dst": start(ray_local, "tp2-dst", model_dir, backend="vllm", tensor_parallel_size=2)}
    params = SamplingParams(temperature=0, max_tokens=120, ignore_eos=True)
    try:
        # Prompts seen by no worker before (seeds 21, 22), so a cached token can only
        # have come with the KV: 300 tokens, 2 full blocks of vLLM's 128, then a partial one.
        for rid, seed, source, destination, carried in (("tp2-to-tp2", 21, "vllm-tp2", "tp2-dst", True),
                                                         ("tp2-to-tp1", 22, "tp2-dst", "vllm-w0", False)):
            p = prompt(seed, 300)
            order = MigrationOrder(f"m-{rid}", rid, destination, handles[destination], "manual")
            events, results = run(Follower(handles, first=source).run(WorkerRequest(rid, p, params), 10, [order],
                                                                      source))
            assert results[0].outcome == "committed", results[0]
            assert tokens(events) == undisturbed(model_dir, p, params)
            assert isinstance(events[-1], Finished) and events[-1].usage.completion_tokens == 120
            assert (results[0].stages, results[0].blocks) == ((2, 3) if carried else (0, 0)), results[0]
            assert events[-1].usage.cached_tokens == (len(p) if carried else 0)
    finally:
        ray_local.get(handles["tp2-dst"].shutdown.remote())
        ray_local.kill(handles["tp2-dst"])
