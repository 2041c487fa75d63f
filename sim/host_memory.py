"""Host memory shared by a socket's CPU work and its GPUs' copies, as a fluid.

The copy engines read (h2d) and write (d2h) host memory at their links' rates, and the CPU
experts and Adam stream the same memory. The calibration (`host_memory` in the profile,
calibration/host_memory.py) measured what the two get together: on the H200 host a
read-bound CPU stream fell from 76 to 60 GB/s beside copies at 48-53 GB/s, for 110 GB/s in
all, while the copies kept their link's rate. So here the copies take what the links give
them (sim/links.py decides that) and each CPU job progresses at

    min(1, (GBps - copies' rate now) / its demand),
    its demand = min(its bytes / its time alone, the CPU stream's rate alone),

so a job that streams its weights (an expert on a few tokens) slows while copies run and a
compute-bound one (many tokens) does not. A job's bytes are what it reads and writes
(`aptmoe.costs.cpu_expert_bytes`, `adam_bytes`); no job draws more than the calibration's
CPU stream did alone, so that a job alone always takes its calibrated time (Adam's 28 bytes
a parameter in 0.23 ns would be 122 GB/s, more than the memory gives, where it was timed at
that speed). The calibration's check, an Adam chunk beside d2h copies at 53 GB/s, ran 1.31x
its time alone; this model gives (110 - 53) / 76 -> 1.33x. Jobs of different ranks do not slow each other here:
Adam's figure for ranks updating at once is measured as such (`adam.cpu_shared`).

Rates change when a job starts or ends and when a root's flows change; a manager process
sleeps until the earliest job would end, interrupted to re-plan, as `SharedRoot` does.
"""

from __future__ import annotations

import math

import simpy

from aptmoe.sim.links import SharedRoot

_EPS_S = 1e-12      # a job this close to done is done


class _Job:
    __slots__ = ("remaining_s", "demand_Bps", "rate", "done")

    def __init__(self, seconds: float, demand_Bps: float, done: simpy.Event) -> None:
        self.remaining_s = seconds               # of its time alone
        self.demand_Bps = demand_Bps
        self.rate = 1.0                          # alone-seconds done per second
        self.done = done


class HostMemory:
    def __init__(self, env: simpy.Environment, GBps: float, cpu_alone_GBps: float, roots: list[SharedRoot]) -> None:
        self.env = env
        self.Bps = GBps * 1e9
        self.cpu_Bps = cpu_alone_GBps * 1e9
        self.roots = roots
        self.jobs: list[_Job] = []
        self._last = env.now
        self._interrupted = False
        self._manager = env.process(self._run())
        for r in roots:
            r.listeners.append(self._replan)

    def work(self, seconds: float, nbytes: float):
        """A process step: ``yield from mem.work(s, n)`` returns when a CPU job of `seconds`
        alone, streaming `nbytes`, is done."""
        if seconds <= 0:
            return
        done = self.env.event()
        self._advance()
        self.jobs.append(_Job(seconds, min(nbytes / seconds, self.cpu_Bps), done))
        self._replan()
        yield done

    def copies_Bps(self) -> float:
        return sum(f.rate_Bps for r in self.roots for f in r.flows)

    def _advance(self) -> None:
        dt = self.env.now - self._last
        if dt > 0:
            for j in self.jobs:
                j.remaining_s -= j.rate * dt
        self._last = self.env.now

    def _set_rates(self) -> None:
        left = max(0.0, self.Bps - self.copies_Bps())
        for j in self.jobs:
            # a floor keeps a job moving when copies would take all of it (they never did)
            j.rate = 1.0 if j.demand_Bps <= left else max(left / j.demand_Bps, 1e-3)

    def _replan(self) -> None:
        if not self._interrupted:
            self._interrupted = True
            self._manager.interrupt()

    def _run(self):
        while True:
            self._advance()
            tick = 4 * math.ulp(max(self.env.now, 1.0))
            finished = [j for j in self.jobs if j.remaining_s <= max(_EPS_S, j.rate * tick)]
            if finished:
                self.jobs = [j for j in self.jobs if j not in finished]
                for j in finished:
                    j.done.succeed()
            self._set_rates()
            event = (self.env.timeout(max(min(j.remaining_s / j.rate for j in self.jobs), 0.0))
                     if self.jobs else self.env.event())
            try:
                yield event
            except simpy.Interrupt:
                pass
            self._interrupted = False
