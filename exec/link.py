"""A rank's host link in one direction, optionally capped to emulate a slower PCIe.

`Link.copy` starts a copy and returns its `Landing` at once, as a copy on a CUDA stream
does; the caller waits for the landing when it needs the bytes. Without a cap the copy is
one call on the caller's stream and lands when the stream has run it.

With a cap the copy also goes at once, at the machine's own rate, but it lands only when its
bytes would have passed over the slower link. A pacing thread of the link's own keeps that
link as a fluid, as the simulator's is (sim/links.py): the copies of one lane (one stream, or
one thread on the CPU) pass first in, first out, as copies on one CUDA stream do; the lanes
with a copy passing share the cap equally. A copy queued behind another starts when that one's
bytes have passed, whenever a thread comes back to it, so the link never idles while a copy
waits. The pacing thread wakes when a copy lands (it records the copy's end marker on its
stream, then tells the waiter) and when a copy arrives at an empty lane: a thread wake per
copy, where a real link costs the host none.

History (docs/validation-h200-v8 and -v9, one H200, 8 GB/s): the issuing thread used to pace
its own copy in 4 MiB chunks and sleep to its slot's end, so the link idled until that thread
came back (494 us beyond each 32 MiB load's 4.19 ms slot; offloads at 7.0 GB/s). A pacing
thread then issued the chunks at their slots, which closed the gaps but woke once per 4 MiB
chunk: the issuing thread, which needs the GIL the waking thread takes, ran S8's forward blocks
beside a capped load at 0.42 ms against 0.15 alone (v9, GPipeOffload). The bytes' own time is
not what a slower link changes for anyone waiting on a landing; the landing is.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch

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
    # on a capped link, a marker right behind the copy itself, made when it is queued: `end`,
    # recorded when the copy lands, also waits for every copy queued on the stream since
    copied: Marker | None = None
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
    # on a capped link (perf_counter seconds): when the copy was queued, and when its bytes had
    # passed over the capped link, which its waiter hears of a little later
    queued: float | None = None
    due: float | None = None

    @property
    def arrived(self) -> Marker | None:
        """The marker after which the copy's bytes are there: on a capped link, the copy's own
        (a stage's offload queues all its blocks at once: waiting on the first block's `end`
        waited for the whole stage to run at the machine's rate, and four H200s' capped L4
        offloads released their first Adam 79-91 ms after the backward, not 34 ms,
        docs/validation-h200-4gpu)."""
        return self.copied if self.copied is not None else self.end

    def check(self) -> None:
        """Raise what stopped the copy, if anything did."""
        if self.error is not None:
            raise LinkClosed(f"a copy on a capped link did not land: {self.error}") from self.error


@dataclass(eq=False)
class _Copy:
    stream: object
    mark_start: bool
    landing: Landing               # its `queued` is when the copy was queued
    keep: tuple                    # its tensors, alive until it lands (the copy may still run)
    left: float                    # bytes not yet passed over the capped link
    ready: float                   # when its bytes begin to pass: its lane's copy before it has passed
    started: bool = False


class Link:
    def __init__(self, cap_GBps: float | None, dev: Device | None = None) -> None:
        if cap_GBps is not None and not cap_GBps > 0:
            raise ValueError(f"a link cap must be positive GB/s, got {cap_GBps}")
        self.cap = None if cap_GBps is None else cap_GBps * 1e9
        self.dev = dev if dev is not None else Device("cpu")
        self.bytes = 0
        self.wakes = 0                  # times the pacing thread woke (what a capped link costs the host)
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._lanes: dict[object, deque[_Copy]] = {}     # lanes with copies not landed, each first in first out
        self._vt = 0.0                # how far the fluid has been followed (perf_counter seconds)
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
        called = time.perf_counter()     # its bytes may pass from here (a host copy takes a while below)
        with self.dev.on(stream):
            if mark_start and self.cap is None:
                landing.start = self.dev.record(stream)
            dst.copy_(src, non_blocking=True)
            if self.cap is None:
                landing.end = self.dev.record(stream)
            else:
                landing.copied = self.dev.record(stream)
        with self._lock:
            self.bytes += nbytes
            if self.cap is None:
                landing.done.set()
                return landing
            if self._closed is not None:
                raise LinkClosed(f"the capped link is closed: {self._closed}")
            # (at least where the fluid has been followed to, should the thread have moved on meanwhile)
            at = max(called, self._vt)
            landing.queued = at
            c = _Copy(stream, mark_start, landing, (dst, src), left=float(nbytes), ready=at)
            lane = stream if stream is not None else threading.get_ident()
            q = self._lanes.get(lane)
            if q:
                q.append(c)              # it waits for the copy before it, which wakes the thread
            else:
                self._lanes[lane] = deque([c])
                self._cond.notify()      # a new lane shares the link from now on
        return landing

    def wait(self, landing: Landing, timeout: float | None = None) -> bool:
        """Wait until `landing` has landed, its bytes there too; False if `timeout` passed first."""
        if not landing.done.wait(timeout):
            return False
        landing.check()
        self.dev.block_on(landing.arrived)
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
                    if self._closed is not None:
                        break
                    started, landed, wake = self._advance(time.perf_counter())
                    if not started and not landed:
                        self._cond.wait(None if wake is None else max(0.0, wake - time.perf_counter()))
                        self.wakes += 1
                        continue
                for c in started:
                    with self.dev.on(c.stream):
                        c.landing.start = self.dev.record(c.stream)
                for c in landed:
                    with self.dev.on(c.stream):
                        c.landing.end = self.dev.record(c.stream)
                    c.keep = ()
                    c.landing.done.set()
        except BaseException as e:          # a failed record: every waiter hears of it
            with self._lock:
                self._closed = e
        self._fail_pending()

    def _advance(self, now: float) -> tuple[list[_Copy], list[_Copy], float | None]:
        """Under the lock: follow the fluid from where it was to `now`. Returns the copies whose
        bytes began to pass (those that want a start marker), those that landed, and when the
        next one lands if nothing arrives (None: the link is idle)."""
        started, landed = [], []
        vt = max(self._vt, min((q[0].ready for q in self._lanes.values()), default=now))
        while True:
            heads = [q[0] for q in self._lanes.values()]
            passing = {lane: q[0] for lane, q in self._lanes.items() if q[0].ready <= vt}
            for h in passing.values():
                if not h.started:
                    h.started = True
                    if h.mark_start:
                        started.append(h)
            rate = self.cap / len(passing) if passing else 0.0
            t_ready = min((h.ready for h in heads if h.ready > vt), default=float("inf"))
            t_done = vt + min(h.left for h in passing.values()) / rate if passing else float("inf")
            t = min(t_ready, t_done, now)
            if t > vt:
                for h in passing.values():
                    h.left -= (t - vt) * rate
                vt = t
            done = [(lane, h) for lane, h in passing.items() if h.left <= 1.0]     # within a byte: floating point
            for lane, h in done:
                q = self._lanes[lane]
                q.popleft()
                if q:
                    q[0].ready = max(q[0].landing.queued, vt)
                else:
                    del self._lanes[lane]
                h.landing.due = vt
                landed.append(h)
            if not done and vt >= now:
                break
        self._vt = vt
        nxt = min(t_ready, t_done)
        return started, landed, None if nxt == float("inf") else nxt

    def _fail_pending(self) -> None:
        with self._lock:
            why = self._closed
            pending = [c for q in self._lanes.values() for c in q]
            self._lanes.clear()
        for c in pending:
            c.landing.error = why
            c.landing.done.set()
