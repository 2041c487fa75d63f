"""Timing helpers for the profiler: warm-up, repetitions, median.

A *sample* is a callable that runs the timed work once and returns its duration in seconds
(the untimed setup, such as drawing fresh inputs, happens inside it but outside the clock).
`samples` runs one after a warm-up and repeats it, `median_of` reduces to the median: the
median, not the mean, because interference only ever slows a run, and one slow outlier
should not move the figure.

Two kinds of sample: `host_sample` (the host clock; for CPU work, and for device work that
ends with a synchronisation) and `cuda_sample` (CUDA events recorded on one stream around
the work, read after the end event completes). torch is imported only where CUDA is used,
so the CPU helpers run without it.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Reps:
    """How many times to run a sample.

    First untimed runs: at least `warmup`, and more until `warmup_s` of wall time has passed
    (a short kernel needs many runs before clocks, caches and thread pools settle; a long
    one, few). Then at least `min_reps` and at most `reps` timed runs; once they have used
    `budget_s` of wall time (setup included) no further one starts, so that a slow point
    costs a few seconds, not `reps` times its length.
    """

    warmup: int = 3
    reps: int = 10
    min_reps: int = 3
    budget_s: float = 1.0
    warmup_s: float = 0.0

    def __post_init__(self) -> None:
        if (self.warmup < 0 or self.min_reps < 1 or self.reps < self.min_reps or self.budget_s < 0
                or self.warmup_s < 0):
            raise ValueError(f"bad repetition counts: {self}")


def samples(sample: Callable[[], T], reps: Reps) -> list[T]:
    """The timed values of `sample` (warm-up discarded), within the repetition budget."""
    warm_until = time.perf_counter() + reps.warmup_s
    done = 0
    while done < reps.warmup or time.perf_counter() < warm_until:
        sample()
        done += 1
    out: list[T] = []
    spent = 0.0
    while len(out) < reps.reps:
        t0 = time.perf_counter()
        out.append(sample())
        spent += time.perf_counter() - t0
        if len(out) >= reps.min_reps and spent >= reps.budget_s:
            break
    return out


def median_of(sample: Callable[[], float], reps: Reps) -> float:
    """Median of the timed repetitions of `sample`."""
    return float(statistics.median(samples(sample, reps)))


def medians(values: Sequence[Sequence[float]]) -> list[float]:
    """Column-wise medians of samples that return several numbers at once."""
    return [float(statistics.median(col)) for col in zip(*values)]


def host_sample(work: Callable[[], Any], setup: Callable[[], Any] | None = None) -> Callable[[], float]:
    """Times `work` on the host clock; `setup` runs first, untimed."""

    def sample() -> float:
        if setup is not None:
            setup()
        t0 = time.perf_counter()
        work()
        return time.perf_counter() - t0

    return sample


def hold_stream(stream: Any, seconds: float) -> None:
    """Keeps `stream` busy on the device for about `seconds` (a device-side sleep; its
    length in cycles is approximate, which does not matter: it only has to outlast the
    host's enqueueing of what follows)."""
    import torch

    sleep = getattr(torch.cuda, "_sleep", None)
    if sleep is not None and seconds > 0:
        with torch.cuda.stream(stream):
            sleep(int(seconds * 2e9))                  # cycles at ~2 GHz


def cuda_sample(work: Callable[[], Any], stream: Any, setup: Callable[[], Any] | None = None,
                hold_s: float = 0.0) -> Callable[[], float]:
    """Times `work` with CUDA events recorded on `stream`, which is also made current.

    Setup (fresh inputs, an untimed forward) is enqueued before the start event, so it is
    excluded: the start event completes only once the setup's kernels have run. With
    `hold_s`, the stream is held by a device-side sleep before the start event, so that all
    of `work`'s kernels are queued before the first runs: the figure is then the device's
    execution time, without the gaps of the host's kernel launches (which otherwise
    dominate, and scatter, the time of small blocks). Each sample waits for its end event,
    so repetitions never overlap.
    """
    import torch

    def sample() -> float:
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(stream):
            if setup is not None:
                setup()
            hold_stream(stream, hold_s)
            start.record(stream)
            work()
            end.record(stream)
        end.synchronize()
        return start.elapsed_time(end) / 1e3          # ms -> s

    return sample
