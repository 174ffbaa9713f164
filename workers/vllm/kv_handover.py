"""A running request's KV cache, out of one vLLM engine and into another: what lets a
request move between two vLLM workers without computing its prompt again.

vLLM 0.32 keeps its KV cache to itself; its one door is the KV connector interface,
loaded by module path (`kv_transfer_config.kv_connector_module_path`).
`HandoverConnector` is ours. Its scheduler half lives in the worker's process, with
the in-process engine core (workers/vllm/engine.py); its worker half lives in each
tensor-parallel rank: the worker's process itself with one rank, vLLM's rank
processes with more. Each rank holds its share of the KV heads, so each copies and
writes its own share; the engine reaches them through vLLM's `collective_rpc`
(the `rank_*` functions here, which run in every rank):

- source: `export_kv` copies a request's blocks out of each rank's KV tensors (the
  ones its connector was handed, `register_kv_caches`), between two steps, before the
  request is taken out of the engine;
- destination: `stage` holds a payload for a request about to be added, each rank its
  own share (with several ranks, each reads only its own from shared memory:
  workers/vllm/rank_shares.py); the scheduler asks the connector how many of its
  tokens are available outside (`get_num_new_matched_tokens`), allocates blocks for
  them (`update_state_after_alloc`), and before the next forward every rank writes its
  share into those blocks (`start_load_kv`). vLLM then computes only what is left:
  the last token, whose output is the next one.

Its full blocks no longer change, so they are copied while it decodes (between two
steps, `copy_full_blocks` in the engine); the rest is copied once it is taken out
of the source's engine, while it is in neither (workers/recompute_move.py).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from workers.vllm import rank_shares
from workers.vllm.rank_shares import Blocks

CONNECTOR_NAME = "HandoverConnector"
logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class KVLayout:
    """What two engines must share for one's blocks to be valid in the other's."""

    model: str  # as the cluster config names it: the same weights on both sides
    block_size: int
    layers: tuple[tuple[str, tuple[int, ...], str], ...]  # each rank's: (name, per-block shape, dtype)
    ranks: int = 1  # tensor-parallel ranks, each holding the share of the heads that `layers` shows


@dataclass(frozen=True)
class KVPayload:
    """KV of one request's first `num_tokens` tokens: for each rank and layer, its
    blocks from `first_block` on (a pre-copied part starts at 0; the last part, after
    them)."""

    layout: KVLayout
    num_tokens: int
    shards: tuple[Blocks, ...]  # one per tensor-parallel rank, in rank order
    first_block: int = 0

    @property
    def num_blocks(self) -> int:
        return _num_blocks(self.shards[0]) if self.shards else 0

    @property
    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for shard in self.shards for t in shard.values())


# What the engine uses to run a function in every rank: vLLM's collective_rpc, which
# calls it with the rank's vLLM worker first and returns the results in rank order.
OnRanks = Callable[..., list]


@dataclass
class _Load:
    key: str
    first_token: int  # tokens before this were found in the local prefix cache
    block_ids: list[int] = field(default_factory=list)  # all of the request's, once allocated


@dataclass
class _HandoverMeta(KVConnectorMetadata):
    loads: list[_Load]


class _Shared:
    """Where a process's connector halves and the engine meet (one engine per worker
    process; a rank process is one rank of one engine)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.block_size = 0
        self.kv_caches: dict[str, torch.Tensor] = {}  # layer name → this rank's KV tensor
        self.block_dim: dict[str, int] = {}
        self.staged: dict[str, int] = {}  # scheduler side: handover key → its tokens, until scheduled
        self.shards: dict[str, list[tuple[int, Blocks]]] = {}  # rank side: key → (first block, blocks), until loaded


_SHARED = _Shared()
_PARAM = "yard_handover"  # the request's kv_transfer_params key that names its payload


def layout(model: str, on_ranks: OnRanks) -> Optional[KVLayout]:
    """The engine's KV layout, for `model`: its ranks', which must agree; None where
    a rank's KV caches are laid out in a way this module cannot read."""
    per_rank = on_ranks(rank_layout, model)
    if not per_rank or None in per_rank or len(set(per_rank)) != 1:
        return None
    return dataclasses.replace(per_rank[0], ranks=len(per_rank))


def rank_layout(_worker: Any, model: str) -> Optional[KVLayout]:
    """In a rank: its own share's layout."""
    if not _SHARED.kv_caches:
        return None
    return KVLayout(model, _SHARED.block_size, tuple((name, _per_block_shape(name), str(t.dtype))
                                                     for name, t in sorted(_SHARED.kv_caches.items())))


def _per_block_shape(name: str) -> tuple[int, ...]:
    t, dim = _SHARED.kv_caches[name], _SHARED.block_dim[name]
    return tuple(s for i, s in enumerate(t.shape) if i != dim)


def handover_params(key: str) -> dict[str, Any]:
    """SamplingParams.extra_args that point the connector at a staged payload."""
    return {"kv_transfer_params": {_PARAM: key}}


def export_kv(own: KVLayout, block_ids: list[int], num_tokens: int, on_ranks: OnRanks,
              first_block: int = 0) -> KVPayload:
    """Copies of the blocks holding a request's first num_tokens tokens, from
    first_block on, from every rank. Called between two steps, on the thread that
    steps the engine."""
    needed = block_ids[first_block: -(-num_tokens // own.block_size)]
    return KVPayload(own, num_tokens, tuple(on_ranks(rank_export, needed)), first_block)


def rank_export(_worker: Any, block_ids: list[int]) -> Blocks:
    """In a rank: copies of its share of these blocks."""
    blocks = {}
    for name, t in _SHARED.kv_caches.items():
        dim = _SHARED.block_dim[name]
        index = torch.tensor(block_ids, dtype=torch.long, device=t.device)
        # Host memory, so that the payload travels between workers as any object does.
        blocks[name] = t.index_select(dim, index).movedim(dim, 0).contiguous().cpu()
    return blocks


@dataclass(frozen=True)
class KVParts:
    """A request's KV as it came: the parts pre-copied while it decoded, then the
    last one, in block order. The loader writes each into the request's blocks (a
    block sent twice keeps the later copy); merging them into one tensor first would
    copy all of the KV once more, inside the pause."""

    parts: tuple[KVPayload, ...]

    @property
    def num_tokens(self) -> int:
        return max(p.num_tokens for p in self.parts)


def kv_parts(parts: list[KVPayload]) -> KVParts:
    """The pre-copied parts and the last one, checked to cover the blocks from 0."""
    parts = sorted(parts, key=lambda p: p.first_block)  # stable: the last one sent stays after its equals
    covered = 0
    for part in parts:
        if part.first_block > covered:
            raise ValueError(f"KV parts leave blocks {covered}..{part.first_block - 1} out")
        covered = max(covered, part.first_block + part.num_blocks)
    return KVParts(tuple(parts))


def stage(key: str, kv: KVParts | KVPayload, own: KVLayout, on_ranks: OnRanks) -> None:
    """Hold `kv` for the request about to be added with handover_params(key): each
    rank its share, the scheduler the number of tokens. One rank (the worker's own
    process) takes its share as it is; with more, each reads its own from shared
    memory (vLLM sends a call's arguments to every rank: workers/vllm/rank_shares.py)."""
    kv = kv if isinstance(kv, KVParts) else kv_parts([kv])
    for part in kv.parts:
        if part.layout != own:
            raise ValueError(f"the KV handed over is laid out for {part.layout.model!r} with blocks of "
                             f"{part.layout.block_size} over {part.layout.ranks} rank(s), not as this engine's "
                             f"({own.model!r}, {own.block_size}, {own.ranks})")
    if own.ranks == 1:
        on_ranks(rank_stage, key, [[(part.first_block, part.shards[0]) for part in kv.parts]])
    else:
        per_rank = [[(part.first_block, part.shards[rank]) for part in kv.parts] for rank in range(own.ranks)]
        with rank_shares.published(per_rank) as shares:
            on_ranks(rank_stage, key, shares)
    with _SHARED.lock:
        _SHARED.staged[key] = kv.num_tokens


def rank_stage(_worker: Any, key: str, shares: list) -> None:
    """In a rank: keep its share of each part until the request's blocks are
    allocated. `shares`, in rank order: each rank's (first block, blocks) parts, or
    where to read them (a RankShare)."""
    from vllm.distributed import get_tensor_model_parallel_rank

    share = shares[get_tensor_model_parallel_rank()]
    parts = rank_shares.read_share(share) if isinstance(share, rank_shares.RankShare) else share
    with _SHARED.lock:
        _SHARED.shards[key] = parts


def unstage(key: str, on_ranks: Optional[OnRanks] = None) -> None:
    """Drop what is held for `key`: the scheduler's count, and with on_ranks, the
    ranks' shares (of a request that leaves before its KV was loaded)."""
    with _SHARED.lock:
        _SHARED.staged.pop(key, None)
    if on_ranks is not None:
        on_ranks(rank_unstage, key)


def rank_unstage(_worker: Any, key: str) -> None:
    with _SHARED.lock:
        _SHARED.shards.pop(key, None)


def _key(request: Any) -> Optional[str]:
    return (request.kv_transfer_params or {}).get(_PARAM)


class HandoverConnector(KVConnectorBase_V1):
    """Loads staged payloads into the blocks the scheduler allocates for them; saves
    nothing (export_kv reads the caches directly)."""

    def __init__(self, vllm_config: Any, role: KVConnectorRole, kv_cache_config: Any = None) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        self._block_size = vllm_config.cache_config.block_size
        _SHARED.block_size = self._block_size
        self._loads: dict[str, _Load] = {}  # scheduler side, by vLLM's request id: loads to make

    # -- scheduler side ----------------------------------------------------------------
    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int, bool]:
        key = _key(request)
        with _SHARED.lock:
            staged_tokens = _SHARED.staged.get(key) if key is not None else None
        if staged_tokens is None:
            return 0, False
        # At least the last token is computed here: its output is the next token.
        available = min(staged_tokens, request.num_tokens - 1)
        if available <= num_computed_tokens:
            return 0, False
        self._loads[request.request_id] = _Load(key, num_computed_tokens)
        return available - num_computed_tokens, False

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        load = self._loads.get(request.request_id)
        if load is None:
            return
        if num_external_tokens == 0:
            del self._loads[request.request_id]
            return
        load.block_ids = list(blocks.get_block_ids()[0])

    def build_connector_meta(self, scheduler_output: Any) -> KVConnectorMetadata:
        ready = [self._loads.pop(rid) for rid, load in list(self._loads.items()) if load.block_ids]
        for load in ready:
            unstage(load.key)  # loaded once; preempted later, the request computes its KV again
        return _HandoverMeta(ready)

    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, Optional[dict[str, Any]]]:
        self._loads.pop(request.request_id, None)
        return False, None

    # -- worker side -----------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        num_blocks = self._kv_cache_config.num_blocks if self._kv_cache_config is not None else None
        dims = {name: _block_dim(tensor, num_blocks) for name, tensor in kv_caches.items()}
        if None in dims.values():
            # A layout this module cannot read: no handover, requests move by recompute.
            logger.warning("KV handover off: cannot tell the block dimension of KV caches shaped %s",
                           sorted({tuple(t.shape) for t in kv_caches.values()}))
            return
        _SHARED.kv_caches.update(kv_caches)
        _SHARED.block_dim.update(dims)

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        if not isinstance(meta, _HandoverMeta):
            return
        for load in meta.loads:
            with _SHARED.lock:
                parts = _SHARED.shards.pop(load.key, None)
            if parts is None:  # staged on every rank before the request was added: a bug if not
                raise RuntimeError(f"KV handover {load.key!r}: this rank holds no share of it")
            first_block = load.first_token // self._block_size  # those before are the local prefix hit's
            for part_first, blocks in parts:
                low = max(first_block, part_first)
                high = min(len(load.block_ids), part_first + _num_blocks(blocks))
                if low < high:
                    _write_blocks(blocks, part_first, low, high, load.block_ids)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        return

    def wait_for_save(self) -> None:
        return


def _num_blocks(blocks: Blocks) -> int:
    return next(iter(blocks.values())).shape[0] if blocks else 0


def _write_blocks(part: Blocks, part_first: int, low: int, high: int, block_ids: list[int]) -> None:
    """The request's blocks low..high-1, from a part that starts at block part_first,
    into the blocks allocated for them (this rank's share)."""
    target = torch.tensor(block_ids[low:high], dtype=torch.long)
    for name, tensor in _SHARED.kv_caches.items():
        dim = _SHARED.block_dim[name]
        blocks = part[name][low - part_first: high - part_first].movedim(0, dim)
        tensor.index_copy_(dim, target.to(tensor.device), blocks.to(tensor.device))


def _block_dim(tensor: torch.Tensor, num_blocks: Optional[int]) -> Optional[int]:
    """Which dimension of a layer's KV tensor counts blocks: the one sized num_blocks,
    if exactly one is."""
    matches = [i for i, s in enumerate(tensor.shape) if s == num_blocks]
    return matches[0] if num_blocks is not None and len(matches) == 1 else None
