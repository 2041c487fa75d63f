"""Links as fluid, fair-shared bandwidth (one direction each; full duplex = two of them).

A `SharedRoot` is one direction of a CPU socket's PCIe root: the GPUs under it copy at the
same time and share its aggregate bandwidth, which the calibration gives as a function of
how many GPUs copy at once. Flows belong to a GPU (their group): all flows of one GPU
together are held to that GPU's link rate (and to the configured cap), as a parameter copy
and a CPU expert's activations share one PCIe link. The root's bandwidth is shared max-min
fairly between GPUs ("water-filling": a GPU that cannot use its equal share gives the rest
to the others), and a GPU's share equally between its flows.

Rates change only when a flow joins or leaves (sim/fluid.py runs the bookkeeping). Copy
setup latency is spent before a flow joins, using no bandwidth.
"""

from __future__ import annotations

import math
from typing import Callable

import simpy

from aptmoe.sim.fluid import Fluid

_EPS_BYTES = 1e-3   # a flow this close to done is done (float residue of rate * time)


class Flow:
    __slots__ = ("remaining", "cap_Bps", "group", "rate", "done")

    def __init__(self, nbytes: float, cap_Bps: float, group, done: simpy.Event) -> None:
        self.remaining = float(nbytes)
        self.cap_Bps = cap_Bps
        self.group = group
        self.rate = 0.0                  # bytes per second
        self.done = done


def max_min_rates(caps: list[float], total: float, groups: list | None = None) -> list[float]:
    """Max-min fair shares of `total` among groups (GPUs) limited to their caps, each group's
    share split equally among its flows. `groups[i]` names flow i's group; a group's cap is
    the smallest of its flows' caps. Without groups every flow is a group of its own.

    Sharing is by GPU, not by flow, because the root arbitrates between its links: a GPU
    with two copies in flight does not get twice the share of a GPU with one."""
    groups = list(range(len(caps))) if groups is None else groups
    cap: dict = {}
    count: dict = {}
    for c, g in zip(caps, groups):
        cap[g] = min(c, cap.get(g, math.inf))
        count[g] = count.get(g, 0) + 1
    names = list(cap)
    share = dict(zip(names, _water_fill([cap[g] for g in names], total)))
    return [share[g] / count[g] for g in groups]


def _water_fill(caps: list[float], total: float) -> list[float]:
    """Max-min fair shares of `total` among consumers each limited to its cap."""
    rates = [0.0] * len(caps)
    left = total
    order = sorted(range(len(caps)), key=caps.__getitem__)
    for i, k in enumerate(order):
        rates[k] = min(caps[k], left / (len(caps) - i))
        left -= rates[k]
    return rates


class SharedRoot(Fluid):
    """One direction of a shared link; `aggregate_GBps(n)` is its capacity with n flows."""

    def __init__(self, env: simpy.Environment, aggregate_GBps: Callable[[int], float], name: str = "") -> None:
        super().__init__(env, _EPS_BYTES)
        self.aggregate_GBps = aggregate_GBps
        self.name = name
        self.bytes_moved = 0.0
        self.busy_s = 0.0                # time with at least one flow

    @property
    def flows(self) -> list[Flow]:
        return self.items

    def transfer(self, nbytes: float, cap_GBps: float, latency_s: float = 0.0, group=None):
        """A process step: ``yield from root.transfer(n, cap, group=gpu)`` returns when the
        bytes arrived. Flows of one group (GPU) share `cap_GBps`; no group = a group alone."""
        if latency_s > 0:
            yield self.env.timeout(latency_s)
        if nbytes <= 0:
            return
        done = self.env.event()
        self.bytes_moved += nbytes
        self._join(Flow(nbytes, cap_GBps * 1e9, group if group is not None else object(), done))
        yield done

    def _elapsed(self, dt: float) -> None:
        self.busy_s += dt

    def _set_rates(self) -> None:
        groups = [f.group for f in self.flows]
        # the calibration's root table is by GPUs copying at once, not by flows
        total = self.aggregate_GBps(len(set(groups))) * 1e9
        for f, r in zip(self.flows, max_min_rates([f.cap_Bps for f in self.flows], total, groups)):
            f.rate = r
