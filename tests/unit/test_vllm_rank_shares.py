"""Each tensor-parallel rank's share of a staged KV payload, through a file of its own:
every rank reads back exactly its share, and no other rank's bytes."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from workers.vllm import rank_shares
from workers.vllm.rank_shares import published, read_share

LAYERS = ("model.layers.0.attn", "model.layers.1.attn")


def share_of(rank: int, first_blocks: tuple[int, ...], dtype: torch.dtype) -> list[tuple[int, dict]]:
    """One rank's parts: values that differ by rank, part and layer, so a mix-up shows."""
    gen = torch.Generator().manual_seed(rank)
    return [(first, {layer: torch.randn(3 + i, 2, 16, 4, generator=gen).to(dtype) for layer in LAYERS})
            for i, first in enumerate(first_blocks)]


def assert_same(got: list, want: list) -> None:
    assert [first for first, _ in got] == [first for first, _ in want]
    for (_, g), (_, w) in zip(got, want):
        assert sorted(g) == sorted(w)
        for layer in w:
            assert g[layer].dtype == w[layer].dtype and g[layer].shape == w[layer].shape
            assert torch.equal(g[layer], w[layer])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_each_rank_reads_back_exactly_its_own_share(dtype: torch.dtype) -> None:
    shares = [share_of(rank, (0, 2), dtype) for rank in range(3)]
    with published(shares) as placed:
        assert len(placed) == 3 and len({p.path for p in placed}) == 3
        for rank, place in enumerate(placed):
            assert_same(read_share(place), shares[rank])
            # Its file holds its own share and no other rank's: its bytes (aligned), no more.
            own = sum(t.numel() * t.element_size() for _, blocks in shares[rank] for t in blocks.values())
            assert own <= os.path.getsize(place.path) < own + 64 * 2 * len(LAYERS)


def test_a_share_read_stays_whole_after_its_file_is_removed() -> None:
    """The worker removes the files as soon as every rank has read its share, before
    the ranks write it into the request's blocks."""
    shares = [share_of(rank, (0, 4), torch.bfloat16) for rank in range(2)]
    with published(shares) as placed:
        got = [read_share(p) for p in placed]
    assert not any(os.path.exists(p.path) for p in placed)
    for rank in range(2):
        assert_same(got[rank], shares[rank])


def test_a_share_is_read_in_another_process() -> None:
    """vLLM's ranks are processes of their own: one reads its share from the file alone."""
    shares = [share_of(rank, (1,), torch.bfloat16) for rank in range(2)]
    with published(shares) as placed:
        code = ("import sys, torch; from workers.vllm.rank_shares import RankShare, TensorAt, read_share; "
                "share = eval(sys.argv[1]); "
                "print(sum(float(t.float().sum()) for _, b in read_share(share) for t in b.values()))")
        out = subprocess.run([sys.executable, "-c", code, repr(placed[1])], capture_output=True, text=True,
                             check=True, cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    want = sum(float(t.float().sum()) for _, b in shares[1] for t in b.values())
    assert float(out.stdout) == pytest.approx(want, rel=1e-6)


def test_the_files_are_removed_on_leaving_even_after_an_error() -> None:
    shares = [share_of(rank, (0,), torch.float32) for rank in range(2)]
    with published(shares) as placed:
        paths = [p.path for p in placed]
        assert all(os.path.exists(p) for p in paths)
    assert not any(os.path.exists(p) for p in paths)
    with pytest.raises(RuntimeError, match="a rank failed"):
        with published(shares) as placed:
            paths = [p.path for p in placed]
            raise RuntimeError("a rank failed")
    assert not any(os.path.exists(p) for p in paths)


def test_without_room_in_shared_memory_the_shares_go_to_the_temporary_directory(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(rank_shares, "_SHM", str(tmp_path / "no-such-shm"))
    monkeypatch.setattr(rank_shares.tempfile, "tempdir", str(tmp_path))
    shares = [share_of(rank, (0,), torch.float32) for rank in range(2)]
    with published(shares) as placed:
        assert all(os.path.dirname(p.path) == str(tmp_path) for p in placed)
        assert_same(read_share(placed[1]), shares[1])


def test_an_empty_share_reads_back_empty() -> None:
    shares = [[(0, {layer: torch.empty(0, 2, 16, 4) for layer in LAYERS})], []]
    with published(shares) as placed:
        assert_same(read_share(placed[0]), shares[0])
        assert read_share(placed[1]) == []


def test_a_staging_removes_the_files_a_killed_writer_left_and_no_others(monkeypatch, tmp_path) -> None:
    """A worker killed mid-staging leaves its files in shared memory; the next staging
    on the node removes them: a dead writer's old file only."""
    monkeypatch.setattr(rank_shares, "_SHM", str(tmp_path))
    killed = subprocess.Popen([sys.executable, "-c", "pass"])  # a writer that is gone
    killed.wait()
    old = os.path.getmtime(tmp_path) - 2 * rank_shares.ORPHAN_AGE_S
    files = {name: tmp_path / name for name in (
        f"yard-kv-{killed.pid}-orphan",  # dead writer, old: removed
        f"yard-kv-{killed.pid}-fresh",  # dead writer, written just now: kept (the age guard)
        f"yard-kv-{os.getppid()}-alive",  # a live writer's, old: kept
        "other-file",  # not a share: kept
    )}
    for name, path in files.items():
        path.write_bytes(b"kv")
        if not name.endswith("fresh"):
            os.utime(path, (old, old))
    shares = [share_of(rank, (0,), torch.float32) for rank in range(2)]
    with published(shares) as placed:
        assert all(os.path.basename(p.path).startswith(f"yard-kv-{os.getpid()}-") for p in placed)
        assert_same(read_share(placed[0]), shares[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(n for n in files if n != f"yard-kv-{killed.pid}-orphan")
