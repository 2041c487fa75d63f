"""How long the calling thread ran on a core, and waited for one, over a span of its work.

A block call or a CPU job that takes longer than it should either ran longer (slower compute:
memory, caches, a clock) or did not run. Not running, it waited for a core (runnable, queued
behind other threads on its cores) or slept (for the GIL, a lock, its OpenMP team's barrier,
the driver). The thread's CPU time (`time.thread_time`) gives what it ran, and Linux's
per-thread scheduler statistics what it waited runnable: the second field of
/proc/thread-self/schedstat, brought up to date each time the thread gets a core, so exact
whenever the thread reads it itself. (Its first field, the time run, is not: it lags by up to
a scheduler tick, and a 58 us CPU expert showed 258 us run on the 2-core CI machine.) The file
is opened once per thread and read with `pread` (about 1 us a reading there, against 20 us
for an open and read), so every block call can carry it.

    mark = span_start()
    ...                                   # the work
    args = span_args(mark)                # {"run_us": ..., "queued_us": ...}, queued where Linux says
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

    def read(self) -> tuple[float, float | None]:
        """(seconds run, seconds waited runnable) so far; the wait None where Linux does not say."""
        queued = None
        if self.fd is not None:
            try:
                queued = int(os.pread(self.fd, 128, 0).split()[1]) / 1e9
            except (OSError, ValueError, IndexError):
                pass
        return time.thread_time(), queued

    def __del__(self) -> None:             # the thread has ended: its thread-local goes with it
        if self.fd is not None:
            try:
                os.close(self.fd)
            except OSError:
                pass


_local = threading.local()


def _stat() -> _Stat:
    s = getattr(_local, "stat", None)
    if s is None:
        s = _local.stat = _Stat()
    return s


def span_start() -> tuple[float, float | None]:
    """The calling thread's clocks now, for `span_args` at the end of its span."""
    return _stat().read()


def span_args(start: tuple[float, float | None]) -> dict[str, float]:
    """The calling thread's time on a core since `start` (`run_us`) and, where Linux says, its
    time runnable but waiting for a core (`queued_us`): what a trace event's args carry."""
    ran, queued = _stat().read()
    out = {"run_us": round((ran - start[0]) * 1e6, 1)}
    if queued is not None and start[1] is not None:
        out["queued_us"] = round((queued - start[1]) * 1e6, 1)
    return out
