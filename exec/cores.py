"""Which of a rank's cores each of its threads may run on (`--host-cores`).

A GPU rank runs Python threads that keep the GPU and the links fed (the main thread issues
every kernel; the load, copy and offload threads drive the copies) beside a CPU worker whose
OpenMP threads compute CPU experts and Adam. With the worker's threads on every core the
feeding threads wait for a core (and for OpenMP's spin-waits after each parallel region),
and the GPU waits for them. `--host-cores N` keeps the rank's first N cores for the feeding
threads and gives the worker the rest, with as many torch threads.

Affinity on Linux is per thread, and a thread takes its creator's when it starts. Binding
only the main thread leaves the threads that exist by then (CUDA's, the process group's:
NCCL's watchdog, the store's) free to run on every core of the machine, the CPU workers'
of every rank among them; one of them woken on a worker core stalls that worker's OpenMP
team at its next barrier for as long as the thread keeps the core. On the 2-GPU H200 grid,
where the two ranks took all 32 cores between them, CPU experts of 1-2 ms took 16-65 ms at
times (docs/validation-h200-2gpu-v2). So a rank binds every thread it has (`bind_threads`),
before the process group starts its own, and moves all but the worker's onto the host cores
once the worker has its cores (RankRuntime).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence

import torch


def rank_share(local_rank: int, per: int, allowed: Sequence[int]) -> list[int]:
    """A rank's `per` cores of `allowed`, the cores this host lets us use: the local_rank-th
    run of them, wrapping round where the ranks ask for more than there are. The executor
    binds each rank so (exec/launch.py `bind_cores`), and the calibration times a rank's CPU
    experts on the same cores (calibration/cpu_ranks.py)."""
    first = (local_rank * per) % len(allowed)
    return [allowed[(first + i) % len(allowed)] for i in range(per)]


def split_host_cores(cores: Sequence[int], host_cores: int) -> tuple[list[int], list[int]]:
    """(the host threads' cores, the CPU worker's cores) of a rank bound to `cores`."""
    cores = list(cores)
    if not 0 <= host_cores < len(cores):
        raise ValueError(f"--host-cores {host_cores} must leave the CPU worker a core of the rank's {len(cores)}")
    return cores[:host_cores], cores[host_cores:]


def process_threads() -> list[int]:
    """The ids of this process's threads (Linux: /proc/self/task), or [] where the OS does not list them."""
    try:
        return sorted(int(t) for t in os.listdir("/proc/self/task"))
    except (OSError, ValueError):
        return []


def bind_threads(tids: Iterable[int], cores: Sequence[int]) -> int:
    """Bind each thread of `tids` (of this process) to `cores`; how many were bound (a thread
    that has ended meanwhile, or one the OS refuses, is left out)."""
    if not cores or not hasattr(os, "sched_setaffinity"):
        return 0
    bound = 0
    for tid in tids:
        try:
            os.sched_setaffinity(tid, list(cores))
            bound += 1
        except OSError:
            pass
    return bound


def thread_affinities(tids: Iterable[int]) -> dict[int, set[int]]:
    """Each thread of `tids` that still runs, and the cores it may run on now."""
    out = {}
    for tid in tids:
        try:
            out[tid] = os.sched_getaffinity(tid)
        except (OSError, AttributeError):        # ended meanwhile, or no per-thread affinity here
            pass
    return out


def thread_placement(host: Sequence[int], workers: Sequence[int]) -> dict[str, int]:
    """How this process's threads may run now: on the host cores only, on the worker's only,
    or across both or beyond the rank's cores ("loose": the threads that can stall the
    worker's team). Empty where the OS does not say."""
    if not hasattr(os, "sched_getaffinity"):
        return {}
    host_set, worker_set = set(host), set(workers)
    out = {"host": 0, "worker": 0, "loose": 0}
    for cores in thread_affinities(process_threads()).values():
        out["host" if host_set and cores <= host_set else "worker" if cores <= worker_set else "loose"] += 1
    return out


def bind_this_thread(cores: Sequence[int]) -> bool:
    """Bind the calling thread (on Linux, affinity is per thread; threads it starts later
    inherit it). False where the OS cannot (then it runs where the process may)."""
    if not cores or not hasattr(os, "sched_setaffinity"):
        return False
    try:
        os.sched_setaffinity(0, list(cores))
    except OSError:
        return False
    return True


def start_worker_thread(cores: Sequence[int], enter: Callable[[], None] | None = None) -> None:
    """The CPU worker's first act where it owns the rank's OpenMP threads (a GPU rank, or
    --host-cores): bound to `cores`, with as many torch threads. torch's thread count is one process-wide number that
    each thread copies into its own OpenMP setting the first time it asks for it: asking
    here fixes the worker's before the main thread lowers the shared number for itself.
    `enter`: the device's per-thread set-up, run first."""
    if enter is not None:
        enter()
    bind_this_thread(cores)
    torch.set_num_threads(len(cores))
    torch.get_num_threads()
