"""A rank's host link in one direction, optionally capped to emulate a slower PCIe.

The cap is a token bucket on the host: a copy is cut into chunks, and each chunk may start
only when the bytes before it, at the capped rate, would have passed. Every copy of the
rank in that direction (parameter loads and CPU experts' activations alike, from any
thread) draws on the same bucket, so together they never exceed the cap: the sharing the
simulator's fluid link models. Pacing on the host keeps the device free of artificial work
and works the same for CUDA and host-to-host copies. Without a cap a copy is one call.
"""

from __future__ import annotations

import threading
import time

import torch

from aptmoe.config import LINK_CHUNK_BYTES as CHUNK_BYTES      # 4 MiB


class Link:
    def __init__(self, cap_GBps: float | None) -> None:
        if cap_GBps is not None and not cap_GBps > 0:
            raise ValueError(f"a link cap must be positive GB/s, got {cap_GBps}")
        self.cap = None if cap_GBps is None else cap_GBps * 1e9
        self._next = 0.0                        # when the bucket is free again (perf_counter)
        self._lock = threading.Lock()
        self.bytes = 0

    def _reserve(self, nbytes: int) -> tuple[float, float]:
        """The slot [start, end) in which `nbytes` may pass."""
        with self._lock:
            start = max(time.perf_counter(), self._next)
            self._next = start + nbytes / self.cap
            return start, self._next

    def copy(self, dst: torch.Tensor, src: torch.Tensor, *, non_blocking: bool = True) -> None:
        """dst.copy_(src), paced to the cap; dst and src are contiguous with equal numel."""
        nbytes = src.numel() * src.element_size()
        with self._lock:
            self.bytes += nbytes
        if self.cap is None:
            dst.copy_(src, non_blocking=non_blocking)
            return
        d, s = dst.reshape(-1), src.reshape(-1)
        step = max(1, CHUNK_BYTES // src.element_size())
        end = time.perf_counter()
        for at in range(0, s.numel(), step):
            part = s[at:at + step]
            start, end = self._reserve(part.numel() * part.element_size())
            delay = start - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            d[at:at + step].copy_(part, non_blocking=non_blocking)
        # The last chunk's own time is part of the copy: wait until its slot has passed too.
        delay = end - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
