"""Links as fluid, fair-shared bandwidth (one direction each; full duplex = two of them).

A `SharedRoot` is one direction of a CPU socket's PCIe root: the GPUs under it copy at the
same time and share its aggregate bandwidth, which the calibration gives as a function of
how many GPUs copy at once. Flows belong to a GPU (their group): all flows of one GPU
together are held to that GPU's link rate (and to the configured cap), as a parameter copy
and a CPU expert's activations share one PCIe link. The root's bandwidth is shared max-min
fairly between GPUs ("water-filling": a GPU that cannot use its equal share gives the rest
to the others), and a GPU's share equally between its flows.

A GPU's flows are capped further by what shares its link and the host's memory with them
(`CopyConditions`): its copies the other way at once, and the Adam of its host's ranks.

Rates change only when a flow joins or leaves, or when those conditions change (sim/fluid.py
runs the bookkeeping). Copy setup latency is spent before a flow joins, using no bandwidth.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Callable

import simpy

from aptmoe.profile import CopyLimits
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
        self.limit: Callable[[object], float] | None = None     # a group's cap (B/s) beyond its flows'

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
        limit = self.limit or (lambda group: math.inf)
        caps = [min(f.cap_Bps, limit(f.group)) for f in self.flows]
        for f, r in zip(self.flows, max_min_rates(caps, total, groups)):
            f.rate = r

    def groups(self) -> frozenset:
        """The GPUs with a flow in flight now."""
        return frozenset(f.group for f in self.flows)


class CopyConditions:
    """What one socket's GPUs' copies get beside their other direction and their ranks' Adam.

    A GPU copying both ways at once gets its link's duplex rate each way (on one H200, 45 and 52
    GB/s where one direction alone took 55), and while ranks of the socket run Adam chunks, the
    rate measured beside that many ranks updating (`CopyLimits`). The caps apply under the
    root's fair share. In a 2-GPU run the loads fell from 52 GB/s to 40 beside the ranks' Adam,
    and to 23-25 beside it and their GPU's own offload (docs/validation-h200-2gpu-v12-fresh),
    where the model had kept the link's rate.

    A root re-plans when the other root's set of copying GPUs changes, and both do when a rank
    starts or stops updating; each tells the other only of a change, so they settle."""

    def __init__(self, limits: CopyLimits, h2d: SharedRoot, d2h: SharedRoot) -> None:
        self.limits = limits
        self.updating: dict[object, int] = {}       # rank -> its Adam chunks in flight
        self._seen: dict[str, frozenset] = {"h2d": frozenset(), "d2h": frozenset()}
        self.roots = {"h2d": h2d, "d2h": d2h}
        for direction, root in self.roots.items():
            other = "d2h" if direction == "h2d" else "h2d"
            root.limit = lambda group, d=direction, o=self.roots[other]: \
                self.limits.GBps(d, group in o.groups(), len(self.updating)) * 1e9
            root.listeners.append(lambda d=direction, o=other: self._moved(d, o))

    def _moved(self, direction: str, other: str) -> None:
        now = self.roots[direction].groups()
        if now != self._seen[direction]:
            self._seen[direction] = now
            self.roots[other]._replan()

    @contextlib.contextmanager
    def adam(self, rank) -> Iterator[None]:
        """While a chunk of `rank`'s Adam runs."""
        self.updating[rank] = self.updating.get(rank, 0) + 1
        if self.updating[rank] == 1:
            self._replan_all()
        try:
            yield
        finally:
            self.updating[rank] -= 1
            if not self.updating[rank]:
                del self.updating[rank]
                self._replan_all()

    def _replan_all(self) -> None:
        if self.limits.beside_adam:              # nothing to change where Adam was not measured
            for root in self.roots.values():
                root._replan()
