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
that speed). The calibration's check, an Adam chunk beside d2h copies at 52.9 GB/s, ran
1.31x its time alone; this model gives 75.6 / (110.3 - 52.9) = 1.32x. Jobs of different
ranks do not slow each other here: Adam's figure for ranks updating at once is measured as
such (`adam.cpu_shared`).

Rates change when a job starts or ends and when a root's flows change (sim/fluid.py).
"""

from __future__ import annotations

import simpy

from aptmoe.sim.fluid import Fluid
from aptmoe.sim.links import SharedRoot


class _Job:
    __slots__ = ("remaining", "demand_Bps", "rate", "done")

    def __init__(self, seconds: float, demand_Bps: float, done: simpy.Event) -> None:
        self.remaining = seconds                 # of its time alone
        self.demand_Bps = demand_Bps
        self.rate = 1.0                          # alone-seconds done per second
        self.done = done


class HostMemory(Fluid):
    def __init__(self, env: simpy.Environment, GBps: float, cpu_alone_GBps: float, roots: list[SharedRoot]) -> None:
        super().__init__(env, 1e-12)
        self.Bps = GBps * 1e9
        self.cpu_Bps = cpu_alone_GBps * 1e9
        self.roots = roots
        for r in roots:
            r.listeners.append(self._replan)

    def work(self, seconds: float, nbytes: float):
        """A process step: ``yield from mem.work(s, n)`` returns when a CPU job of `seconds`
        alone, streaming `nbytes`, is done."""
        if seconds <= 0:
            return
        done = self.env.event()
        self._join(_Job(seconds, min(nbytes / seconds, self.cpu_Bps), done))
        yield done

    def copies_Bps(self) -> float:
        return sum(f.rate for r in self.roots for f in r.flows)

    def _set_rates(self) -> None:
        left = max(0.0, self.Bps - self.copies_Bps())
        for j in self.items:
            # a floor keeps a job moving when copies would take all of it (they never did)
            j.rate = 1.0 if j.demand_Bps <= left else max(left / j.demand_Bps, 1e-3)
