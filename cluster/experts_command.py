"""`yard experts WORKER_ID`: a MoE worker's routing over the last minute, layer by
layer: its tokens, the hottest experts and their share, the load's max over mean, and
how often a first choice's tokens pick the same expert at the next layer. With expert
parallelism also the placement's traffic (cross-rank share, balancedness) and its
re-placements; `--replace` begins a live re-placement from these statistics."""

from __future__ import annotations

import json
from typing import Any, Optional


def print_experts(worker_id: str, as_json: bool = False, replace: bool = False, policy: Optional[str] = None) -> int:
    import ray

    from cluster.serving import connect_ray
    from router.config import MANAGER_NAMESPACE
    from workers.events import worker_actor_name

    connect_ray()
    try:
        worker = ray.get_actor(worker_actor_name(worker_id), namespace=MANAGER_NAMESPACE)
    except ValueError:
        print(f"no worker {worker_id!r} is running (yard status lists them)")
        return 1
    try:
        if replace:
            begun = ray.get(worker.replace_experts.remote(policy))
            print(json.dumps(begun, indent=2) if as_json else
                  f"{worker_id}: re-placement by {begun['policy']} begun; `yard experts {worker_id}` shows its end")
            return 0
        stats = ray.get(worker.experts.remote())
    except ray.exceptions.RayTaskError as e:
        print(f"{worker_id}: {e.cause if isinstance(e.cause, (ValueError, RuntimeError)) else e}")
        return 2
    print(json.dumps(stats, indent=2) if as_json else "\n".join(summary(stats)))
    return 0


def summary(stats: dict[str, Any]) -> list[str]:
    lines = [f"worker {stats['worker']}: {stats['num_layers']} MoE layers x {stats['num_experts']} experts, "
             f"the last {stats['window_s']:g} s; placement: "
             f"{'one rank holds every expert' if stats['table'] is None else 'expert parallel'}",
             f"{'layer':>5}{'tokens':>10}{'max/mean':>10}{'kept next layer':>17}  hottest experts (share)"]
    for layer, loads in enumerate(stats["loads"]):
        total = sum(loads)
        if not total:
            lines.append(f"{layer:>5}{0:>10}")
            continue
        hot = sorted(range(len(loads)), key=lambda e: -loads[e])[:4]
        hottest = ", ".join(f"{e} ({loads[e] / total:.0%})" for e in hot)
        kept = _kept(stats["transitions"][layer], stats["top_k"]) if layer < len(stats["transitions"]) else None
        lines.append(f"{layer:>5}{total:>10}{max(loads) / (total / len(loads)):>10.2f}"
                     f"{'-' if kept is None else f'{kept:.0%}':>17}  {hottest}")
    return lines + (_placement(stats) if stats["table"] is not None else [])


def _placement(stats: dict[str, Any]) -> list[str]:
    table = stats["table"]
    slots = len(table["slots"][0]) // table["num_ranks"]
    lines = [f"placement: {table['num_ranks']} ranks x {slots} slots"
             f"{' (moving)' if stats['moving'] else ''}",
             f"{'layer':>5}{'pairs':>10}{'cross-rank':>12}{'balanced':>10}  replicated experts"]
    for layer, row in enumerate(table["slots"]):
        pairs, crossed, balance = stats["dispatched"][layer], stats["cross_rank"][layer], stats["balancedness"][layer]
        replicated = sorted({e for e in row if row.count(e) > 1})
        lines.append(f"{layer:>5}{pairs:>10}{f'{crossed / pairs:.0%}' if pairs else '-':>12}"
                     f"{'-' if balance is None else f'{balance:.2f}':>10}  {replicated or '-'}")
    for r in stats["replacements"]:
        lines.append(f"re-placement {r['outcome']}: {r['seconds']:.2f} s, {r['layers_moved']} layers moved, "
                     f"{r['steps_delayed']} steps delayed{'; ' + r['error'] if r['error'] else ''}")
    return lines


def _kept(moves: list[list[int]], top_k: int) -> Optional[float]:
    """The share of a first choice's tokens that pick its most frequent successor."""
    tokens = sum(map(sum, moves)) / top_k  # a token counts once per choice at l+1
    return sum(max(row) for row in moves) / tokens if tokens else None
