"""Links as fluid, fair-shared bandwidth (one direction each; full duplex = two of them).

A `SharedRoot` is one direction of a CPU socket's PCIe root: the GPUs under it copy at the
same time and share its aggregate bandwidth, which the calibration gives as a function of
how many GPUs copy at once. Flows belong to a GPU (their group): all flows of one GPU
together are held to that GPU's link rate (and to the configured cap), as a parameter copy
and a CPU expert's activations share one PCIe link. The root's bandwidth is shared max-min
fairly between GPUs ("water-filling": a GPU that cannot use its equal share gives the rest
to the others), and a GPU's share equally between its flows.

Rates change only when a flow joins or leaves. A single manager process sleeps until the
earliest flow would finish; a join or a leave interrupts it to re-plan, as in SimPy's
machine-shop example. Copy setup latency is spent before a flow joins, using no bandwidth.
"""

from __future__ import annotations

import math
from typing import Callable

import simpy

_EPS_BYTES = 1e-3   # a flow this close to done is done (float residue of rate * time)


class Flow:
    __slots__ = ("remaining", "cap_Bps", "group", "rate_Bps", "done")

    def __init__(self, nbytes: float, cap_Bps: float, group, done: simpy.Event) -> None:
        self.remaining = float(nbytes)
        self.cap_Bps = cap_Bps
        self.group = group
        self.rate_Bps = 0.0
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


class SharedRoot:
    """One direction of a shared link; `aggregate_GBps(n)` is its capacity with n flows."""

    def __init__(self, env: simpy.Environment, aggregate_GBps: Callable[[int], float], name: str = "") -> None:
        self.env = env
        self.aggregate_GBps = aggregate_GBps
        self.name = name
        self.flows: list[Flow] = []
        self.bytes_moved = 0.0
        self.busy_s = 0.0                # time with at least one flow
        self._last = env.now
        self._interrupted = False
        self.listeners: list[Callable[[], None]] = []     # told when the flows' rates change
        self._manager = env.process(self._run())

    def transfer(self, nbytes: float, cap_GBps: float, latency_s: float = 0.0, group=None):
        """A process step: ``yield from root.transfer(n, cap, group=gpu)`` returns when the
        bytes arrived. Flows of one group (GPU) share `cap_GBps`; no group = a group alone."""
        if latency_s > 0:
            yield self.env.timeout(latency_s)
        if nbytes <= 0:
            return
        done = self.env.event()
        self._advance()
        self.flows.append(Flow(nbytes, cap_GBps * 1e9, group if group is not None else object(), done))
        self.bytes_moved += nbytes
        self._replan()
        yield done

    # -------------------------------------------------------------- fluid bookkeeping
    def _advance(self) -> None:
        dt = self.env.now - self._last
        if dt > 0 and self.flows:
            self.busy_s += dt
            for f in self.flows:
                f.remaining -= f.rate_Bps * dt
        self._last = self.env.now

    def _set_rates(self) -> None:
        if not self.flows:
            return
        groups = [f.group for f in self.flows]
        # the calibration's root table is by GPUs copying at once, not by flows
        total = self.aggregate_GBps(len(set(groups))) * 1e9
        for f, r in zip(self.flows, max_min_rates([f.cap_Bps for f in self.flows], total, groups)):
            f.rate_Bps = r

    def _replan(self) -> None:
        if not self._interrupted:
            self._interrupted = True
            self._manager.interrupt()

    def _run(self):
        while True:
            self._advance()
            # Done: nothing left, or so little that the clock could not resolve the rest
            # (a flow on a very fast link would otherwise wait 1e-17 s forever at one time).
            tick = 4 * math.ulp(max(self.env.now, 1.0))
            finished = [f for f in self.flows if f.remaining <= max(_EPS_BYTES, f.rate_Bps * tick)]
            if finished:
                self.flows = [f for f in self.flows if f not in finished]
                for f in finished:
                    f.done.succeed()
            self._set_rates()
            for tell in self.listeners:
                tell()
            if self.flows:
                wait = min(f.remaining / f.rate_Bps for f in self.flows)
                event = self.env.timeout(max(wait, 0.0))
            else:
                event = self.env.event()    # sleep until a flow joins
            try:
                yield event
            except simpy.Interrupt:
                pass
            self._interrupted = False
