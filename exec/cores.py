"""Which of a rank's cores each of its threads may run on (`--host-cores`).

A GPU rank runs Python threads that keep the GPU and the links fed (the main thread issues
every kernel; the load, copy and offload threads drive the copies) beside a CPU worker whose
OpenMP threads compute CPU experts and Adam. With the worker's threads on every core the
feeding threads wait for a core (and for OpenMP's spin-waits after each parallel region),
and the GPU waits for them. `--host-cores N` keeps the rank's first N cores for the feeding
threads and gives the worker the rest, with as many torch threads.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import torch


def split_host_cores(cores: Sequence[int], host_cores: int) -> tuple[list[int], list[int]]:
    """(the host threads' cores, the CPU worker's cores) of a rank bound to `cores`."""
    cores = list(cores)
    if not 0 <= host_cores < len(cores):
        raise ValueError(f"--host-cores {host_cores} must leave the CPU worker a core of the rank's {len(cores)}")
    return cores[:host_cores], cores[host_cores:]


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
