"""What the thread that issues a GPU rank's blocks loses to the rank's other threads (`issue_tolls`).

In the one-H200 runs (docs/validation-h200-v4) a block issued beside a load took 1.5-2.6x
its time alone on MoE-S, 1.3x on MoE-M and 1.1x on MoE-L: the smaller the experts, the
more often the copy engine wakes (an MoE-S expert lands every 0.6 ms at 55 GB/s, an MoE-L
one every 8 ms). Every wake of a Python thread (a copy landing, a paced chunk, the CPU
worker's job) takes the GIL that the issuing thread drops around each kernel launch, and the
issuing thread then waits for it and for its own wake-up; the copies' DMA and the CPU
worker's memory stream also slow it without waking anything. `calibration/wake.py` showed
the size of it on the H200 host: 114-120 us a wake of a bare waker, whatever the switch
interval, and 1.13x / 1.27x beside DMA copies / a memory stream.

This times a launch-bound issuing loop (kernel launches of a few microseconds, the
executor's blocks on a small model) alone and beside the executor's own neighbours, placed
on a rank's cores as `--host-cores auto` places them (the issuing and copy threads on the
host cores, the CPU worker on the rest):

* DMA only: back-to-back 256 MiB h2d copies, a wake per 1 GiB -> `dma_factor`;
* a host-memory stream on the worker's cores -> `memory_factor`;
* a bare copy engine (a copy in flight behind the one landing; each lands: a blocking event
  wakes the thread, which takes a lock, notifies and launches the next through a `Link`) on
  natively fast copies of MoE-S's and MoE-M's expert size: per copy = (time beside - time
  alone x dma_factor) / copies landed, printed only: the executor's engine does more per copy
  (the policy, its lock, the block's views), and its toll, `copy_s`, is fitted from its own
  traces (calibration/dispatch.py, the loaded probe);
* the bare engine on a link capped to 8 GB/s: per 4 MiB chunk = (time beside - time alone -
  copies x its per-copy toll) / chunks -> `chunk_s` (the DMA's share at a seventh of the rate
  is left out). Until session 12 the link woke a thread per chunk; its pacing thread now wakes
  per landing, and what this finds per chunk is what capping adds per byte beyond that;
* the CPU worker running one-token MoE-M experts back to back (the executor's CPU expert:
  its weights streamed from memory): per job = (beside - alone x memory_factor) / jobs ->
  `cpu_job_s`;
* the CPU worker running the executor's Adam chunks back to back (one fused call per chunk of
  4 M parameters, each block's state its own: `host_memory.adam_stream`), the whole slowdown
  (its memory stream and its wakes), printed; `adam_factor` is the same neighbour's beside
  the executor's expert call (expert_neighbours, below) where that was measured. A bare memory
  stream gave 1.01 on the 2-GPU H200 where the S8 runs' calls took 1.3-1.6x beside the rank's
  Adam (docs/validation-h200-2gpu-v4); this loop 1.13x and 1.18x, the expert call 1.15-1.33x
  (session 19, docs/measured/h200x2-session19);
* d2h copies alone and d2h copies beside those Adam chunks at once, and the same for the bare
  copy engine capped to 8 GB/s, printed only: the S8 runs' expert recomputes took about 4x
  their time alone beside the rank's gradient offload and its Adam together on native links,
  1.3-1.4x on capped ones; the model multiplies dma_factor and adam_factor (on a capped link,
  its copy and chunk tolls and adam_factor), and this says by how much that falls short at
  each rate;
* GPU expert calls beside MoE-S CPU experts computing on the rank's worker cores, on the next
  rank's, and on both (calibration/expert_neighbours.py) -> `expert_factor`,
  `other_expert_factor`, `both_expert_factor`; and beside the rank's Adam chunks ->
  `adam_factor` (its native copies and its offload with Adam: printed);
* the executor's own block calls, in its own run, beside the rank's Adam and beside a native
  copy with the Adam (calibration/own_calls.py) -> `adam_factor` (in place of the expert
  call's) and `copy_adam_factor`: no loop here slows as much as those calls do.

The simulator slows the issuing thread by these at the rates its own copies and jobs run
(sim/issuing.py). The bare engine is timed at two copy sizes: were its toll per wake, both
would give the same figure.

    python -m aptmoe.calibration.issue_tolls [--ops 20000] [--rounds 7]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import threading
from collections import deque
from collections.abc import Callable

import torch
from aptmoe.calibration.host_memory import CopyLoop, adam_stream, expert_stream
from aptmoe.calibration.background import Background
from aptmoe.calibration.own_calls import measure_own_calls
from aptmoe.calibration.wake import MemoryStream, issue_loop, issue_round
from aptmoe.exec.cores import bind_this_thread, split_host_cores, start_worker_thread
from aptmoe.exec.device import Device
from aptmoe.exec.link import Link

from aptmoe.config import LINK_CHUNK_BYTES, auto_host_cores
from aptmoe.host import allowed_cores
from aptmoe.profile import IssueTolls

MiB = 1 << 20
COPY_MIB = (32, 128)        # an MoE-S and an MoE-M expert (fp32)
CAP_GBps = 8.0              # the paper's regime, as the matrix caps it


class _Neighbour(Background):
    """A thread beside the issuing loop that counts what it did (`count`: copies, jobs;
    `chunks` for a paced copy)."""

    def __init__(self, cpus: list[int] | None) -> None:
        super().__init__(cpus)
        self.count = 0
        self.chunks = 0


class _CopyEngine(_Neighbour):
    """exec/runtime.py `_copy_engine` without a policy: `k` copies of `nbytes` in flight; a
    blocking event per copy wakes the thread, which takes the lock, notifies and launches the
    next through a `Link` (paced in 4 MiB chunks when capped)."""

    def __init__(self, nbytes: int, cap_GBps: float | None, cpus: list[int] | None, k: int = 2) -> None:
        super().__init__(cpus)
        self.src = torch.empty(nbytes // 4).pin_memory().normal_()
        self.stream = torch.cuda.Stream()
        self.link = Link(cap_GBps, Device(f"cuda:{torch.cuda.current_device()}"))   # made by the thread that runs the probe
        self.cond = threading.Condition()
        self.k = k
        self.landed: dict[int, torch.Tensor] = {}
        self.chunks_per_copy = -(-nbytes // LINK_CHUNK_BYTES) if cap_GBps else 0

    def _launch(self):
        with torch.cuda.stream(self.stream):
            buf = torch.empty(self.src.shape, device="cuda")
        return buf, self.link.copy(buf, self.src, self.stream, mark_start=True)

    def run(self) -> None:
        launched: deque = deque()
        while not self.stop.is_set():
            while len(launched) < self.k:
                launched.append(self._launch())
            buf, landing = launched.popleft()
            self.link.wait(landing)
            with self.cond:                 # what the executor does when a copy lands
                self.count += 1
                self.chunks += self.chunks_per_copy
                self.landed[self.count % 4] = buf
                self.cond.notify_all()
        self.link.close()
        torch.cuda.synchronize()


class _Together(Background):
    """Several neighbours at once, each on its own thread and cores, started and stopped as one
    (a part that fails to start stops those started before it)."""

    def __init__(self, *parts: Background) -> None:
        super().__init__(None)
        self.parts = parts
        self._started = contextlib.ExitStack()

    def __enter__(self):
        with contextlib.ExitStack() as stack:
            for p in self.parts:
                stack.enter_context(p)
            self._started = stack.pop_all()
        return self

    def __exit__(self, *exc) -> None:
        self._started.__exit__(*exc)


class _CpuJobs(_Neighbour):
    """The CPU worker: one-token MoE-M experts back to back, weights streamed from memory,
    on its cores with as many torch threads (as the executor starts it)."""

    def __init__(self, job: Callable[[], None], cpus: list[int] | None) -> None:
        super().__init__(cpus)
        self.job = job

    def enter(self) -> None:
        if self.cpus:
            start_worker_thread(self.cpus)

    def run(self) -> None:
        while not self.stop.is_set():
            self.job()
            self.count += 1


def measure_issue_tolls(ops: int = 20000, rounds: int = 7, say: Callable[[str], None] = print) -> IssueTolls:
    """The tolls of a GPU rank laid out as `--host-cores auto` lays it out on this machine.

    Every condition is timed once per round, each beside its own alone run, and each toll is
    taken per round (against that round's DMA and memory factors) before the median: the
    host's speed drifts between rounds by as much as the tolls themselves."""
    if not torch.cuda.is_available():
        raise ValueError("issue tolls are a GPU rank's: no CUDA GPU here")
    from aptmoe.calibration.dispatch import measure_copy_toll

    cores = allowed_cores()
    per_rank = cores[:max(1, len(cores) // torch.cuda.device_count())]
    host, workers = split_host_cores(per_rank, auto_host_cores(len(per_rank), True)) if len(per_rank) > 1 \
        else (per_rank, [])
    before_threads = torch.get_num_threads()
    bind_this_thread(host or per_rank)
    cs = host or None
    job, _ = expert_stream()
    adam, _ = adam_stream()
    conditions: dict[str, Callable[[], Background]] = {
        "dma": lambda: CopyLoop("h2d", torch.cuda.current_device(), cs),
        "memory": lambda: MemoryStream(workers or None),
        **{f"copy{mib}": (lambda mib=mib: _CopyEngine(mib * MiB, None, cs)) for mib in COPY_MIB},
        "capped": lambda: _CopyEngine(COPY_MIB[0] * MiB, CAP_GBps, cs),
        "jobs": lambda: _CpuJobs(job, workers or None),
        "adam": lambda: _CpuJobs(adam, workers or None),
        "d2h": lambda: CopyLoop("d2h", torch.cuda.current_device(), cs),
        "d2h+adam": lambda: _Together(CopyLoop("d2h", torch.cuda.current_device(), cs),
                                      _CpuJobs(adam, workers or None)),
        "capped+adam": lambda: _Together(_CopyEngine(COPY_MIB[0] * MiB, CAP_GBps, cs),
                                         _CpuJobs(adam, workers or None)),
    }
    together = ("adam", "d2h", "d2h+adam", "capped", "capped+adam")     # each as its time alone's multiple
    got: dict[str, list[float]] = {k: [] for k in ("dma", "memory", "chunk", "job", *together,
                                                   *(f"copy{m}" for m in COPY_MIB))}
    rates: dict[str, list[float]] = {k: [] for k in conditions}
    try:
        x = torch.zeros(16, device="cuda")
        issue_loop(x, ops // 10)
        for _ in range(rounds):
            r = {k: issue_round(make, x, ops) for k, make in conditions.items()}
            for k, (a, b, n, c) in r.items():
                rates[k].append((c or n) / b)
            dma = r["dma"][1] / r["dma"][0]
            memory = r["memory"][1] / r["memory"][0]
            got["dma"].append(dma)
            got["memory"].append(memory)
            for mib in COPY_MIB:
                a, b, n, _ = r[f"copy{mib}"]
                got[f"copy{mib}"].append((b - a * dma) / max(n, 1))
            a, b, n, k = r["capped"]
            got["chunk"].append((b - a - n * got[f"copy{COPY_MIB[0]}"][-1]) / max(k, 1))
            a, b, n, _ = r["jobs"]
            got["job"].append((b - a * memory) / max(n, 1))
            for k in together:
                a, b, _, _ = r[k]
                got[k].append(b / a)
        med = {k: statistics.median(v) for k, v in got.items()}
        rate = {k: statistics.median(v) for k, v in rates.items()}
        say(f"issue tolls on cores {host or per_rank} (CPU worker on {workers or 'the same'}), medians of {rounds} "
            f"rounds: beside DMA {med['dma']:.2f}x, beside a memory stream {med['memory']:.2f}x")
        for mib in COPY_MIB:
            say(f"  a bare copy engine, {mib} MiB copies ({rate[f'copy{mib}']:.0f}/s): "
                f"{med[f'copy{mib}'] * 1e6:.0f} us a copy")
        say(f"  capped to {CAP_GBps:g} GB/s ({rate['capped']:.0f} chunks/s): {med['chunk'] * 1e6:.0f} us a chunk")
        say(f"  CPU expert jobs ({rate['jobs']:.0f}/s): {med['job'] * 1e6:.0f} us a job")
        say(f"  the executor's Adam chunks ({rate['adam']:.0f}/s): {med['adam']:.2f}x")
        say(f"  d2h copies: {med['d2h']:.2f}x; d2h copies and the Adam chunks at once: {med['d2h+adam']:.2f}x "
            f"(the model: dma x adam, {max(1.0, med['dma']) * max(1.0, med['adam']):.2f}x; printed only)")
        say(f"  copies capped to {CAP_GBps:g} GB/s: {med['capped']:.2f}x; those and the Adam chunks at once: "
            f"{med['capped+adam']:.2f}x (their product {med['capped'] * max(1.0, med['adam']):.2f}x; printed only)")
    finally:
        bind_this_thread(cores)
        torch.set_num_threads(before_threads)
    # The executor's own copy engine does more per copy than the bare one (the policy, its
    # lock, the block's views): its toll is read from its own trace.
    toll = measure_copy_toll()
    say(f"  the executor's copy engine ({toll.landings} copies landed over {toll.blocks} forward blocks of "
        f"GPipeOffload and Mobius): {toll.seconds * 1e6:.0f} us a copy, besides {toll.constant_s * 1e6:.0f} us "
        f"a block whatever landed")
    experts = measure_expert_factors(rounds, say)
    # Beside the Adam chunks the executor's own expert call (expert_neighbours) is the call the
    # model slows; it was slowed a little more than the launch loop, and noisily (session 19:
    # 1.15-1.33x over three runs against 1.13x and 1.18x; the runs' calls 1.3-1.6x): its figure
    # where it was measured, the loop's where not.
    experts.setdefault("adam_factor", max(1.0, med["adam"]))
    # The executor's own calls beside its Adam, and beside a native copy with it, took more
    # than any loop here (session 20: 1.3-1.6x and 2.4-3.9x in the S8 runs): their figures
    # from its own run where it has enough such calls, the loops' (and the product) where not.
    try:
        experts.update(measure_own_calls(say))
    except ValueError as e:
        say(f"  the executor's own calls: not measured ({e}); adam_factor from the loop, copy_adam_factor none")
    # A negative toll is noise around none: the model takes it as none.
    return IssueTolls(copy_s=toll.seconds, chunk_s=max(0.0, med["chunk"]), cpu_job_s=max(0.0, med["job"]),
                      dma_factor=max(1.0, med["dma"]), memory_factor=max(1.0, med["memory"]), **experts)


def measure_expert_factors(rounds: int, say: Callable[[str], None] = print) -> dict[str, float]:
    """The issuing loop's slowdown beside CPU experts on the rank's worker cores, another
    rank's, and both (calibration/expert_neighbours.py), as `IssueTolls` fields: those of the
    conditions this machine has cores for (none beside another rank on a machine of one rank's
    cores), each at least 1."""
    from aptmoe.calibration.expert_neighbours import Layout, measure

    lay = Layout.of_machine(max(1, torch.cuda.device_count()))
    if not lay.workers and not lay.other:
        say("  CPU experts beside the issuing loop: no cores for them here, not measured")
        return {}
    r = measure(lay, rounds=rounds)
    say("  " + r.report().replace("\n", "\n  "))
    names = {"own": "expert_factor", "other": "other_expert_factor", "both": "both_expert_factor",
             "adam": "adam_factor"}
    return {names[c]: max(1.0, x) for c, x in r.ratio.items() if c in names}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m aptmoe.calibration.issue_tolls", description=__doc__.splitlines()[0])
    p.add_argument("--ops", type=int, default=20000, help="launches per timed run of the issuing loop")
    p.add_argument("--rounds", type=int, default=7)
    ns = p.parse_args(argv)
    try:
        t = measure_issue_tolls(ns.ops, ns.rounds)
    except ValueError as e:
        print(f"issue_tolls: {e}", file=sys.stderr)
        return 2
    print(t)
    return 0


if __name__ == "__main__":
    sys.exit(main())
