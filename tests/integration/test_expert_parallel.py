"""Expert parallelism (EP=N over the tensor-parallel ranks, all-to-all over gloo)
against EP=1, which test_logits_vs_hf.py holds to transformers' Mixtral: the same
greedy tokens and logprobs within 1e-4, for each placement policy and with replicas."""

from __future__ import annotations

import json
import random
import threading

import pytest
import torch

from workers import LLM, SamplingParams
from workers.engine.config import EngineConfig
from workers.engine.engine import LLMEngine
from workers.engine.block_manager import BlockManager
from workers.engine.model_runner import ModelRunner
from workers.engine.sequence import Sequence
from workers.experts.policies import PlacementShape, place_experts
from workers.experts.table import PlacementTable
from workers.models.registry import load_model
from workers.models.weights import CheckpointFiles
from workers.parallel.group import join_group, open_store

PARAMS = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, logprobs=3)
# Chunked prefill (a small token budget) and prefix caching stay on.
ENGINE_ARGS = dict(max_num_batched_tokens=32, enable_prefix_caching=True, tp_cpus_per_rank=0.5,
                   tp_timeout_s=20.0)
MODEL = "tiny-moe-affinity"  # 16 experts, 6 layers, top-2, skewed and correlated routing


def prompts() -> list[list[int]]:
    rng = random.Random(5)
    shared = [rng.randrange(7, 1000) for _ in range(34)]  # two full blocks cached
    return [shared + [rng.randrange(7, 1000) for _ in range(n)] for n in (3, 29)] + \
           [[rng.randrange(7, 1000) for _ in range(n)] for n in (9, 61, 1)]


def run_twice(llm: LLM) -> list:
    """Generate, then again: the second pass hits the prefix cache."""
    outs = llm.generate(prompts(), PARAMS) + llm.generate(prompts(), PARAMS)
    assert llm.engine.blocks.prefix_hit_tokens > 0
    return outs


@pytest.fixture(scope="module")
def reference(make_model):
    """EP=1 outputs, and the routing statistics they produced (for the policies)."""
    with LLM(model=str(make_model(MODEL)), **ENGINE_ARGS) as llm:
        outs = run_twice(llm)
        return outs, llm.engine.runner.model.routing.take()


def assert_same_outputs(got: list, want: list) -> None:
    for a, b in zip(got, want, strict=True):
        assert a.token_ids == b.token_ids
        for x, y in zip(a.logprobs, b.logprobs, strict=True):
            assert [t for t, _ in x.top_logprobs] == [t for t, _ in y.top_logprobs]
            assert max(abs(p - q) for (_, p), (_, q) in zip(x.top_logprobs, y.top_logprobs)) <= 1e-4


@pytest.mark.parametrize("ep, policy, slots_per_rank", [
    (4, "contiguous", None),
    (2, "balanced", 10),  # 25% redundant slots: replicas of hot experts
    (4, "affinity", None),
    (4, "combined", 5),
])
def test_expert_parallel_matches_ep1(ray_local, make_model, reference, tmp_path, ep, policy, slots_per_rank):
    want, stats = reference
    placement = "contiguous"
    if policy != "contiguous":
        table = place_experts(policy, stats, PlacementShape(ep, slots_per_rank or 16 // ep))
        if slots_per_rank:
            assert max(table.replica_counts(0)) > 1
        placement = str(tmp_path / "table.json")
        (tmp_path / "table.json").write_text(json.dumps(table.to_dict()))
    with LLM(model=str(make_model(MODEL)), tensor_parallel_size=ep, expert_parallel_size=ep,
             expert_placement=placement, **ENGINE_ARGS) as llm:
        got = run_twice(llm)
        model, engine = llm.engine.runner.model, llm.engine
        moved = model.dispatch_counts.take()
        assert model.layers[0].mlp.w13.shape[0] == (slots_per_rank or 16 // ep)  # whole experts, own slots
    assert_same_outputs(got, want)
    # Every (token, choice) pair of every forward went through the all-to-all, once.
    for layer in moved:
        assert sum(map(sum, layer)) == 2 * engine._computed_tokens
        assert sum(layer[r][r] for r in range(ep)) < sum(map(sum, layer))  # some crossed ranks


@pytest.mark.parametrize("args, match", [
    (dict(tensor_parallel_size=4, expert_parallel_size=2),
     r"expert_parallel_size must be 1 or tensor_parallel_size \(4\).*got 2"),
    (dict(tensor_parallel_size=2, expert_parallel_size=2, expert_slots_per_rank=5),
     r"2 ranks x 5 slots cannot hold 16 experts"),
    (dict(tensor_parallel_size=2, expert_parallel_size=2, expert_placement="no/such/table.json"),
     r"expert_placement must be 'contiguous' or a placement table's JSON file; 'no/such/table.json'"),
])
def test_bad_expert_parallel_settings_are_refused_naming_the_value(make_model, args, match):
    with pytest.raises(ValueError, match=match):
        LLMEngine(EngineConfig(model=str(make_model(MODEL)), **args))


def test_expert_parallelism_on_a_dense_model_is_refused(make_model):
    with pytest.raises(ValueError, match=r"expert_parallel_size 2 needs a mixture-of-experts model"):
        LLMEngine(EngineConfig(model=str(make_model("tiny-llama")), tensor_parallel_size=2, expert_parallel_size=2))


@pytest.mark.parametrize("slots, match", [
    ([[e % 16 for e in range(16)]] * 5, r"table has 5 layers of 16 experts; the model has 6 layers of 16"),
    ([list(range(15)) + [16]] * 6, r"layer 0 slot 15 names expert 16; the model has experts 0..15"),
    ([list(range(15)) + [14]] * 6, r"layer 0 places no slot for experts \[15\]"),
    ([list(range(16)) + [0]] * 6, r"expert_parallel_size 2 does not divide the 17 expert slots"),
])
def test_a_bad_placement_table_is_refused_naming_the_value(make_model, tmp_path, slots, match):
    path = tmp_path / "table.json"
    path.write_text(json.dumps({"num_experts": 16, "num_ranks": 2, "slots": slots}))
    with pytest.raises(ValueError, match=match):
        LLMEngine(EngineConfig(model=str(make_model(MODEL)), tensor_parallel_size=2, expert_parallel_size=2,
                               expert_placement=str(path)))


def generate_with_a_move(engine: LLMEngine, new_table, move_at_step: int) -> dict[str, list]:
    """Every prompt at once; the re-placement begins after `move_at_step` steps."""
    outs: dict[str, list] = {f"p{i}": [] for i in range(len(prompts()))}
    for rid, tokens in zip(outs, prompts()):
        engine.add_request(rid, tokens, PARAMS)
    steps = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            outs[out.request_id].extend(out.new_logprobs)
        steps += 1
        if steps == move_at_step:
            engine.replace_experts(new_table)
            assert engine.expert_moves.moving
    return outs


def assert_same_tokens(got: dict[str, list], want: list) -> None:
    for tokens, ref in zip(got.values(), want[:len(got)], strict=True):
        assert [t.token_id for t in tokens] == ref.token_ids
        for x, y in zip(tokens, ref.logprobs, strict=True):
            assert max(abs(p - q) for (_, p), (_, q) in zip(x.top_logprobs, y.top_logprobs)) <= 1e-4


def assert_weights_are_the_checkpoints(model_dir, model) -> None:
    """Rank 0's slots hold exactly the checkpoint's weights of the experts its table names."""
    with CheckpointFiles(model_dir) as files:
        for layer, decoder in enumerate(model.layers):
            for slot, expert in enumerate(model.placement.experts_on(layer, 0)):
                name = f"model.layers.{layer}.block_sparse_moe.experts.{expert}."
                gate, up = decoder.mlp.w13[slot].chunk(2)
                assert torch.equal(gate, files.get(name + "w1.weight"))
                assert torch.equal(up, files.get(name + "w3.weight"))
                assert torch.equal(decoder.mlp.w2[slot], files.get(name + "w2.weight"))


@pytest.mark.parametrize("ep, policy, slots_per_rank", [(2, "balanced", 10), (4, "combined", 5)])
def test_a_live_replacement_mid_generation_keeps_every_token(ray_local, make_model, reference, ep, policy,
                                                             slots_per_rank):
    want, stats = reference
    new = place_experts(policy, stats, PlacementShape(ep, slots_per_rank))
    engine = LLMEngine(EngineConfig(model=str(make_model(MODEL)), tensor_parallel_size=ep, expert_parallel_size=ep,
                                    expert_slots_per_rank=slots_per_rank, **ENGINE_ARGS))
    try:
        old = engine.runner.model.placement
        changed = sum(new.slots[layer] != old.slots[layer] for layer in range(new.num_layers))
        assert changed == new.num_layers  # every layer moves
        got = generate_with_a_move(engine, new, move_at_step=5)
        [result] = engine.expert_moves.results
        assert (result.outcome, result.layers_moved, result.error) == ("done", changed, None)
        assert result.steps_delayed == changed  # one layer staged per step, the swap between two
        assert engine.runner.model.placement == new
        assert_weights_are_the_checkpoints(make_model(MODEL), engine.runner.model)
    finally:
        engine.shutdown()
    assert_same_tokens(got, want)


def test_a_move_that_fails_to_stage_is_aborted_and_the_old_table_kept(ray_local, make_model, reference,
                                                                     monkeypatch):
    want, stats = reference
    new = place_experts("balanced", stats, PlacementShape(2, 10))
    engine = LLMEngine(EngineConfig(model=str(make_model(MODEL)), tensor_parallel_size=2, expert_parallel_size=2,
                                    expert_slots_per_rank=10, **ENGINE_ARGS))
    try:
        mover, old = engine.runner.model.mover, engine.runner.model.placement
        staged = []
        real_allocate = mover._allocate

        def allocate_twice(shard):  # rank 0 runs out of memory at the third layer
            if len(staged) == 2:
                raise MemoryError("no room for the staging buffers")
            staged.append(shard.layer_index)
            return real_allocate(shard)

        monkeypatch.setattr(mover, "_allocate", allocate_twice)
        got = generate_with_a_move(engine, new, move_at_step=3)
        [result] = engine.expert_moves.results
        assert result.outcome == "aborted" and result.layers_moved == 0
        assert "1 rank(s) could not stage layer 2" in result.error and "no room" in result.error
        assert engine.runner.model.placement == old and mover.staged == {}
        assert not engine.expert_moves.moving
        assert_weights_are_the_checkpoints(make_model(MODEL), engine.runner.model)
        # The other rank dropped its staging too: a second move runs to the end.
        monkeypatch.setattr(mover, "_allocate", real_allocate)
        got_again = generate_with_a_move(engine, new, move_at_step=2)
        assert engine.expert_moves.results[-1].outcome == "done"
        assert engine.runner.model.placement == new
    finally:
        engine.shutdown()
    assert_same_tokens(got, want)
    assert_same_tokens(got_again, want)


def test_a_replacement_table_of_another_shape_is_refused(ray_local, make_model, reference):
    _, stats = reference
    engine = LLMEngine(EngineConfig(model=str(make_model(MODEL)), tensor_parallel_size=2, expert_parallel_size=2,
                                    **ENGINE_ARGS))
    try:
        with pytest.raises(ValueError, match=r"must keep 6 layers, 16 experts, 2 ranks and 8 slots per rank; "
                                             r"got 6, 16, 2 and 10"):
            engine.replace_experts(place_experts("balanced", stats, PlacementShape(2, 10)))
        engine.replace_experts(place_experts("affinity", stats, PlacementShape(2, 8)))
        with pytest.raises(RuntimeError, match="already under way"):
            engine.replace_experts(place_experts("balanced", stats, PlacementShape(2, 8)))
        while engine.expert_moves.moving:
            engine.advance_expert_move()  # an idle engine moves too
        assert engine.expert_moves.results[-1].steps_delayed == 0
    finally:
        engine.shutdown()


def test_two_expert_parallel_ranks_give_transformers_logits(make_model):
    """Both ranks in this process (two threads over a gloo group), a table with
    replicas that differs per layer: prefill and decode logits against transformers'."""
    from tests.integration.test_logits_vs_hf import reference_logits

    model_dir = make_model(MODEL)
    rows = tuple(tuple(list(range(16))[layer:] + list(range(16))[:layer] + [layer, layer + 1, 7, 9])
                 for layer in range(6))
    table = PlacementTable(16, 2, rows)
    tokens = [random.Random(9).randrange(7, 1000) for _ in range(40)]
    store = open_store("127.0.0.1", 2, 20.0)
    logits: dict[int, torch.Tensor] = {}

    def rank(r: int) -> None:
        group = join_group(store if r == 0 else None, "127.0.0.1", store.port, r, 2, 20.0)
        cfg, model = load_model(model_dir, tp=group, placement=table)
        runner = ModelRunner(cfg, model, 64, 4, tp=group)
        blocks = BlockManager(num_blocks=64, block_size=4)
        seq = Sequence("ep", tokens[:30], 30, SamplingParams(), max_tokens=16)
        blocks.grow(seq, seq.num_tokens)
        out = [runner.run(runner.prepare([(seq, 30)]), 1)]
        seq.num_computed_tokens = 30
        for i in range(30, 40):  # decode the rest one token a step
            seq.token_ids.append(tokens[i])
            blocks.grow(seq, 1)
            out.append(runner.run(runner.prepare([(seq, 1)]), i))
            seq.num_computed_tokens += 1
        logits[r] = torch.cat(out)

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    expected = reference_logits(model_dir, tokens)
    assert torch.equal(logits[0], logits[1])  # every rank ends with the same logits
    assert (logits[0][0] - expected[29]).abs().max() <= 1e-4  # the prompt's last position
    assert (logits[0][1:] - expected[30:40]).abs().max() <= 1e-4
