"""Host memory shared by a socket's CPU work and its GPUs' copies, as a fluid.

The copy engines read (h2d) and write (d2h) host memory at their links' rates, and the CPU
experts and Adam stream the same memory. The calibration (`host_memory` in the profile,
calibration/host_memory.py) times a read-bound CPU stream alone and beside copies in each
direction and in both at once, with the copies' own rate: on the H200 host the stream fell
from 70-100 to 53-79 GB/s beside one direction's copies at 46-54 GB/s, while the copies kept
their link's rate. So here the copies take what the links give them (sim/links.py decides
that) and each CPU job progresses at

    min(1, share(copies' rate now) / its demand),
    its demand = min(its bytes / its time alone, the CPU stream's rate alone),

where share is the profile's `MemoryShare`: piecewise-linear through the measured points in
the copies' total rate. So a job that streams its weights (an expert on a few tokens) slows
while copies run and a compute-bound one (many tokens) does not. A job's bytes are what it
reads and writes (`aptmoe.costs.cpu_expert_bytes`, `adam_bytes`); no job draws more than the
calibration's CPU stream did alone, so that a job alone always takes its calibrated time.

Profiles made before the stream was timed beside both directions at once have one figure, the
stream plus one direction's copies: the share is then that total less the copies' rate. With
both directions at full rate (about 100 GB/s on one H200) that left CPU work a few GB/s (the
stream measured 44-55), and a total 4-6% lower doubled a predicted Mobius step
(docs/validation-h200-v5): the measured points replace that extrapolation. Jobs of different
ranks do not slow each other here, but for Adam: a chunk runs at its time alone, and
`shared_slowdown` times longer while another rank's Adam chunk runs on the socket too (the
profile's `adam.cpu_shared`, measured with every rank updating at once, over its figure
alone), and beside copies slower again by the copies' bound. The two compound: on two H200s
(docs/validation-h200-2gpu-v13-fresh) the chunks ran 0.408-0.419 ns/param beside the other
rank's Adam and 0.535-0.562 beside it and their own rank's offload, 1.28-1.36x more, as their
offload alone made them (0.382 against 0.290). Taking only the tighter of the two bounds, as
until session 31, put both at 0.423.

Rates change when a job starts or ends and when a root's flows change (sim/fluid.py).
"""

from __future__ import annotations

import simpy

from aptmoe.profile import MemoryShare
from aptmoe.sim.fluid import Fluid
from aptmoe.sim.links import SharedRoot


class _Job:
    __slots__ = ("remaining", "demand_Bps", "rate", "done", "shared_slowdown")

    def __init__(self, seconds: float, demand_Bps: float, done: simpy.Event, shared_slowdown: float = 1.0) -> None:
        self.remaining = seconds                 # of its time alone
        self.demand_Bps = demand_Bps
        self.rate = 1.0                          # alone-seconds done per second
        self.done = done
        self.shared_slowdown = shared_slowdown   # > 1: an Adam chunk, this much longer beside another


class HostMemory(Fluid):
    def __init__(self, env: simpy.Environment, share: MemoryShare, roots: list[SharedRoot]) -> None:
        super().__init__(env, 1e-12)
        self.share = share
        self.cpu_Bps = share.cpu_alone_GBps * 1e9
        self.roots = roots
        for r in roots:
            r.listeners.append(self._replan)

    def work(self, seconds: float, nbytes: float, shared_slowdown: float = 1.0):
        """A process step: ``yield from mem.work(s, n)`` returns when a CPU job of `seconds`
        alone, streaming `nbytes`, is done. `shared_slowdown` > 1: an Adam chunk, which takes
        that many times longer while another such job (another rank's) runs beside it."""
        if seconds <= 0:
            return
        done = self.env.event()
        self._join(_Job(seconds, min(nbytes / seconds, self.cpu_Bps), done, shared_slowdown))
        yield done

    def copies_Bps(self) -> float:
        return sum(f.rate for r in self.roots for f in r.flows)

    def _set_rates(self) -> None:
        left = self.share.cpu_GBps(self.copies_Bps() / 1e9) * 1e9
        updating = sum(j.shared_slowdown > 1.0 for j in self.items)
        for j in self.items:
            # a floor keeps a job moving when copies would take all of it (they never did)
            j.rate = 1.0 if j.demand_Bps <= left else max(left / j.demand_Bps, 1e-3)
            if updating > 1 and j.shared_slowdown > 1.0:       # both slow it
                j.rate /= j.shared_slowdown
