"""A rank's host link in one direction, optionally capped to emulate a slower PCIe.

`Link.copy` starts a copy and returns its `Landing` at once, as a copy on a CUDA stream
does; the caller waits for the landing when it needs the bytes. Without a cap the copy is
one call on the caller's stream.

With a cap, a pacing thread of the link's own plays the DMA engine of a slower link. It cuts
every copy into 4 MiB chunks and issues each chunk (on the copy's stream) when the chunks
before it would have passed at the capped rate; a copy has landed once its last chunk's slot
has passed. Copies of one lane (one stream, or one thread on the CPU) go first in, first
out, as copies on one CUDA stream do; the lanes share the link chunk by chunk, so together
they never exceed the cap: the sharing the simulator's fluid link models. A copy queued
behind another starts when that one's bytes have passed, not when some thread wakes up to
issue it: the link never idles while a copy waits.

Before, the issuing thread paced its own copy and slept until its slot had passed, so the
link idled from one copy's end until that thread came back with the next: on the one-H200
grid of 2026-11-29 (docs/validation-h200-v8, S8 G0.6 capped) a 32 MiB load took 494 us more
than its 4.19 ms slot, start to start, and a stage's offload ran at 7.0 GB/s of the 8. Pacing
on the host keeps the device free of artificial work and works the same for CUDA and
host-to-host copies.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from aptmoe.config import LINK_CHUNK_BYTES as CHUNK_BYTES      # 4 MiB
from aptmoe.exec.device import Device, Marker


class LinkClosed(RuntimeError):
    pass


@dataclass(eq=False)
class Landing:
    """One copy on a link: `done` is set once it has landed, with `end` a marker on its stream
    behind its bytes (and `start` one before them, when asked for). On a GPU the bytes are
    there once `end` has passed."""

    start: Marker | None = None
    end: Marker | None = None
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None

    def check(self) -> None:
        """Raise what stopped the copy, if anything did."""
        if self.error is not None:
            raise LinkClosed(f"a copy on a capped link did not land: {self.error}") from self.error


@dataclass(eq=False)
class _Copy:
    dst: torch.Tensor
    src: torch.Tensor
    stream: object
    mark_start: bool
    queued_at: float
    landing: Landing
    at: int = 0                    # the next element to issue


class Link:
    def __init__(self, cap_GBps: float | None, dev: Device | None = None) -> None:
        if cap_GBps is not None and not cap_GBps > 0:
            raise ValueError(f"a link cap must be positive GB/s, got {cap_GBps}")
        self.cap = None if cap_GBps is None else cap_GBps * 1e9
        self.dev = dev if dev is not None else Device("cpu")
        self.bytes = 0
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._lanes: dict[object, deque[_Copy]] = {}     # lanes with copies, in round-robin order
        self._due: list[tuple[float, int, _Copy]] = []   # issued copies by when their slot ends
        self._seq = itertools.count()
        self._next = 0.0              # when the link is free for the next chunk (perf_counter)
        self._closed: BaseException | None = None
        self._thread: threading.Thread | None = None
        if self.cap is not None:
            # started here, by the thread that makes the link: it inherits that thread's cores
            self._thread = threading.Thread(target=self._pace, name="link-pacer", daemon=True)
            self._thread.start()

    def copy(self, dst: torch.Tensor, src: torch.Tensor, stream=None, *, mark_start: bool = False) -> Landing:
        """Start dst.copy_(src) (contiguous, equal numel) on `stream` (None: the current one)."""
        nbytes = src.numel() * src.element_size()
        landing = Landing()
        with self._lock:
            self.bytes += nbytes
            if self.cap is not None:
                if self._closed is not None:
                    raise LinkClosed(f"the capped link is closed: {self._closed}")
                lane = stream if stream is not None else threading.get_ident()
                self._lanes.setdefault(lane, deque()).append(
                    _Copy(dst.reshape(-1), src.reshape(-1), stream, mark_start, time.perf_counter(), landing))
                self._cond.notify()
                return landing
        with self.dev.on(stream):
            if mark_start:
                landing.start = self.dev.record(stream)
            dst.copy_(src, non_blocking=True)
            landing.end = self.dev.record(stream)
        landing.done.set()
        return landing

    def wait(self, landing: Landing, timeout: float | None = None) -> bool:
        """Wait until `landing` has landed, its bytes there too; False if `timeout` passed first."""
        if not landing.done.wait(timeout):
            return False
        landing.check()
        self.dev.block_on(landing.end)
        return True

    def close(self, why: str = "the link was closed") -> None:
        """Stop the pacing thread; copies that have not landed fail their waiters."""
        with self._lock:
            if self._closed is None:
                self._closed = LinkClosed(why)
            self._cond.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    # ------------------------------------------------------------------ the pacing thread
    def _pace(self) -> None:
        self.dev.enter_thread()
        try:
            while True:
                with self._lock:
                    job = self._next_job()
                if job is None:
                    break
                kind, c, lo, hi = job
                with self.dev.on(c.stream):
                    if kind == "land":
                        c.landing.end = self.dev.record(c.stream)
                        c.landing.done.set()
                        continue
                    if lo == 0 and c.mark_start:
                        c.landing.start = self.dev.record(c.stream)
                    c.dst[lo:hi].copy_(c.src[lo:hi], non_blocking=True)
        except BaseException as e:          # a failed copy: every waiter hears of it
            with self._lock:
                self._closed = e
        self._fail_pending()

    def _next_job(self):
        """Under the lock: wait until a landing is due or the next chunk's slot has come, and
        return it, ("land" | "chunk", copy, lo, hi); None once closed."""
        while self._closed is None:
            now = time.perf_counter()
            due = self._due[0][0] if self._due else float("inf")
            if due <= now:
                return ("land", heapq.heappop(self._due)[2], 0, 0)
            wake = due
            if self._lanes:
                lane, q = next(iter(self._lanes.items()))
                c = q[0]
                # a copy's first chunk waits for the link and for its own queuing; later ones for the link
                start = self._next if c.at else max(self._next, c.queued_at)
                if start <= now:
                    return self._issue(lane, q, c, start)
                wake = min(wake, start)
            self._cond.wait(None if wake == float("inf") else wake - now)
        return None

    def _issue(self, lane, q: deque[_Copy], c: _Copy, start: float):
        step = max(1, CHUNK_BYTES // c.src.element_size())
        lo, hi = c.at, min(c.at + step, c.src.numel())
        c.at = hi
        self._next = start + (hi - lo) * c.src.element_size() / self.cap
        del self._lanes[lane]                # round robin: this lane goes to the back
        if hi == c.src.numel():
            q.popleft()
            heapq.heappush(self._due, (self._next, next(self._seq), c))
        if q:
            self._lanes[lane] = q
        return ("chunk", c, lo, hi)

    def _fail_pending(self) -> None:
        with self._lock:
            why = self._closed
            pending = [c for q in self._lanes.values() for c in q] + [c for _, _, c in self._due]
            self._lanes.clear()
            self._due.clear()
        for c in pending:
            c.landing.error = why
            c.landing.done.set()
