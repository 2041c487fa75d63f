"""The host memory's speed as the CPU's work sees it: one token through the next MoE-M expert
of a pool larger than any cache, each call reading all of that expert's weights.

The calibration times this stream alone (`host_memory.cpu_alone_GBps`, per thread count) and
beside the links' copies; the executor times it on each rank's CPU worker, with the worker's
threads, before and after a run's steps (`HostStream`). On the one-GPU H200 machine the
calibration of one lease measured 97 GB/s where another's had 115, and a run's CPU Adam took
0.238 s on a lease whose calibration predicted 0.166 (docs/validation-h200-v8): the memory the
host's CPU work streams is shared with whatever else runs on the host, and its speed moves. The
ratio of a run's reading to its profile's says by how much, beside the prediction.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

MiB = 1 << 20
POOL_BYTES = 768 * MiB          # beyond every cache
SAMPLES = 40                    # calls timed per reading
D, H = 2048, 8192               # MoE-M's expert

Place = Callable[[torch.Tensor], torch.Tensor]


def median_call(fn: Callable[[], None], n: int = SAMPLES) -> float:
    """Median seconds of `n` calls of `fn`, after one untimed call."""
    fn()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def expert_stream(place: Place, fill: Callable[[torch.Tensor], object] = torch.nn.init.normal_,
                  pool_bytes: int = POOL_BYTES) -> tuple[Callable[[], None], int]:
    """One token through the next expert of a pool (weights filled by `fill`, then placed by
    `place`): the call and the bytes it reads."""
    per = 2 * D * H * 4
    pool = []
    for _ in range(max(2, pool_bytes // per)):
        w1, w2 = torch.empty(H, D), torch.empty(D, H)
        fill(w1)
        fill(w2)
        pool.append((place(w1), place(w2)))
    x = torch.randn(1, D)
    at = [0]

    def call() -> None:
        w1, w2 = pool[at[0] % len(pool)]
        at[0] += 1
        torch.nn.functional.linear(torch.relu(torch.nn.functional.linear(x, w1)), w2)

    return call, per


class HostStream:
    """The stream for readings beside a run: its pool made once (in the memory the run keeps
    parameters in, `place`), each reading the median over `SAMPLES` calls in GB/s, taken on the
    calling thread with torch's threads as they are there (the CPU worker's, on a rank)."""

    def __init__(self, place: Place) -> None:
        # Values do not change a dense fp32 product's speed; a constant fills 768 MiB faster
        # than random numbers (the CPU ranks in the tests make one pool per run).
        self._call, self._bytes = expert_stream(place, fill=lambda t: t.fill_(0.01))

    def GBps(self) -> float:
        return self._bytes / median_call(self._call) / 1e9


__all__ = ["POOL_BYTES", "SAMPLES", "D", "H", "HostStream", "expert_stream", "median_call"]
