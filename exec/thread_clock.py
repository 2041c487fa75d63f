"""How long the calling thread ran on a core, and waited for one, over a span of its work.

A block call or a CPU job that takes longer than it should either ran longer (slower compute:
memory, caches, a clock) or did not run. Not running, it waited for a core (runnable, queued
behind other threads on its cores) or slept (for the GIL, a lock, its OpenMP team's barrier,
the driver). The thread's CPU time (`time.thread_time`) gives what it ran, and Linux's
per-thread scheduler statistics what it waited runnable: the second field of
/proc/thread-self/schedstat, brought up to date each time the thread gets a core, so exact
whenever the thread reads it itself. (Its first field, the time run, is not: it lags by up to
a scheduler tick, and a 58 us CPU expert showed 258 us run on the 2-core CI machine.)

The file is opened once per thread and read with `pread`. Even so a pair of readings of both
clocks costs 7.5 us on that machine, against 2.3 us for the CPU time alone
(`python -m aptmoe.exec.thread_clock`, BENCHMARKS.md), so the executor's block calls, a few
hundred microseconds of host each on the H200, carry the CPU time only; CPU jobs and Adam
chunks, milliseconds each, carry both. (In session 25's runs the issuing thread's stalled
calls had queued for 0-13% of their host time: its two host cores were not crowded.)

    mark = span_start()                   # span_start(queued=False): the CPU time only
    ...                                   # the work
    args = span_args(mark)                # {"run_us": ..., "queued_us": ...}
"""

from __future__ import annotations

import os
import threading
import time

SCHEDSTAT = "/proc/thread-self/schedstat"


class _Stat:
    """The calling thread's schedstat file, open for as long as the thread lives."""

    def __init__(self) -> None:
        try:
            self.fd: int | None = os.open(SCHEDSTAT, os.O_RDONLY)
        except OSError:
            self.fd = None

    def queued(self) -> float | None:
        """Seconds the thread has waited runnable so far, or None where Linux does not say."""
        if self.fd is not None:
            try:
                return int(os.pread(self.fd, 128, 0).split()[1]) / 1e9
            except (OSError, ValueError, IndexError):
                pass
        return None

    def __del__(self) -> None:             # the thread has ended: its thread-local goes with it
        if self.fd is not None:
            try:
                os.close(self.fd)
            except OSError:
                pass


_local = threading.local()


def _forget() -> None:
    """In a forked child: the file the forking thread kept names the parent's thread, not this
    process's, so the child opens its own at its next reading."""
    _local.stat = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget)


def _stat() -> _Stat:
    s = getattr(_local, "stat", None)
    if s is None:
        s = _local.stat = _Stat()
    return s


def span_start(queued: bool = True) -> tuple[float, float | None]:
    """The calling thread's clocks now, for `span_args` at the end of its span; with
    `queued=False` its CPU time only."""
    return time.thread_time(), _stat().queued() if queued else None


def span_args(start: tuple[float, float | None]) -> dict[str, float]:
    """The calling thread's time on a core since `start` (`run_us`) and, where `start` read
    it and Linux says, its time runnable but waiting for a core (`queued_us`): what a trace
    event's args carry."""
    out = {"run_us": round((time.thread_time() - start[0]) * 1e6, 1)}
    if start[1] is not None:
        queued = _stat().queued()
        if queued is not None:
            out["queued_us"] = round((queued - start[1]) * 1e6, 1)
    return out


def bench(pairs: int = 200_000, repeats: int = 5) -> dict[str, float]:
    """Microseconds a pair of readings costs, both clocks and the CPU time alone: the median
    of `repeats` timings of `pairs` pairs each."""
    import statistics
    import timeit

    return {name: statistics.median(timeit.repeat(lambda: span_args(span_start(q)), number=pairs,
                                                  repeat=repeats)) / pairs * 1e6
            for name, q in (("both clocks", True), ("CPU time only", False))}


if __name__ == "__main__":
    import platform

    for name, us in bench().items():
        print(f"{name}: {us:.2f} us a span (span_start + span_args), median of 5 x 200,000, "
              f"Python {platform.python_version()}")
