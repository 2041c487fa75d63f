"""The rank's CPU cores as one worker with priorities: expert work before optimizer chunks.

One thread runs one job at a time (torch's intra-op threads, bound to the rank's cores, do
the parallel work inside a job). Jobs wait in a priority queue, so an expert that the GPU
is waiting for goes before the Adam update of a stage that has finished: the same
`PriorityResource` the simulator models (`sim/engine.py`, CPU_EXPERT_PRIORITY).
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future

EXPERT = 0        # lower runs first
UPDATE = 1


class CpuWorker:
    def __init__(self, name: str = "cpu", on_start: Callable[[], None] | None = None) -> None:
        self._q: queue.PriorityQueue = queue.PriorityQueue()
        self._seq = itertools.count()
        self._on_start = on_start
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, priority: int, fn: Callable, *args) -> Future:
        fut: Future = Future()
        self._q.put((priority, next(self._seq), fn, args, fut))
        return fut

    def _run(self) -> None:
        if self._on_start is not None:
            self._on_start()
        while True:
            _, _, fn, args, fut = self._q.get()
            if fn is None:
                return
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn(*args))
            except BaseException as e:          # handed to whoever waits on the future
                fut.set_exception(e)

    def close(self) -> None:
        self._q.put((-1, -1, None, (), None))
        self._thread.join(timeout=30)
