"""A tensor-parallel rank other than 0: a Ray actor that holds its shard of the model
and of the KV cache, and follows the leader's commands over the process group. With
attention offloading its attention workers hold its KV heads instead, and it starts
them itself, as the leader does its own.

The leader (rank 0) owns the scheduler. Each step it broadcasts the step's inputs
through the group; every rank runs the same forward, joining the all-reduces. No Ray
call crosses per step: Ray only starts the actor and, once, its command loop.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from workers.engine.model_runner import ModelRunner
from workers.experts.table import PlacementTable
from workers.models.registry import load_model
from workers.models.expert_mover import follow
from workers.offload.config import AttentionOffloadConfig
from workers.offload.executor import OffloadExecutor
from workers.parallel.bundles import WorkerBundles, adopt_worker_group
from workers.parallel.commands import RankCommand, RunStep, StageExperts, Stop, SwapExperts
from workers.parallel.group import TPGroup, join_group


class RankWorker:
    def __init__(self, model_dir: str, dtype: Optional[str], rank: int, size: int, num_blocks: int,
                 block_size: int, device: str, timeout_s: float, placement: Optional[dict] = None,
                 offload: Optional[AttentionOffloadConfig] = None) -> None:
        self.args = (Path(model_dir), dtype, device)
        self.offload_config = offload
        self.offload: Optional[OffloadExecutor] = None  # this rank's attention workers
        self.placement = PlacementTable.from_dict(placement) if placement is not None else None
        self.rank, self.size = rank, size
        self.num_blocks, self.block_size = num_blocks, block_size
        self.timeout_s = timeout_s
        self.group: Optional[TPGroup] = None
        self.runner: Optional[ModelRunner] = None

    def join(self, host: str, port: int) -> int:
        """Join the leader's process group, then load this rank's shard."""
        self.group = join_group(None, host, port, self.rank, self.size, self.timeout_s)
        model_dir, dtype, device = self.args
        cfg, model = load_model(model_dir, dtype, device, tp=self.group, placement=self.placement)
        offload = self.offload_config
        if offload is not None:
            # This rank's heads go to attention workers of its own, in their bundles of
            # the group this rank sits in (workers/parallel/bundles.py).
            layout = WorkerBundles(self.size, offload.workers)
            self.offload = OffloadExecutor(offload, cfg, self.num_blocks, self.block_size, device, self.timeout_s,
                                           adopt_worker_group(layout), self.rank, layout)
        self.runner = ModelRunner(cfg, model, self.num_blocks, self.block_size, device, tp=self.group,
                                  **(self.offload.runner_args() if self.offload else {}))
        return self.rank

    def serve(self) -> str:
        """Follow the leader until it says stop; a failed collective ends it with an error."""
        group, runner = self.group, self.runner
        while True:
            command: RankCommand = group.broadcast_object(idle=True)
            if isinstance(command, RunStep):
                runner.run(runner.attach(command.inputs), command.forward_id)
            elif isinstance(command, Stop):
                if self.offload is not None:
                    self.offload.shutdown()
                return "stopped"
            elif isinstance(command, (StageExperts, SwapExperts)):
                follow(runner.model, command)
            else:
                raise ValueError(f"unknown tensor-parallel command {command!r}")

    # Migration: called on the actor's second thread while serve() follows the steps.
    # The blocks named are pinned (read) or reserved (written) by the leader's engine,
    # so no step touches them meanwhile.
    def read_shard(self, block_ids: list[int], layers: Optional[tuple[int, int]] = None,
                   forward_id: Optional[int] = None) -> torch.Tensor:
        """This rank's shard of the blocks (of layers [start, stop) if given), for the
        destination's same rank. With forward_id, those layers of the running forward
        are waited for first (a handoff streaming a prefill)."""
        if forward_id is not None:
            self.runner.progress.wait(forward_id, layers[1] if layers else self.runner.cfg.num_layers,
                                      self.timeout_s)
        return self.runner.read_blocks(block_ids, layers)

    def write_shard(self, block_ids: list[int], data: torch.Tensor,
                    layers: Optional[tuple[int, int]] = None) -> None:
        self.runner.write_blocks(block_ids, data, layers)
