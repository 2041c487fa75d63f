"""A thread that runs beside a timed measurement: the calibration's neighbours.

The host-memory part times CPU work beside copies (`host_memory.CopyLoop`), the wake probe
and the issue tolls time an issuing loop beside a waker, a memory stream, a copy engine or
the CPU worker. Each is this: a daemon thread doing one thing until told to stop, bound to
given cores, started on entering a `with` block and given `settle_s` to get going before the
block's timing starts, stopped and joined on leaving it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

from aptmoe.exec.cores import bind_this_thread


class Background:
    settle_s = 0.05           # the neighbour is running before the measurement starts

    def __init__(self, cpus: Sequence[int] | None = None) -> None:
        self.cpus = list(cpus) if cpus else None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._main, daemon=True)

    def _main(self) -> None:
        self.enter()
        self.run()

    def enter(self) -> None:
        """The thread's set-up before it runs: bound to its cores, where it has any."""
        if self.cpus:
            bind_this_thread(self.cpus)

    def run(self) -> None:
        """Work until `self.stop` is set."""
        raise NotImplementedError

    def started(self) -> None:
        """Called once the thread has settled, before the measurement (counters reset here)."""

    def __enter__(self):
        self.thread.start()
        if self.settle_s:
            time.sleep(self.settle_s)
        self.started()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(timeout=30)
