"""Point-to-point sends through the process group, as the executor sends activations.

The executor moves a stage's activations and gradients between ranks with `isend`/`irecv`
on a process group of its own per direction (exec/comm.py): NCCL between GPUs, gloo between
CPU ranks. A device-to-device `copy_` (what the profiler timed before) has the same link but
none of the protocol: launching the communicator's kernels, its rendezvous, its chunking.
This times the real thing: two processes, one channel group each way, a ping-pong of each
size, half the round trip's median (the two directions of one pair are alike).

    python -m aptmoe.calibration.p2p [--backend gloo|nccl] [--sizes 4096,1048576]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time
from datetime import timedelta
from typing import Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from aptmoe.flags import number_list

WARMUP = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, backend: str, port: int, sizes: Sequence[int], reps: int, cpus: Sequence[Sequence[int]],
          gpus: Sequence[int], results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if cpus and cpus[rank]:
        os.sched_setaffinity(0, cpus[rank])                 # as the executor binds its CPU ranks
        torch.set_num_threads(len(cpus[rank]))
    device = torch.device("cuda", gpus[rank]) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, rank=rank, world_size=2, timeout=timedelta(seconds=120))
    try:
        peer = 1 - rank
        # one group per direction, as exec/comm.py makes them (new_group is collective: same order)
        there = {src: dist.new_group([0, 1]) for src in (0, 1)}
        buf = torch.randint(1, 255, (max(sizes),), dtype=torch.uint8, device=device)
        points = []
        for size in sizes:
            t = buf[:size]
            times = []
            for i in range(WARMUP + reps):
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                start = time.perf_counter()
                if rank == 0:
                    dist.isend(t, peer, group=there[0]).wait()
                    dist.irecv(t, peer, group=there[1]).wait()
                else:
                    dist.irecv(t, peer, group=there[0]).wait()
                    dist.isend(t, peer, group=there[1]).wait()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                if i >= WARMUP:
                    times.append(time.perf_counter() - start)
            points.append((size, statistics.median(times) / 2))
        if rank == 0:
            results.put(points)
    finally:
        dist.destroy_process_group()


def measure_p2p_group(backend: str, sizes: Sequence[int], reps: int = 10, cpus: Sequence[Sequence[int]] = (),
                      gpus: Sequence[int] = (0, 1)) -> list[tuple[int, float]]:
    """[(bytes, one-way seconds)] between two ranks through `backend` (nccl: on `gpus`;
    gloo: two CPU processes, bound to `cpus[0]` and `cpus[1]` where given)."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank, args=(r, backend, port, list(sizes), reps, [list(c) for c in cpus], list(gpus),
                                                           results),
                         daemon=True) for r in (0, 1)]
    for p in procs:
        p.start()
    try:
        points = results.get(timeout=300)
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.terminate()
    bad = [p.exitcode for p in procs if p.exitcode not in (0, None)]
    if bad:
        raise RuntimeError(f"a p2p rank exited with code {bad[0]}")
    return points


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m aptmoe.calibration.p2p", description=__doc__.splitlines()[0])
    p.add_argument("--backend", choices=("gloo", "nccl"), default="nccl" if torch.cuda.device_count() >= 2 else "gloo")
    p.add_argument("--sizes", type=number_list(int, "whole numbers of bytes"), default="4096,65536,1048576,16777216",
                   help="message sizes in bytes")
    p.add_argument("--reps", type=int, default=10)
    ns = p.parse_args(argv)
    for size, s in measure_p2p_group(ns.backend, ns.sizes, ns.reps):
        print(f"{size:>12,} B  {s * 1e6:10.1f} us  {size / s / 1e9:8.2f} GB/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
