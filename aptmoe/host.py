"""The host as the executor, the calibration and the benchmarks see it: the cores this process
may run on (one reading, which they bind to and size their thread pools from), and how fast the
calling thread runs plain Python just now (`python_loop_s`).

The second is a reference, not a cost. On the one-GPU H200 machine the same loop took 0.35 to
0.57 s from one minute or core to the next (docs/validation-h200-v7), and every figure the
issuing thread sets (the host cost per block call, hence the step time of a small model) moved
with it. Timed beside a run and beside the calibration's dispatch probe, the ratio of the two
says how much faster or slower the host was when the run was made than when it was calibrated
(`Profile.with_host_speed`)."""

from __future__ import annotations

import os
import statistics
import time

import psutil


def physical_cores() -> int:
    """The machine's physical cores, as a calibration records them (`Hardware.cpu_cores`), from
    which a run planned with its profile takes its cores per socket."""
    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


def allowed_cores() -> list[int]:
    """The cores this process may run on, sorted (all of them where the OS has no affinity)."""
    try:
        return sorted(psutil.Process().cpu_affinity())
    except (AttributeError, psutil.Error):          # macOS has no affinity
        return list(range(os.cpu_count() or 1))


# A fixed piece of interpreter work: long enough (about 20-60 ms on the machines seen) that the
# clock's resolution is nothing beside it, short enough to time beside every run.
LOOP_ITERATIONS = 500_000


def python_loop_s(repeats: int = 3, iterations: int = LOOP_ITERATIONS) -> float:
    """Median seconds of `repeats` runs of a fixed pure-Python loop on the calling thread."""
    if repeats < 1 or iterations < 1:
        raise ValueError("python_loop_s needs at least one repeat of at least one iteration")
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        acc = 0
        for i in range(iterations):
            acc += i * i
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def run_loop_s(record: dict | None) -> float | None:
    """A run's reference loop (its result's ``host_loop_s``: per rank, before and after the
    steps) as one figure, the mean over ranks and both ends; None for a run without it."""
    return _mean_of_ends(record)


def _mean_of_ends(record: dict | None) -> float | None:
    """The mean of a per-rank reading's `before` and `after` values; None where there are none."""
    values = [*record.get("before", []), *record.get("after", [])] if record else []
    return statistics.fmean(values) if values else None


def run_stream_GBps(record: dict | None) -> tuple[int, float] | None:
    """A run's host memory stream (its result's ``host_stream_GBps``: the CPU worker's threads
    and, per rank, GB/s before and after the steps; exec/host_stream.py) as (threads, the mean
    over ranks and both ends); None for a run without it."""
    mean = _mean_of_ends(record)
    return None if mean is None else (int(record["threads"]), mean)
