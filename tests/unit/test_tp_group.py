"""A tensor-parallel group's command broadcast (workers/parallel/group.py) on a real
two-process gloo group: a rank waits for its leader's next command however long the
leader idles, yet sees a dead leader at once; other collectives keep the timeout.
Idling past the timeout used to end every rank, and with them the worker."""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import socket
import time

import torch.distributed as dist

from workers.parallel.group import RankFailure, TPGroup

TIMEOUT_S = 1.0


def join(port: int, rank: int) -> TPGroup:
    store = dist.TCPStore("127.0.0.1", port, 2, rank == 0, timeout=datetime.timedelta(seconds=60))
    store.add("joined", 1)
    while int(store.add("joined", 0)) < 2:  # both processes are up: the rendezvous takes no time
        time.sleep(0.01)
    pg = dist.ProcessGroupGloo(store, rank, 2, datetime.timedelta(seconds=TIMEOUT_S))
    return TPGroup(rank=rank, size=2, pg=pg, store=store)


def leader(port: int, follower_done: mp.Event) -> None:
    group = join(port, 0)
    time.sleep(3 * TIMEOUT_S)  # the leader idles: the condition under test
    group.broadcast_object({"step": 1})
    follower_done.wait(60)  # its next, non-idle wait has timed out
    os._exit(0)  # dies while the follower waits for a command


def follower(port: int, results: mp.Queue, done: mp.Event) -> None:
    group = join(port, 1)
    results.put(group.broadcast_object(idle=True))
    try:
        group.broadcast_object()  # not idle: the group's timeout applies
    except RankFailure:
        results.put("timed out")
    done.set()
    start = time.monotonic()
    try:
        group.broadcast_object(idle=True)
    except RankFailure:
        results.put(("leader gone", time.monotonic() - start < 10))


def test_an_idle_leader_keeps_its_ranks_and_a_dead_one_ends_them():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    results, done = ctx.Queue(), ctx.Event()
    processes = [ctx.Process(target=leader, args=(port, done)), ctx.Process(target=follower, args=(port, results, done))]
    for p in processes:
        p.start()
    try:
        assert results.get(timeout=60) == {"step": 1}
        assert results.get(timeout=30) == "timed out"
        assert results.get(timeout=30) == ("leader gone", True)
    finally:
        for p in processes:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
