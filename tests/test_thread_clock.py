"""exec/thread_clock.py: what a thread ran and waited for a core over a span of its work."""

from __future__ import annotations

import gc
import hashlib
import os
import threading
import time

import pytest
from aptmoe.exec.thread_clock import SCHEDSTAT, span_args, span_start

linux_schedstat = pytest.mark.skipif(not os.path.exists(SCHEDSTAT), reason="no per-thread schedstat here")


def _spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def test_a_sleeping_thread_ran_little_and_a_busy_one_most_of_its_span() -> None:
    mark = span_start()
    time.sleep(0.05)
    slept = span_args(mark)
    assert 0 <= slept["run_us"] < 10_000
    mark, t0 = span_start(), time.perf_counter()
    _spin(0.05)
    busy, wall_us = span_args(mark), (time.perf_counter() - t0) * 1e6
    assert 0 < busy["run_us"] <= wall_us + 50
    # the issuing thread's block calls read the CPU time only: no wait for a core in their args
    assert set(span_args(span_start(queued=False))) == {"run_us"}


def test_the_bench_times_both_kinds_of_span() -> None:
    from aptmoe.exec.thread_clock import bench

    us = bench(pairs=2000, repeats=3)
    assert set(us) == {"both clocks", "CPU time only"} and all(0 < v < 1000 for v in us.values())


@linux_schedstat
def test_two_threads_on_one_core_wait_for_it_in_turn() -> None:
    """Both compute outside the GIL (sha256 of a large buffer releases it), bound to the same
    core: each is runnable while the other runs, and says so in `queued_us`."""
    if not hasattr(os, "sched_setaffinity"):
        pytest.skip("no thread affinity here")
    core = min(os.sched_getaffinity(0))
    data = os.urandom(1 << 24)
    out: list[dict] = []

    def work() -> None:
        os.sched_setaffinity(0, [core])
        mark = span_start()
        for _ in range(8):
            hashlib.sha256(data).digest()
        out.append(span_args(mark))

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(out) == 2 and all("queued_us" in a for a in out)
    assert max(a["queued_us"] for a in out) > 0.2 * min(a["run_us"] for a in out), out


@linux_schedstat
def test_a_thread_that_ends_leaves_no_open_file() -> None:
    def fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    before = fds()
    for _ in range(20):
        t = threading.Thread(target=lambda: span_args(span_start()))
        t.start()
        t.join()
    gc.collect()
    assert fds() <= before + 1


@linux_schedstat
def test_a_forked_child_reads_its_own_threads_file() -> None:
    """The file a thread keeps names that thread (/proc/<pid>/task/<tid>): a child forked
    from it must not read its parent's figures."""
    import multiprocessing

    from aptmoe.exec import thread_clock

    span_start()                                   # this thread's file is open now
    parent = os.readlink(f"/proc/self/fd/{thread_clock._local.stat.fd}")
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()

    def child() -> None:
        forgot = getattr(thread_clock._local, "stat", "kept") is None
        span_start()
        q.put((forgot, os.readlink(f"/proc/self/fd/{thread_clock._local.stat.fd}")))

    p = ctx.Process(target=child)
    p.start()
    forgot, mine = q.get(timeout=30)
    p.join(timeout=30)
    assert forgot and mine != parent and f"/{p.pid}/" in mine
