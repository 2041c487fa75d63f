"""What runs beside a GPU rank's issuing thread, and how much slower it issues for it.

The executor's main thread issues every block; beside it the copy engine wakes for each copy
that lands (and, on a capped link, its pacer for each 4 MiB chunk), the offload thread for
each gradient block, and the CPU worker runs expert and Adam jobs. Each wake takes the GIL the
issuing thread drops around every launch, and the copies' DMA and the CPU's memory stream
slow it without waking anything. On the H200 host, blocks issued beside a load took 1.1-2.6x
their time alone, the smaller the experts (the more copies a second) the more
(docs/validation-h200-v4). The profile's `issue_tolls` (calibration/issue_tolls.py) holds
the loss per copy, chunk and job and the slowdown factors; here each running copy or job
spreads its toll over its expected duration, and the host cost of a block issued now is
divided by what is left of the thread:

    slowdown = dma^[a copy in flight] x memory^[an Adam job running] x experts / (1 - sum of tolls per second)

(where the profile has an `adam_factor`, measured beside the executor's own Adam chunks, it
stands for memory and for the chunks' tolls; where it has a `copy_adam_factor`, read from the
executor's own calls beside a native copy and the Adam at once, that stands for dma x adam on
a native link: the runs' calls took 2.4-3.9x there where the product was 1.25),

where `experts` is the factor of CPU experts computing on the rank's own worker cores, on
another rank's of the same socket, or both (1 if none): on nvidia-h200-x2 (one socket) they
slowed an issuing loop as much from another process as from its own
(calibration/expert_neighbours.py), so the ranks of a socket share one `HostExperts`.
Without `issue_tolls` in the profile the slowdown is 1.
"""

from __future__ import annotations

import itertools
from collections import Counter
from contextlib import contextmanager

from aptmoe.config import LINK_CHUNK_BYTES
from aptmoe.profile import IssueTolls

# The issuing thread keeps at least this share of its time: beyond, the per-wake model no
# longer holds (the neighbours' wakes would queue behind each other).
MIN_LEFT = 0.2


class HostExperts:
    """The CPU expert jobs computing now on one socket, by rank: the issuing threads of its
    ranks each see their own and the others'."""

    def __init__(self) -> None:
        self.running: Counter[int] = Counter()

    def others(self, rank: int) -> bool:
        return any(n > 0 for r, n in self.running.items() if r != rank)


class IssuingThread:
    def __init__(self, tolls: IssueTolls | None, capped: bool, rank: int = 0,
                 host: HostExperts | None = None) -> None:
        self.tolls, self.capped, self.rank = tolls, capped, rank
        self.host = host if host is not None else HostExperts()
        self._ids = itertools.count()
        self._copies: dict[int, float] = {}        # running copy -> its toll per second
        self._jobs: dict[int, float] = {}          # running CPU job -> its toll per second
        self._adam = 0                             # of which not CPU experts (Adam chunks)

    @contextmanager
    def copy(self, nbytes: int, seconds: float, engine: bool = True):
        """A copy of `nbytes` expected to take `seconds` is on one of the rank's links: a
        parameter load by the copy engine (`engine`), or a gradient by the offload thread,
        which only waits for its copies (its wakes cost no more than the DMA's slowdown, as
        far as measured: `copy_s` is the copy engine's, with the policy's work)."""
        if self.tolls is None or seconds <= 0:
            yield
            return
        t = self.tolls
        # A copy shorter than a wake's toll has landed before its thread waits for it (the
        # copy engine keeps the next in flight): the thread does not sleep, no wake is paid.
        toll = (t.copy_s if engine and seconds >= t.copy_s else 0.0) \
            + (-(-nbytes // LINK_CHUNK_BYTES) * t.chunk_s if self.capped else 0.0)
        key = next(self._ids)
        self._copies[key] = toll / seconds
        try:
            yield
        finally:
            del self._copies[key]

    @contextmanager
    def cpu_job(self, seconds: float, expert: bool = False):
        """A CPU job expected to take `seconds` runs on the rank's worker: a CPU expert
        (`expert`) or an Adam chunk."""
        if self.tolls is None or seconds <= 0:
            yield
            return
        key = next(self._ids)
        # A measured Adam factor holds the chunks' wakes as well as their memory stream.
        in_factor = not expert and self.tolls.adam_factor is not None
        self._jobs[key] = 0.0 if in_factor else self.tolls.cpu_job_s / seconds
        if expert:
            self.host.running[self.rank] += 1
        else:
            self._adam += 1
        try:
            yield
        finally:
            del self._jobs[key]
            if expert:
                self.host.running[self.rank] -= 1
            else:
                self._adam -= 1

    def slowdown(self) -> float:
        """How much longer the issuing thread's host work takes now than alone."""
        t = self.tolls
        if t is None:
            return 1.0
        experts = t.experts(self.host.running[self.rank] > 0, self.host.others(self.rank))
        if not (self._copies or self._jobs) and experts == 1.0:
            return 1.0
        jobs = sum(self._jobs.values())
        adam = t.adam_factor if t.adam_factor is not None else t.memory_factor
        factor = (t.dma_factor if self._copies else 1.0) * (adam if self._adam else 1.0) * experts
        product = factor / max(MIN_LEFT, 1.0 - sum(self._copies.values()) - jobs)
        if self._copies and self._adam and t.copy_adam_factor is not None and not self.capped:
            # Read from the executor's calls beside both, the copies' wakes in it; at least
            # the product, where copies land more often than in the calls it was read from.
            return max(product, t.copy_adam_factor * experts / max(MIN_LEFT, 1.0 - jobs))
        return product
