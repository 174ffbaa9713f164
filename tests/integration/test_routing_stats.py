"""The routing statistics a MoE model counts as it runs equal exact counts of the
routing transformers computes on the same weights and tokens (its router logits'
top-k), token by token; and the affinity model routes as its construction says."""

from __future__ import annotations

import random

import torch
from transformers import AutoModelForCausalLM

from workers.engine.block_manager import BlockManager
from workers.engine.model_runner import ModelRunner
from workers.engine.sequence import Sequence
from workers.experts.stats import RoutingStats
from workers.models import affinity_routing
from workers.models.registry import load_model
from workers.sampling_params import SamplingParams


def reference_routing(model_dir, prompts: list[list[int]], top_k: int) -> list[list[list[int]]]:
    """[layer][token] -> transformers' top-k experts, prompt after prompt."""
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    per_prompt = []
    with torch.no_grad():
        for tokens in prompts:
            logits = hf(input_ids=torch.tensor([tokens]), output_router_logits=True).router_logits
            per_prompt.append([torch.topk(torch.softmax(x.float(), -1), top_k, -1).indices.tolist() for x in logits])
    return [sum((p[layer] for p in per_prompt), []) for layer in range(len(per_prompt[0]))]


def counted_by_our_model(model_dir, prompts: list[list[int]]) -> RoutingStats:
    """One batched prefill forward of every prompt; the recorder's counts."""
    cfg, model = load_model(model_dir)
    blocks = BlockManager(num_blocks=256, block_size=16)
    runner = ModelRunner(cfg, model, 256, 16)
    seqs = [Sequence(f"r{i}", list(p), len(p), SamplingParams(), max_tokens=1) for i, p in enumerate(prompts)]
    for seq in seqs:
        blocks.grow(seq, seq.num_tokens)
    model.routing.take()  # nothing before this forward counts
    runner.execute([(seq, seq.num_tokens) for seq in seqs])
    return model.routing.take()


def test_the_models_routing_counts_equal_transformers_routing_counted_token_by_token(make_model):
    model_dir = make_model("tiny-moe-affinity")
    rng = random.Random(11)
    prompts = [[rng.randrange(7, 1024) for _ in range(n)] for n in (45, 80, 13)]
    expected = RoutingStats.count(reference_routing(model_dir, prompts, top_k=2), 16)
    got = counted_by_our_model(model_dir, prompts)
    assert got == expected
    assert sum(got.loads[0]) == 2 * (45 + 80 + 13)  # every token, twice (top-2)
    assert sum(map(sum, got.transitions[0])) == 2 * (45 + 80 + 13)


def test_the_affinity_model_routes_hot_experts_with_strong_layer_to_layer_affinity(make_model):
    model_dir = make_model("tiny-moe-affinity")
    rng = random.Random(0)
    tokens = [rng.randrange(7, 1024) for _ in range(600)]
    routing = reference_routing(model_dir, [tokens], top_k=2)
    lane = affinity_routing.lanes(1024, 16, seed=0)
    perms = affinity_routing.layer_permutations(6, 16, seed=0)
    for layer, chosen in enumerate(routing):
        follows = sum(c[0] == perms[layer][lane[t]] for t, c in zip(tokens, chosen)) / len(tokens)
        assert follows > 0.7, (layer, follows)  # the lane sets most first choices
    stats = RoutingStats.count(routing, 16)
    for layer, loads in enumerate(stats.loads):
        assert max(loads) > 2.5 * sum(loads) / 16, (layer, loads)  # hot experts
    for layer, moves in enumerate(stats.transitions):
        # A first choice's tokens nearly all pick one same expert among their two at
        # l+1 (1.0 to 0.93 on this model); each token counts twice in its row.
        tokens_of = [sum(row) / 2 for row in moves]
        keep = sum(max(row) for row in moves) / sum(tokens_of)
        assert keep > 0.85, (layer, keep)
