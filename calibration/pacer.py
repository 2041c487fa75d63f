"""How late a copy on a capped link is seen to have landed (`pacer`).

A capped link (exec/link.py) copies a copy's bytes at once and has a pacing thread that
keeps the slower link as a fluid: a copy lands once its bytes would have passed at the cap,
and the thread waiting for it hears so late: the pacing thread's sleep ends late (Linux's
timer slack, 50 us by default, and the thread's wake-up), it records the copy's end, and the
waiting thread wakes in turn. The link itself does not wait for either: a copy queued behind
another starts when that one's bytes have passed.

This times `ROUNDS` x `COPIES` copies through a `Link` (host to GPU where there is one, else
host to host), each `COPY_BYTES` at
`CAP_GBps` (a 0.52 ms slot: a 4 MiB chunk at 8 GB/s), each alone on the link, from the call
until the waiting thread has its landing, and takes the median of what they took beyond
their slot. The simulator hands over every capped copy that much after its bytes have passed
over the cap (sim/engine.py `_copy`, `_landing`). On the one-H200 host a lone 64 MiB copy to
the GPU at 16 GB/s landed 220-480 us after its slot (tests/test_exec_gpu.py, session 12),
where host-to-host copies measured 110 us: the wait on the copy's CUDA event is a third wake.

Before the link had a pacing thread of its own (2026-11-29), the copying thread paced its
own copies, and this timed back-to-back copies from one call to the next: 80-101 us on the
2-core development machine, 120 us in the pooled one-H200 profile.

    python -m aptmoe.calibration.pacer
"""

from __future__ import annotations

import statistics
import time

import torch

from aptmoe.exec.device import Device
from aptmoe.exec.link import Link

COPY_BYTES = 256 << 10
CAP_GBps = 0.5
COPIES = 40
ROUNDS = 3


def measure_pacer_late(copies: int = COPIES, rounds: int = ROUNDS, device: str = "cpu") -> float:
    """Seconds after its slot that a copy alone on a capped `Link` is seen to have landed by
    the thread waiting for it (the median over `rounds` rounds of `copies` copies). On a GPU
    (`device` "cuda:N") the copies go from pinned host memory to it and the wait ends, as
    the executor's do, on the copy's end event."""
    dev = Device(device)
    src = torch.randn(COPY_BYTES // 4)
    if dev.cuda:
        src = src.pin_memory()
    dst = torch.empty_like(src, device=dev.torch)
    stream = dev.new_stream()
    slot = COPY_BYTES / (CAP_GBps * 1e9)
    late = []
    for _ in range(rounds):
        link = Link(CAP_GBps, dev)
        try:
            link.wait(link.copy(dst, src, stream))      # warm: the pacing thread has run once
            for _ in range(copies):
                t = time.perf_counter()
                link.wait(link.copy(dst, src, stream))
                late.append(time.perf_counter() - t - slot)
        finally:
            link.close()
    return max(0.0, statistics.median(late))


if __name__ == "__main__":
    where = "cuda:0" if torch.cuda.is_available() else "cpu"
    print(f"a {COPY_BYTES >> 10} KiB copy to {where} capped to {CAP_GBps:g} GB/s lands {measure_pacer_late(device=where) * 1e6:.1f} us after "
          f"its slot (median of {ROUNDS} rounds of {COPIES})")
