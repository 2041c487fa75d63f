"""The spawned ranks' rendezvous (aptmoe.exec.store): rank 0 publishes the port it listens
on; nothing is picked in one process and bound in another."""

from __future__ import annotations

import multiprocessing as mp
import time

import pytest

pytest.importorskip("torch")

from aptmoe.exec.store import local_store  # noqa: E402


def _rank(rank: int, world: int, port_file: str, q) -> None:
    from pathlib import Path
    store = local_store(rank, world, Path(port_file), 30)
    store.set(f"from-{rank}", str(rank))
    # every rank reads every other's key: they all reached the one store
    q.put((rank, sorted(int(store.get(f"from-{r}")) for r in range(world))))
    if rank:
        store.set(f"bye-{rank}", "1")
    else:                                           # the store lives in rank 0: it leaves last
        store.wait([f"bye-{r}" for r in range(1, world)])


def test_three_ranks_meet_through_the_port_rank_0_publishes(tmp_path) -> None:
    port_file = tmp_path / "store.port"
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    # rank 0 starts last: the others must wait for its file, not fail on a missing port
    procs = [ctx.Process(target=_rank, args=(r, 3, str(port_file), q)) for r in (1, 2)]
    for p in procs:
        p.start()
    time.sleep(0.5)
    procs.append(ctx.Process(target=_rank, args=(0, 3, str(port_file), q)))
    procs[-1].start()
    got = dict(q.get(timeout=60) for _ in range(3))
    for p in procs:
        p.join(timeout=30)
    assert got == {0: [0, 1, 2], 1: [0, 1, 2], 2: [0, 1, 2]}
    assert all(p.exitcode == 0 for p in procs)
    assert 0 < int(port_file.read_text()) < 65536


def test_a_rank_whose_rank_0_never_publishes_says_so(tmp_path) -> None:
    t = time.monotonic()
    with pytest.raises(TimeoutError, match="rank 0 did not publish"):
        local_store(1, 2, tmp_path / "store.port", 0.3)
    assert time.monotonic() - t < 5
