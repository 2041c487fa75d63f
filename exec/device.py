"""One rank's device, CUDA or CPU, behind one small interface.

The runtime is written once for both: on a GPU, streams are CUDA streams, markers are CUDA
events (timed on the device, resolved to host seconds when the step ends), and host
buffers are pinned; on a CPU-only machine (gloo, CI) every "device" tensor is a CPU tensor,
streams are no-ops, a marker is the host clock at the moment it is recorded (CPU work is
synchronous), and copies are host-to-host copies.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch


@dataclass
class Marker:
    """A point on a stream: a CUDA event, or the host time when the stream is the CPU."""

    event: torch.cuda.Event | None = None
    host_s: float | None = None


class Device:
    def __init__(self, device: torch.device | str) -> None:
        self.torch = torch.device(device)
        self.cuda = self.torch.type == "cuda"
        self._zero: Marker | None = None
        self._zero_host = 0.0
        if self.cuda:
            torch.cuda.set_device(self.torch)
            self.compute = torch.cuda.current_stream(self.torch)

    def __str__(self) -> str:
        return torch.cuda.get_device_name(self.torch) if self.cuda else "cpu"

    # ---------------------------------------------------------------- threads and streams
    def enter_thread(self) -> None:
        """Every thread that issues device work calls this first: the current CUDA device
        is per thread and starts at device 0."""
        if self.cuda:
            torch.cuda.set_device(self.torch)

    def new_stream(self):
        return torch.cuda.Stream(self.torch) if self.cuda else None

    def on(self, stream):
        return torch.cuda.stream(stream) if self.cuda and stream is not None else contextlib.nullcontext()

    def record(self, stream=None) -> Marker:
        if not self.cuda:
            return Marker(host_s=time.perf_counter())
        # blocking: a host thread waiting on it (block_on) sleeps instead of spinning. The
        # copy engine and the offload thread wait for every copy; spinning, each held a core
        # for as long as its copies ran, beside the CPU worker's Adam and experts, which use
        # all of the rank's cores (on the H200, Adam chunks ran 0.42-0.46 ns per parameter
        # while native-speed copies were in flight, 0.29-0.35 otherwise).
        ev = torch.cuda.Event(enable_timing=True, blocking=True)
        ev.record(stream if stream is not None else torch.cuda.current_stream(self.torch))
        return Marker(event=ev)

    def wait(self, marker: Marker | None, stream=None) -> None:
        """Make `stream` (default: the current one) wait for the marker, without blocking the host."""
        if self.cuda and marker is not None and marker.event is not None:
            (stream if stream is not None else torch.cuda.current_stream(self.torch)).wait_event(marker.event)

    def block_on(self, marker: Marker | None) -> None:
        """Block this host thread until the marker has passed."""
        if self.cuda and marker is not None and marker.event is not None:
            marker.event.synchronize()

    def passed(self, marker: Marker | None) -> bool:
        """Whether the marker has passed, without waiting (on the CPU, always)."""
        return not (self.cuda and marker is not None and marker.event is not None) or marker.event.query()

    def keep_for(self, tensor: torch.Tensor, stream) -> None:
        """Tell the caching allocator that `stream` uses a tensor made on another stream, so
        its memory is not handed out again before that stream's work is done."""
        if self.cuda and stream is not None and tensor.is_cuda:
            tensor.record_stream(stream)

    def synchronize(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.torch)

    # ---------------------------------------------------------------- time
    def start_clock(self) -> None:
        """Step time zero: host seconds and (on a GPU) a device event at the same moment."""
        self.synchronize()
        self._zero_host = time.perf_counter()
        self._zero = self.record(self.compute if self.cuda else None)

    def seconds(self, marker: Marker) -> float:
        """Seconds since `start_clock` (call after `synchronize` for CUDA markers)."""
        if marker.host_s is not None:
            return marker.host_s - self._zero_host
        return self._zero.event.elapsed_time(marker.event) / 1e3

    def host_seconds(self) -> float:
        return time.perf_counter() - self._zero_host

    # ---------------------------------------------------------------- memory
    def allocator_counts(self) -> dict[str, float]:
        """How often (and, for pinned memory, how long) this process has asked the driver for
        memory so far: device segments (cudaMalloc), allocations retried after freeing the
        cache, pinned host blocks (cudaHostAlloc) and their seconds. Counted across the timed
        steps (`run_pipeline`): each such call can take the driver's locks from the issuing
        thread's launches, where a warm caching allocator makes none. Empty on a CPU, and the
        host figures where this torch does not count them (before 2.6)."""
        if not self.cuda:
            return {}
        dev = torch.cuda.memory_stats(self.torch)
        out = {"device_mallocs": float(dev.get("segment.all.allocated", 0)),
               "alloc_retries": float(dev.get("num_alloc_retries", 0))}
        host_stats = getattr(torch.cuda.memory, "host_memory_stats", None)
        if host_stats is not None:
            host = host_stats()
            out["host_allocs"] = float(host.get("num_host_alloc", 0))
            out["host_alloc_s"] = float(host.get("host_alloc_time.total", 0)) / 1e6
        return out

    def host_buffer(self, tensor: torch.Tensor) -> torch.Tensor:
        """A host copy of `tensor`, pinned where there is a GPU to copy to."""
        out = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=self.cuda)
        out.copy_(tensor)
        return out

    def empty_host(self, shape, dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, pin_memory=self.cuda)

    def cap_memory(self, nbytes: int) -> None:
        """Cap what this process may allocate on the GPU (emulates a smaller GPU)."""
        if self.cuda:
            total = torch.cuda.get_device_properties(self.torch).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, nbytes / total), self.torch)

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.torch)

    def peak_bytes(self) -> int | None:
        return int(torch.cuda.max_memory_allocated(self.torch)) if self.cuda else None

    def outside_allocator_bytes(self) -> int | None:
        """GPU memory in use that torch's caching allocator does not hold: the CUDA context with
        its loaded kernels, NCCL's buffers, and any other process's use of this GPU (None on
        the CPU). Eager kernel loading (`aptmoe-run --kernel-loading eager`) shows here."""
        if not self.cuda:
            return None
        free, total = torch.cuda.mem_get_info(self.torch)
        return int(total - free - torch.cuda.memory_reserved(self.torch))
