"""Work that progresses at rates shared out among what is in flight, as a fluid.

`SharedRoot` (a link's bytes) and `HostMemory` (CPU jobs' seconds) are both this: items
with `remaining` work, a `rate` of it per second set by the subclass's `_set_rates`, and a
`done` event. Rates change only when an item joins or leaves, or when a subclass is told
that something it depends on changed (`_replan`). A single manager process sleeps until the
earliest item would finish; a join or a re-plan interrupts it, as in SimPy's machine-shop
example.
"""

from __future__ import annotations

import math
from typing import Callable

import simpy


class Fluid:
    def __init__(self, env: simpy.Environment, eps: float) -> None:
        self.env = env
        self.items: list = []
        self.listeners: list[Callable[[], None]] = []     # told whenever the rates are set
        self._eps = eps                   # an item this close to done is done
        self._last = env.now
        self._interrupted = False
        self._manager = env.process(self._run())

    def _join(self, item) -> None:
        self._advance()
        self.items.append(item)
        self._replan()

    def _advance(self) -> None:
        dt = self.env.now - self._last
        if dt > 0 and self.items:
            self._elapsed(dt)
            for i in self.items:
                i.remaining -= i.rate * dt
        self._last = self.env.now

    def _elapsed(self, dt: float) -> None:
        """`dt` seconds passed with items in flight (for busy-time accounting)."""

    def _set_rates(self) -> None:
        raise NotImplementedError

    def _replan(self) -> None:
        if not self._interrupted:
            self._interrupted = True
            self._manager.interrupt()

    def _run(self):
        while True:
            self._advance()
            # Done: nothing left, or so little that the clock could not resolve the rest
            # (an item on a very fast rate would otherwise wait 1e-17 s forever at one time).
            tick = 4 * math.ulp(max(self.env.now, 1.0))
            finished = [i for i in self.items if i.remaining <= max(self._eps, i.rate * tick)]
            if finished:
                self.items = [i for i in self.items if i not in finished]
                for i in finished:
                    i.done.succeed()
            if self.items:
                self._set_rates()
            for tell in self.listeners:
                tell()
            if self.items:
                event = self.env.timeout(max(min(i.remaining / i.rate for i in self.items), 0.0))
            else:
                event = self.env.event()    # sleep until an item joins
            try:
                yield event
            except simpy.Interrupt:
                pass
            self._interrupted = False
