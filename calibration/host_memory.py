"""Host memory bandwidth shared by the CPU's work and the links' copies (`host_memory`).

A GPU's copy engine reads (h2d) or writes (d2h) host memory at the link's rate, and the
CPU's own work streams the same memory: an expert's forward on a few tokens reads all of
its weights once (MoE-M: 134 MB), an Adam chunk reads four and writes three of its
parameters' buffers. On the H200 host a CPU expert on one token ran 2.0-2.4 ms inside a
run, beside the layer's loads, against 1.2 ms calibrated alone (docs/validation-h200-hostcores):
the two together stream no more than the memory gives.

This measures that sharing: a read-bound CPU stream (an MoE-M expert's forward on one token
over a pool of experts larger than any cache, as the executor's CPU worker runs it) alone,
and again while the GPU copies back to back in one direction and in both at once, with the
copies' own rate. The sum of the two rates under one direction's copies is the profile's
`GBps`; the stream's rate at each copy rate is its `beside` curve: the simulator gives the
copies their link rate and the CPU work what the curve says (sim/host_memory.py).
Then Adam chunks (the executor's BlockAdam) back to back, alone and beside each condition's
copies, timing both: the copies' own rate is the profile's `copies_beside_adam`; Adam's time
stays in the sources, a check of how the simulator compounds its slowdowns beside copies and
beside other ranks' Adam (sim/host_memory.py). First beside the rank's own Adam, then with
every other rank of the host updating at once too, each in its own process on its own share of
the cores, as the executor's ranks do at the end of a step: a 2-GPU run's loads fell from 52 to
40 GB/s beside the ranks' Adam, and to 23-25 beside it and the GPU's own offload, where one
rank's Adam left both directions at the link's rate (docs/validation-h200-2gpu-v12-fresh,
docs/measured/session30). The simulator caps a GPU's copies at these figures while that many
ranks update (sim/links.py).
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from aptmoe.calibration.background import Background
from aptmoe.exec.host_stream import POOL_BYTES, SAMPLES, MiB, median_call
from aptmoe.exec.host_stream import expert_stream as _expert_stream

# The copies the CPU stream is timed beside: one direction at a time, then both at once (a
# rank loading the next block while it offloads the last one's gradients)
CONDITIONS = {"h2d": ("h2d",), "d2h": ("d2h",), "duplex": ("h2d", "d2h")}
COPY_BYTES = 256 * MiB          # one copy of the copy loop
ADAM_CHUNK = 4 << 20            # parameters of one chunk (the executor's chunk size)


@dataclass
class HostMemoryResult:
    threads: int
    cpu_alone_GBps: float
    cpu_under_GBps: dict[str, float] = field(default_factory=dict)      # h2d, d2h -> CPU stream rate
    copy_under_GBps: dict[str, float] = field(default_factory=dict)     # h2d, d2h -> the copies' rate
    # ranks updating at once -> "alone" (no copies) or a condition (h2d, d2h, duplex) -> this
    # rank's Adam chunk, ns per parameter
    adam_ns: dict[int, dict[str, float]] = field(default_factory=dict)
    # ranks updating at once -> condition (h2d, d2h, duplex) -> each direction's copies' GB/s
    # while Adam chunks run back to back on every one of those ranks
    copy_beside_adam_GBps: dict[int, dict[str, dict[str, float]]] = field(default_factory=dict)

    def copies_beside_adam(self) -> dict[int, dict[str, float]]:
        """The profile's figures (HostMemory.copies_beside_adam), by ranks updating: one
        direction's copies alone beside Adam, and each direction's with both busy
        ("duplex_h2d", "duplex_d2h")."""
        out: dict[int, dict[str, float]] = {}
        for ranks, conditions in self.copy_beside_adam_GBps.items():
            for condition, rates in conditions.items():
                for direction, rate in rates.items():
                    out.setdefault(ranks, {})[direction if condition != "duplex" else f"duplex_{direction}"] = rate
        return out

    @property
    def total_GBps(self) -> float:
        """CPU stream plus one direction's copies with both busy: the median over h2d and d2h."""
        return statistics.median(self.cpu_under_GBps[d] + self.copy_under_GBps[d] for d in ("h2d", "d2h")
                                 if d in self.cpu_under_GBps)

    def beside(self) -> tuple[tuple[float, float], ...]:
        """(copies' rate, the CPU stream's rate beside them) per condition, copies rising."""
        return tuple(sorted((self.copy_under_GBps[c], self.cpu_under_GBps[c]) for c in self.cpu_under_GBps))


class CopyLoop(Background):
    """Copies in one direction back to back on their own stream, from a thread that only
    queues them and waits on a blocking event, as the executor's copy threads do: it holds
    no core while the copies run (a spinning wait would take one of the CPU stream's cores,
    and a parallel region waits for its slowest thread: Adam beside a spinning copy thread
    ran 8x slower on the H200). The thread runs on `cpus` where there are cores to spare."""

    def __init__(self, direction: str, gpu: int, cpus: list[int] | None = None) -> None:
        super().__init__(cpus)
        dev = torch.device("cuda", gpu)
        self.host = torch.empty(COPY_BYTES, dtype=torch.uint8, pin_memory=True).random_(1, 255)
        self.dev = torch.empty(COPY_BYTES, dtype=torch.uint8, device=dev).random_(1, 255)
        self.src, self.dst = (self.host, self.dev) if direction == "h2d" else (self.dev, self.host)
        self.stream = torch.cuda.Stream(dev)
        self.bytes = 0
        self.seconds = 0.0

    def run(self) -> None:
        done = torch.cuda.Event(blocking=True)
        with torch.cuda.stream(self.stream):
            while not self.stop.is_set():
                t = time.perf_counter()
                for _ in range(4):
                    self.dst.copy_(self.src, non_blocking=True)
                done.record(self.stream)
                done.synchronize()
                self.seconds += time.perf_counter() - t
                self.bytes += 4 * COPY_BYTES

    def started(self) -> None:
        self.bytes, self.seconds = 0, 0.0     # the copies are running: count from here

    @property
    def GBps(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds else 0.0


def as_executor_host(t: torch.Tensor) -> torch.Tensor:
    """`t` in the host memory the executor keeps parameters and gradients in: pinned where
    there is a GPU (exec/device.py `host_buffer`), pageable without one. The CPU's work is
    timed on such memory, which the kernel may back with other pages than pageable memory."""
    return t.pin_memory() if torch.cuda.is_available() and t.device.type == "cpu" else t


Host = Callable[[torch.Tensor], torch.Tensor]


def expert_stream(host: Host = as_executor_host) -> tuple[Callable[[], None], int]:
    """One token through the next expert of the pool (exec/host_stream.py; its weights come
    from memory, placed by `host`): the call and the bytes it reads."""
    return _expert_stream(host)


def adam_stream(host: Host = as_executor_host, chunk: int = ADAM_CHUNK,
                blocks: int | None = None) -> tuple[Callable[[], None], int]:
    """One Adam call on the next block of a pool of `blocks` blocks of `chunk` parameters,
    each with its own optimizer, as the executor's CPU worker updates (one call per chunk of
    a block, each block's state its own, the next one cold): the call and the parameters it
    updates. By default the pool is 768 MiB of parameters, gradients and moments. Tensors are
    placed by `host`."""
    from aptmoe.exec.block_adam import BlockAdam

    pool = []
    for _ in range(blocks or max(2, POOL_BYTES // (chunk * 16))):
        p = host(torch.randn(chunk)).requires_grad_()
        p.grad = host(torch.randn(chunk))
        adam = BlockAdam([p], lr=1e-4)
        adam.begin_step()
        adam.step_chunk(0, p.grad)           # makes the moments
        pool.append((adam, p.grad))
    at = [0]

    def call() -> None:
        adam, g = pool[at[0] % len(pool)]
        at[0] += 1
        adam.step_chunk(0, g)

    return call, chunk


def _adam_loop(cpus: list[int], ready, stop) -> None:
    """Another rank's update (a spawned process): Adam chunks back to back on its own cores
    until `stop` is set; `ready` hears once the first has run."""
    from aptmoe.calibration.profiler import pinned_threads

    with pinned_threads(cpus):
        adam, _ = adam_stream()
        adam()
        ready.put(len(cpus))
        while not stop.is_set():
            adam()


@contextlib.contextmanager
def ranks_updating(cores: Sequence[Sequence[int]]) -> Iterator[None]:
    """Adam running back to back in one process per entry of `cores` (another rank's worker
    cores each) for as long as the block runs; each has made its pool and run a chunk before
    the block starts."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    ready, stop = ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=_adam_loop, args=(list(c), ready, stop), daemon=True) for c in cores]
    for p in procs:
        p.start()
    try:
        for _ in procs:
            ready.get(timeout=300)
        yield
    finally:
        stop.set()
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()


def beside_copies(call: Callable[[], None], gpu: int,
                  cpus: list[int] | None) -> Iterator[tuple[str, float, dict[str, float]]]:
    """`call` timed (`median_call`) while the GPU copies back to back in each condition (their
    threads on `cpus`, if any): (condition, seconds a call, each direction's copies' GB/s)."""
    for condition, directions in CONDITIONS.items():
        with contextlib.ExitStack() as stack:
            loops = {d: stack.enter_context(CopyLoop(d, gpu, cpus)) for d in directions}
            seconds = median_call(call)
        yield condition, seconds, {d: loop.GBps for d, loop in loops.items()}


def measure_host_memory(threads: int, gpu: int, spare: list[int] | None = None,
                        others: Sequence[Sequence[int]] = (), others_spare: list[int] | None = None) -> HostMemoryResult:
    """At `threads` torch threads (the caller binds them): the CPU stream alone and beside
    each direction's copies (their thread on the `spare` cores, if any), the Adam check, and the
    copies beside Adam: this rank's alone, then with another rank updating on each of `others`
    (the copies' threads then on `others_spare`)."""
    torch.set_num_threads(threads)
    expert, nbytes = expert_stream()
    res = HostMemoryResult(threads, cpu_alone_GBps=nbytes / median_call(expert) / 1e9)
    for condition, seconds, rates in beside_copies(expert, gpu, spare):
        res.cpu_under_GBps[condition] = nbytes / seconds / 1e9
        res.copy_under_GBps[condition] = sum(rates.values())
    del expert
    adam, params = adam_stream()

    def adam_beside_copies(ranks: int, copy_cpus: list[int] | None) -> None:
        # the copies' own rate while Adam runs, in each condition (a run's loads fell from 52
        # to 40 GB/s beside their rank's Adam, 24-26 beside it and an offload:
        # docs/validation-h200-2gpu-v12-fresh), and this rank's Adam beside them: the
        # simulator compounds Adam's slowdown beside other ranks' Adam and beside copies
        # (sim/host_memory.py), which these figures, ranks at once against one, check
        res.adam_ns[ranks] = {"alone": median_call(adam) / params * 1e9}
        res.copy_beside_adam_GBps[ranks] = {}
        for condition, seconds, rates in beside_copies(adam, gpu, copy_cpus):
            res.adam_ns[ranks][condition] = seconds / params * 1e9
            res.copy_beside_adam_GBps[ranks][condition] = rates

    adam_beside_copies(1, spare)
    if others:
        # every rank of the host at once, as at the end of a step: one rank's Adam left both
        # directions at the link's rate where the ranks' together did not
        with ranks_updating(others):
            adam_beside_copies(1 + len(others), others_spare)
    return res


def _by_ranks(table: dict[int, dict[str, float]], digits: int) -> str:
    """'1 rank updating: h2d 44.8, d2h 53.3; 2 ranks updating: ...' for the sources."""
    return "; ".join(f"{n} rank{'s' * (n > 1)} updating: " + ", ".join(f"{c} {v:.{digits}f}" for c, v in by.items())
                     for n, by in sorted(table.items()))


def host_memory_source(results: dict[int, HostMemoryResult]) -> str:
    """The profile's `sources` entry: how it was measured, and every figure behind the sums."""
    parts = []
    for t, r in sorted(results.items()):
        under = ", ".join(f"beside {d} copies {r.cpu_under_GBps[d]:.1f} + copies {r.copy_under_GBps[d]:.1f}"
                          for d in r.cpu_under_GBps)
        copies, adam = _by_ranks(r.copies_beside_adam(), 1), _by_ranks(r.adam_ns, 3)
        parts.append(f"{t}t: CPU alone {r.cpu_alone_GBps:.1f} GB/s, {under}; check: an Adam chunk (ns/param) "
                     f"alone and beside copies, {adam}"
                     + (f"; copies beside Adam (GB/s), {copies}" if copies else ""))
    return ("measured: a read-bound CPU stream (one token through an MoE-M expert, d 2048 h 8192 fp32, the "
            f"next of a {POOL_BYTES >> 20} MiB pool each call, pinned as the executor's parameters) alone and while one GPU copies {COPY_BYTES >> 20} "
            "MiB back to back in one direction and in both at once (each direction from a thread waiting on a "
            "blocking event, on the cores the stream leaves where it leaves any), threads bound as for "
            "cpu_expert; GBps = the CPU stream's rate plus the copies', both busy, the median over h2d and d2h; "
            f"beside = (copies, CPU stream) per condition; copies_beside_adam = the copies' rate while the "
            "executor's Adam chunks run back to back on this rank's threads, and with every other rank of the "
            "host updating too (a process each, on the next shares of the cores), by ranks updating; "
            f"median of {SAMPLES} calls: " + "; ".join(parts))
