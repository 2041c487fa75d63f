"""What a waking thread costs the thread that issues kernels (the GIL's toll), measured.

In the H200 runs (docs/validation-h200-v4) a GPU rank's compute thread issued a block 1.4-2.6x
slower while a load was in flight or the CPU worker ran than with nothing else running: each
copy the copy engine finishes, each job the CPU worker picks up, wakes a Python thread that
needs the GIL, and with a short switch interval the issuing thread hands it over at once.
The simulator does not model that yet. This probe measures the toll per wake, at a switch
interval, before any model is built on it:

* the issuing thread makes `ops` tiny in-place additions on the device (a kernel launch
  each on a GPU), timed alone and beside a waker;
* the waker sleeps `period` on a threading.Event (no GIL held), then does what the copy
  engine does when a copy lands: takes a condition, touches a few Python objects, records and
  queries an event (a torch call), notifies;
* cost per wake = (time beside the waker - time alone) / wakes during it; alone and beside
  alternate, and the median of `rounds` is kept;
* the waker's own latency: from when its sleep was due to end to when its work is done, beside
  the issuing loop and with the main thread asleep (the GIL free). The difference is what a
  thread of the executor that another's copy or drop wakes (the offload thread when its
  gradients land, the copy engine when a load window opens) waits for the GIL before it acts:
  in GPipeOffload's native one-H200 runs of sessions 30-39 a stage's offload ended a median
  0.41-0.89 ms before the offload thread dropped the stage, and a load window opened 0.30-0.64
  ms before its first copy started (MoE-S to -L), where the simulator has none
  (docs/measured/session40, `python -m aptmoe.sim.handoffs`).

Two more neighbours tell the GIL's toll from the memory's: a thread copying host memory on
the other cores (it wakes once per 256 MiB), and on a GPU back-to-back h2d copies (a wake per
1 GiB). Those blocks were also slower beside loads and Adam, which stream host memory; if the
issuing loop slows beside these, the loaded memory's latency is the cause, not the GIL.

    python -m aptmoe.calibration.wake [--device cuda|cpu] [--switch-us 100,5000] [--period-us 500]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from aptmoe.calibration.background import Background
from aptmoe.flags import number_list


@dataclass(frozen=True)
class WakeCost:
    device: str
    switch_us: float
    period_us: float
    issue_us: float          # one op alone
    wakes_per_s: float
    cost_us: float           # the issuing thread's loss per wake (median)
    latency_us: float = 0.0        # a wake's latency beside the issuing loop (median: sleep due -> work done)
    latency_idle_us: float = 0.0   # the same with the main thread asleep


def issue_loop(x: torch.Tensor, ops: int) -> float:
    """Seconds for `ops` tiny in-place additions on `x`'s device: a launch-bound issuing thread."""
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    sync()
    t = time.perf_counter()
    for _ in range(ops):
        x.add_(1.0)
    sync()
    return time.perf_counter() - t


class _Waker(Background):
    settle_s = 0.0

    def __init__(self, device: torch.device, period_s: float) -> None:
        super().__init__()
        self.period_s = period_s
        self.cond = threading.Condition()
        self.count = 0                           # wakes
        self.state: dict[int, int] = {}
        self.latencies: list[float] = []        # s from each sleep's due end to its work done
        self.marker = (lambda: torch.cuda.Event()) if device.type == "cuda" else None

    def run(self) -> None:
        while True:
            due = time.perf_counter() + self.period_s
            if self.stop.wait(self.period_s):
                break
            with self.cond:                      # what the copy engine does when a copy lands
                self.count += 1
                self.state[self.count % 8] = self.count
                if self.marker is not None:
                    ev = self.marker()
                    ev.record()
                    ev.query()
                else:
                    torch.empty(16)
                self.cond.notify_all()
            self.latencies.append(time.perf_counter() - due)


class MemoryStream(Background):
    """Another thread streaming host memory (copying a 256 MiB buffer, again and again, with
    the OpenMP threads it starts) on the cores `cpus`: it holds the GIL only between copies,
    so what it costs the issuing thread is the memory's loaded latency, not the GIL."""

    def __init__(self, cpus: list[int] | None) -> None:
        super().__init__(cpus)
        self.src = torch.randn(64 << 20)
        self.dst = torch.empty_like(self.src)
        self.bytes = 0

    def run(self) -> None:
        while not self.stop.is_set():
            self.dst.copy_(self.src)
            self.bytes += 2 * self.src.numel() * 4


def issue_round(make: Callable[[], Background], x: torch.Tensor, ops: int,
                seen: list[Background] | None = None) -> tuple[float, float, int, int]:
    """One round: the issuing loop alone, then inside `make()`'s neighbour: (seconds alone,
    seconds beside, the neighbour's `count` and `chunks` meanwhile; 0 for a neighbour that
    counts nothing, such as DMA or a memory stream). `seen` gets the neighbour."""
    alone = issue_loop(x, ops)
    with make() as n:
        if seen is not None:
            seen.append(n)
        c0, k0 = getattr(n, "count", 0), getattr(n, "chunks", 0)
        beside = issue_loop(x, ops)
        return alone, beside, getattr(n, "count", 0) - c0, getattr(n, "chunks", 0) - k0


def idle_latencies(device: torch.device, period_s: float, seconds: float) -> list[float]:
    """The waker's latencies (`_Waker.latencies`) over `seconds` with this thread asleep."""
    with _Waker(device, period_s) as w:
        time.sleep(seconds)
    return w.latencies


def slowdown(beside: Callable[[], Background], device: str = "cpu", ops: int = 20000, rounds: int = 5) -> float:
    """The issuing loop's time beside `beside()`'s neighbour over its time alone,
    alternating, the median of `rounds`."""
    x = torch.zeros(16, device=torch.device(device))
    issue_loop(x, ops // 10)
    return statistics.median(b / a for a, b, _, _ in (issue_round(beside, x, ops) for _ in range(rounds)))


def measure_wake_cost(device: str = "cpu", switch_us: float = 100.0, period_us: float = 500.0,
                      ops: int = 20000, rounds: int = 5) -> WakeCost:
    dev = torch.device(device)
    x = torch.zeros(16, device=dev)
    old = sys.getswitchinterval()
    sys.setswitchinterval(switch_us * 1e-6)
    try:
        issue_loop(x, ops // 10)                                   # warm-up: kernels, allocator
        costs, alone_s, rates, wakers, idle = [], [], [], [], []
        for _ in range(rounds):
            alone, beside, wakes, _ = issue_round(lambda: _Waker(dev, period_us * 1e-6), x, ops, wakers)
            alone_s.append(alone)
            rates.append(wakes / beside)
            if wakes:
                costs.append((beside - alone) / wakes)
            idle += idle_latencies(dev, period_us * 1e-6, beside)     # as long, with the GIL free
    finally:
        sys.setswitchinterval(old)
    beside_lat = [t for w in wakers for t in w.latencies]
    if not costs or not beside_lat or not idle:
        raise RuntimeError(f"the waker never woke in {rounds} rounds of {ops} ops; use a shorter --period-us")
    return WakeCost(device, switch_us, period_us, statistics.median(alone_s) / ops * 1e6,
                    statistics.median(rates), statistics.median(costs) * 1e6,
                    statistics.median(beside_lat) * 1e6, statistics.median(idle) * 1e6)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m aptmoe.calibration.wake", description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--switch-us", type=number_list(float, "numbers of microseconds"), default="100,5000",
                   help="GIL switch intervals to measure at, in us")
    p.add_argument("--period-us", type=float, default=500.0, help="the waker's sleep between wakes, in us")
    p.add_argument("--ops", type=int, default=20000)
    p.add_argument("--rounds", type=int, default=5)
    ns = p.parse_args(argv)
    if ns.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA GPU here")
    print(f"{ns.device}: {ns.ops} ops x {ns.rounds} rounds, a waker every {ns.period_us:g} us")
    for s in ns.switch_us:
        r = measure_wake_cost(ns.device, s, ns.period_us, ns.ops, ns.rounds)
        print(f"  switch {s:6g} us: an op {r.issue_us:6.2f} us alone; {r.wakes_per_s:7.0f} wakes/s; "
              f"the issuing thread loses {r.cost_us:7.1f} us a wake; a wake takes {r.latency_us:7.1f} us "
              f"to act beside it, {r.latency_idle_us:6.1f} us with the GIL free (median)")
    # The issuing thread on the first core, what runs beside it on the others (as with
    # --host-cores): a slowdown here is the memory's, not a core's or the GIL's.
    here = sorted(os.sched_getaffinity(0))
    others = here[1:] or None
    os.sched_setaffinity(0, here[:1])
    torch.set_num_threads(max(1, len(here) - 1))
    print(f"  beside a thread copying host memory on cores {others or here}: the issuing loop takes "
          f"{slowdown(lambda: MemoryStream(others), ns.device, ns.ops, ns.rounds):.2f}x its time alone")
    if ns.device == "cuda":
        from aptmoe.calibration.host_memory import CopyLoop
        print(f"  beside back-to-back h2d copies: "
              f"{slowdown(lambda: CopyLoop('h2d', torch.cuda.current_device(), others), ns.device, ns.ops, ns.rounds):.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
