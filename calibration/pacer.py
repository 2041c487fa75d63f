"""How late each copy on a capped link ends (`pacer`).

A capped link (exec/link.py) paces each copy in chunks: the copying thread sleeps until a
chunk's slot and, after the last one, until the copy's slot has passed, so that a copy of N
bytes takes N / cap. The last sleep ends late (Linux's timer slack, 50 us by default, and the
thread's wake-up), and the thread's next copy starts after that and after its own Python: the
copy engine and the offload thread pace their own copies, back to back. On the 2-core
development machine a bare 0.5-1.3 ms sleep returned 71-75 us late and back-to-back copies
through a `Link` ended 81-111 us late each; the CPU validation's capped loads (64 KiB at
0.05 GB/s, a 1.31 ms slot) measured 80-95 us over their slot in the executor's traces.

This times `ROUNDS` x `COPIES` back-to-back copies through a `Link` of host tensors, each
`COPY_BYTES` at `CAP_GBps` (a 0.52 ms slot: a 4 MiB chunk at 8 GB/s), each from its call to
the next one's, and takes the median of what they took beyond their slot (a mean of rounds
moved by 40 us between runs, with a few late wakes of milliseconds). The simulator ends every capped copy that much
after its bytes over the cap (sim/engine.py `_copy`). On a GPU the executor's copies go to
the device (an asynchronous launch where this copies host memory): the same sleeps, a
slightly different call.

    python -m aptmoe.calibration.pacer
"""

from __future__ import annotations

import statistics
import time

import torch

from aptmoe.exec.link import Link

COPY_BYTES = 256 << 10
CAP_GBps = 0.5
COPIES = 40
ROUNDS = 3


def measure_pacer_late(copies: int = COPIES, rounds: int = ROUNDS) -> float:
    """Seconds a back-to-back copy through a capped `Link` takes beyond its slot (the median
    over `rounds` rounds of `copies` copies)."""
    src = torch.randn(COPY_BYTES // 4)
    dst = torch.empty_like(src)
    slot = COPY_BYTES / (CAP_GBps * 1e9)
    late = []
    for _ in range(rounds):
        link = Link(CAP_GBps)
        link.copy(dst, src)                     # warm: the first copy's slot starts now
        t = time.perf_counter()
        for _ in range(copies):
            link.copy(dst, src)
            now = time.perf_counter()
            late.append(now - t - slot)
            t = now
    return max(0.0, statistics.median(late))


if __name__ == "__main__":
    print(f"a {COPY_BYTES >> 10} KiB copy capped to {CAP_GBps:g} GB/s ends {measure_pacer_late() * 1e6:.1f} us after "
          f"its slot (median of {ROUNDS} rounds of {COPIES})")
