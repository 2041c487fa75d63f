"""Point-to-point sends through the process group, as the executor sends activations.

The executor moves a stage's activations and gradients between ranks with `isend`/`irecv`
on a process group of its own per direction (exec/comm.py): NCCL between GPUs, gloo between
CPU ranks. A device-to-device `copy_` (what the profiler timed before) has the same link but
none of the protocol: launching the communicator's kernels, its rendezvous, its chunking.
This times the real thing: two processes, one channel group each way, a ping-pong of each
size, half the round trip's median (the two directions of one pair are alike).

Then what a posted receive costs the rank that waits (`recv_wait` in the profile). The
executor posts each receive when its net program reaches it, ahead of the send that feeds it,
and NCCL launches the receive's kernel then: it holds its SMs, spinning, until the data comes.
On the 2-GPU H200 grid (docs/validation-h200-2gpu) blocks beside a waiting receive ran
1.3-1.7x their time, attention more than experts (how many waves of thread blocks a kernel
needs depends on the SMs left to it, so the loss depends on the kernel). Rank 0 times the
executor's own blocks (`aptmoe.exec.model`: attention, an expert, the gate), forward, at each
width asked, on a micro-batch of tokens, alone, then again with a receive from rank 1 posted
on a side stream (rank 1 sends only when rank 0 has finished): per block, the ratio of the
medians. Between CPU ranks gloo's receive waits in a thread of its own.

    python -m aptmoe.calibration.p2p [--backend gloo|nccl] [--sizes 4096,1048576]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from aptmoe.exec.store import local_store
from aptmoe.calibration.timing import Reps, cuda_sample, host_sample, median_of
from aptmoe.flags import number_list

WARMUP = 3
# the blocks timed beside a waiting receive: a micro-batch of the matrix's runs (8 sequences
# of 128 tokens; the expert gets them all, as a popular one does), the gate over 8 experts
RECV_SEQUENCES, RECV_GATE_EXPERTS, RECV_REPS = 8, 8, 20


@dataclasses.dataclass(frozen=True)
class Width:
    """A model width to time the blocks at: embedding d, expert hidden h, attention heads and
    the sequence length its attention runs over."""
    d: int
    h: int
    heads: int
    seq_length: int


@dataclasses.dataclass(frozen=True)
class P2P:
    points: list[tuple[int, float]]      # (bytes, one-way seconds)
    recv_slowdown: dict[tuple[str, int], float]   # (block kind, d) -> beside a waiting receive / alone


def _timed(device: torch.device, fn, reps: int) -> float:
    """Median seconds of `fn` over `reps` calls after 3 warm-up (calibration/timing.py): CUDA
    events on the current stream, whose sample waits for its end event and never for the
    device (a receive may be waiting on another stream); the host clock on a CPU."""
    sample = cuda_sample(fn, torch.cuda.current_stream(device)) if device.type == "cuda" else host_sample(fn)
    return median_of(sample, Reps(warmup=3, reps=reps, min_reps=reps, budget_s=float("inf")))


def _blocks(widths: Sequence[Width], device: torch.device) -> dict[tuple[str, int], object]:
    """(kind, d) -> a no-argument forward of the executor's block of that kind and width on
    fresh random inputs (no autograd: the kernels are what a receive competes with)."""
    from aptmoe.exec import model

    out = {}
    for w in widths:
        tokens = RECV_SEQUENCES * w.seq_length
        attn = model.AttentionBlock(w.d, w.heads, device=device)
        expert = model.ExpertBlock(w.d, w.h, device=device)
        gate = model.GateBlock(w.d, RECV_GATE_EXPERTS, device=device)
        seqs = torch.randn(RECV_SEQUENCES, w.seq_length, w.d, device=device)
        flat = torch.randn(tokens, w.d, device=device)
        for kind, fn in (("a", lambda m=attn, x=seqs: m(x)), ("e", lambda m=expert, x=flat: m(x)),
                         ("g", lambda m=gate, x=flat: m(x))):
            out[(kind, w.d)] = torch.no_grad()(fn)
    return out


def _recv_wait(rank: int, device: torch.device, group, go, widths: Sequence[Width]) -> dict | None:
    """Rank 0: per block, its median time beside a receive from rank 1 posted and waiting,
    over its time alone. Rank 1 sends once rank 0 has timed (`go`). None on rank 1."""
    buf = torch.empty(1 << 20, device=device)                  # 4 MiB, an activation's order
    if rank == 1:
        go.wait(timeout=300)
        dist.isend(buf, 0, group=group).wait()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return None
    blocks = _blocks(widths, device)
    alone = {k: _timed(device, fn, RECV_REPS) for k, fn in blocks.items()}
    side = torch.cuda.Stream(device) if device.type == "cuda" else None
    if side is not None:
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):                 # as the executor's net stream posts it
            work = dist.irecv(buf, 1, group=group)
    else:
        work = dist.irecv(buf, 1, group=group)
    beside = {k: _timed(device, fn, RECV_REPS) for k, fn in blocks.items()}
    go.set()
    work.wait()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return {k: beside[k] / alone[k] for k in blocks}


def _rank(rank: int, backend: str, port_file: str, sizes: Sequence[int], reps: int, cpus: Sequence[Sequence[int]],
          gpus: Sequence[int], widths: Sequence[Width], results, go) -> None:
    if cpus and cpus[rank]:
        os.sched_setaffinity(0, cpus[rank])                 # as the executor binds its CPU ranks
        torch.set_num_threads(len(cpus[rank]))
    device = torch.device("cuda", gpus[rank]) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, rank=rank, world_size=2, timeout=timedelta(seconds=120),
                            store=local_store(rank, 2, Path(port_file), 120))
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
        slowdown = _recv_wait(rank, device, there[1], go, widths)
        if rank == 0:
            results.put(P2P(points, slowdown))
    finally:
        dist.destroy_process_group()


def measure_p2p_group(backend: str, sizes: Sequence[int], reps: int = 10, cpus: Sequence[Sequence[int]] = (),
                      gpus: Sequence[int] = (0, 1), widths: Sequence[Width] = ()) -> P2P:
    """Between two ranks through `backend` (nccl: on `gpus`; gloo: two CPU processes, bound to
    `cpus[0]` and `cpus[1]` where given): [(bytes, one-way seconds)], and how much slower the
    executor's blocks of each of `widths` run beside a waiting receive (none: no blocks)."""
    ctx = mp.get_context("spawn")
    results, go = ctx.Queue(), ctx.Event()
    meet = Path(tempfile.mkdtemp(prefix="aptmoe-p2p-"))        # the store's port (exec/store.py: why)
    procs = [ctx.Process(target=_rank, args=(r, backend, str(meet / "store.port"), list(sizes), reps,
                                             [list(c) for c in cpus], list(gpus), list(widths), results, go),
                         daemon=True) for r in (0, 1)]
    for p in procs:
        p.start()
    try:
        measured = results.get(timeout=300)
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.terminate()
        shutil.rmtree(meet, ignore_errors=True)
    bad = [p.exitcode for p in procs if p.exitcode not in (0, None)]
    if bad:
        raise RuntimeError(f"a p2p rank exited with code {bad[0]}")
    return measured


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m aptmoe.calibration.p2p", description=__doc__.splitlines()[0])
    p.add_argument("--backend", choices=("gloo", "nccl"), default="nccl" if torch.cuda.device_count() >= 2 else "gloo")
    p.add_argument("--sizes", type=number_list(int, "whole numbers of bytes"), default="4096,65536,1048576,16777216",
                   help="message sizes in bytes")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--widths", type=number_list(int, "model widths"), default="1024,2048",
                   help="embedding widths of the blocks timed beside a waiting receive (MoE-S, -M: 1024,2048)")
    ns = p.parse_args(argv)
    widths = [Width(d, 4 * d, 32, 128) for d in ns.widths]
    measured = measure_p2p_group(ns.backend, ns.sizes, ns.reps, widths=widths)
    for size, s in measured.points:
        print(f"{size:>12,} B  {s * 1e6:10.1f} us  {size / s / 1e9:8.2f} GB/s")
    for (kind, d), x in sorted(measured.recv_slowdown.items()):
        print(f"block {kind} d{d} beside a waiting receive: {x:.3f}x its time alone")
    return 0


if __name__ == "__main__":
    sys.exit(main())
