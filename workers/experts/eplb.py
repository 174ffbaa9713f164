"""Balanced placement with replicas, after DeepSeek's EPLB (expert-parallel load
balancer), layer by layer, in plain Python.

Hierarchical when the experts form groups that divide among nodes (DeepSeek-V3's
group-limited routing keeps a token's experts within few nodes, so a group should not
straddle two): groups are packed onto nodes so that nodes carry equal load; within
each node, the hottest experts get the node's extra slots one at a time (always the
expert with the most load per replica); then the replicas are packed onto the node's
ranks, heaviest first, each to the lightest rank with a free slot. Otherwise the same
with the whole model as one group on one node (global balancing).
"""

from __future__ import annotations

from typing import Optional, Sequence


def rebalance_layer(load: Sequence[float], num_slots: int, num_ranks: int, num_groups: int = 1,
                    num_nodes: int = 1) -> list[int]:
    """One layer's slots: slot -> logical expert, rank-major (num_slots // num_ranks
    slots per rank), given each expert's load (tokens routed to it)."""
    num_experts = len(load)
    _check_shape(num_experts, num_slots, num_ranks, num_groups, num_nodes)
    if num_groups % num_nodes:
        num_groups = num_nodes = 1  # groups cannot be kept whole per node: balance globally
    group_size = num_experts // num_groups
    groups_per_node = num_groups // num_nodes
    # 1. Groups onto nodes. node_order lists the experts node by node (node-major).
    group_load = [sum(load[g * group_size:(g + 1) * group_size]) for g in range(num_groups)]
    node_of_group, place_in_node = balanced_packing(group_load, num_nodes)
    node_order = [0] * num_experts
    for g in range(num_groups):
        first = (node_of_group[g] * groups_per_node + place_in_node[g]) * group_size
        for k in range(group_size):
            node_order[first + k] = g * group_size + k
    # 2. and 3. Within each node: replicas, then replicas onto the node's ranks.
    experts_per_node, slots_per_node = num_experts // num_nodes, num_slots // num_nodes
    ranks_per_node, slots_per_rank = num_ranks // num_nodes, num_slots // num_ranks
    slots = [0] * num_slots
    for node in range(num_nodes):
        experts = node_order[node * experts_per_node:(node + 1) * experts_per_node]
        replica_of, counts = replicate([load[e] for e in experts], slots_per_node)
        per_replica = [load[experts[i]] / counts[i] for i in replica_of]
        rank_of, place_in_rank = balanced_packing(per_replica, ranks_per_node)
        for replica, local in enumerate(replica_of):
            slot = node * slots_per_node + rank_of[replica] * slots_per_rank + place_in_rank[replica]
            slots[slot] = experts[local]
    return slots


def replicate(load: Sequence[float], num_slots: int, max_replicas: Optional[int] = None
              ) -> tuple[list[int], list[int]]:
    """Each expert once, then each extra slot to the expert with the most load per
    replica (the first such, on a tie), among those under max_replicas. Returns
    (slot -> expert, replicas per expert)."""
    if max_replicas is not None and num_slots > max_replicas * len(load):
        raise ValueError(f"{num_slots} slots need more than {max_replicas} replicas of some of {len(load)} experts")
    replica_of = list(range(len(load)))
    counts = [1] * len(load)
    for _ in range(num_slots - len(load)):
        open_ = [e for e in range(len(load)) if max_replicas is None or counts[e] < max_replicas]
        hottest = max(open_, key=lambda e: load[e] / counts[e])  # max keeps the first on a tie
        replica_of.append(hottest)
        counts[hottest] += 1
    return replica_of, counts


def balanced_packing(weights: Sequence[float], num_packs: int) -> tuple[list[int], list[int]]:
    """Pack items into num_packs packs of equal count, balancing their weight: the
    heaviest first, each into the lightest pack that is not full (the first such, on a
    tie). Returns (item -> pack, item -> its place in the pack)."""
    per_pack = len(weights) // num_packs
    if per_pack == 1:
        return list(range(len(weights))), [0] * len(weights)
    pack_of, place = [0] * len(weights), [0] * len(weights)
    pack_weight, pack_items = [0.0] * num_packs, [0] * num_packs
    for item in sorted(range(len(weights)), key=lambda i: -weights[i]):  # stable: equal weights keep their order
        pack = min((p for p in range(num_packs) if pack_items[p] < per_pack), key=pack_weight.__getitem__)
        pack_of[item], place[item] = pack, pack_items[pack]
        pack_weight[pack] += weights[item]
        pack_items[pack] += 1
    return pack_of, place


def _check_shape(num_experts: int, num_slots: int, num_ranks: int, num_groups: int, num_nodes: int) -> None:
    if num_slots < num_experts:
        raise ValueError(f"{num_slots} expert slots cannot hold {num_experts} experts")
    if num_slots % num_ranks:
        raise ValueError(f"expert_parallel_size {num_ranks} does not divide the {num_slots} expert slots")
    if num_ranks % num_nodes:
        raise ValueError(f"{num_nodes} nodes do not divide the {num_ranks} expert-parallel ranks")
    if num_experts % num_groups:
        raise ValueError(f"{num_groups} expert groups do not divide the {num_experts} experts")
    if num_groups % num_nodes == 0 and (num_experts % num_nodes or num_slots % num_nodes):
        raise ValueError(f"{num_nodes} nodes do not divide {num_experts} experts and {num_slots} slots")
