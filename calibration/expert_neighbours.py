"""What CPU experts cost a GPU rank's issuing thread: in its own process, in another rank's, or both.

On nvidia-h200-x2 (docs/validation-h200-2gpu-v3) APTMoE's GPU expert forwards on a capped
link took 408-431 us of host time a call, against 157-219 for Mobius's, with no copy landing
while they were issued. They ran while the rank's CPU experts computed on its worker cores,
and, on two GPUs, while the other rank's did too; in one-GPU runs the gap was far smaller.
Two kinds of cause fit that, and they call for different fixes:

* something the issuing thread shares with its own process's CPU worker (the GIL, which
  every torch call drops and takes back; the CUDA driver's locks): then an expert computed
  in another process costs it nothing;
* something it shares with every core of the host (the cores' clock under a full socket of
  vector work, the last-level cache, memory bandwidth): then another rank's CPU experts cost
  it as much as its own.

This times an issuing loop of GPU expert forwards (`exec/model.expert_forward`, the call the
executor makes, on few tokens, so that the host and not the GPU sets its pace) on the rank's
first host core: alone, beside CPU experts computed back to back by a thread of this process
on the rank's worker cores (as the executor's CPU worker computes them), beside the same in
another process on the next rank's worker cores, beside both, and beside a thread that sends
a CPU job's outputs to the device back to back, from pageable memory (as the job does) and
from pinned memory. The rounds alternate the conditions; each ratio is taken against the
alone time of its own round.

    python -m aptmoe.calibration.expert_neighbours [--size S] [--tokens 256] [--rounds 5]

What it found on nvidia-h200-x2 (session 16, two leases, MoE-S): CPU experts cost the issuing
loop 1.13x and 1.39x in its own process, 1.12x and 1.42x in the other's, 1.22x and 1.50x in
both: as much from another process as from its own, so the host's shared parts, not the GIL.
Uploads back to back cost it 4.46x from pageable memory and 1.86x from pinned. None of it
makes the 2x of APTMoE's expert calls: one upload a job is too rare to matter (pinning it
changed nothing, A/B on one lease), and with the CPU experts' compute left out, or their
copies sent natively, APTMoE's expert calls stayed 1.5-2x Mobius's (docs/measured/h200x2-session16).

Since session 19 it also times the loop beside the rank's own work: native host-to-device
copies back to back on a thread of its host cores ('h2d', as the copy engine streams a
stage's weights), the executor's Adam chunks back to back on its worker cores ('adam', as the
CPU worker updates), and device-to-host copies with the Adam chunks at once ('d2h+adam', a
stage's gradient offload beside its update). The runs' calls took 1.5-1.9x their time alone
beside a native copy and 1.3-1.6x beside the rank's Adam (docs/validation-h200-2gpu-v4) where
the launch-bound loop of calibration/issue_tolls.py saw 1.09-1.16x and 1.13x; this loop makes
the executor's own call.

Prints, per condition, the issuing loop's microseconds a call and its ratio to alone, and
how many CPU experts (Adam chunks, uploads, GB/s of copies) a second each neighbour did.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from aptmoe.calibration.background import Background
from aptmoe.calibration.host_memory import CopyLoop, adam_stream
from aptmoe.exec.cores import bind_this_thread, split_host_cores, start_worker_thread
from aptmoe.exec.model import expert_forward

from aptmoe.config import auto_host_cores, moe_model
from aptmoe.flags import core_list, make_parser, whole_number
from aptmoe.host import allowed_cores

CONDITIONS = ("own", "other", "both", "pageable", "pinned", "h2d", "adam", "d2h+adam")
# the rank's own copies and Adam (session 19): the runs' calls took 1.5-1.9x their time alone
# beside a native copy and 1.3-1.6x beside the rank's Adam, where a launch-bound loop
# (calibration/issue_tolls.py) saw 1.09-1.16x and 1.13x; this loop makes the executor's call
OWN_WORK = ("h2d", "adam", "d2h+adam")

# The other rank: a process bound to its worker cores with as many torch threads, computing
# CPU experts (the executor's `expert_forward`) back to back while its stdin says "run" (and
# idle after "stop"); it exits when its stdin closes. It reports the experts it computed on
# stdout after each "stop".
_OTHER = """
import os, sys, threading, time, torch
from aptmoe.exec.model import expert_forward
cores = {cores!r}
os.sched_setaffinity(0, cores)
torch.set_num_threads(len(cores))
d, f, n = {d}, {f}, {tokens}
g = torch.Generator().manual_seed(1)
w1, w2 = torch.randn(f, d, generator=g) * 0.02, torch.randn(d, f, generator=g) * 0.02
x = torch.randn(n, d, generator=g)
go, done = threading.Event(), [0]
def control():
    for line in sys.stdin:
        if line.strip() == "run":
            done[0] = 0
            go.set()
        elif line.strip() == "stop":
            go.clear()
            time.sleep(0.02)
            print(done[0], flush=True)
    os._exit(0)
threading.Thread(target=control, daemon=True).start()
expert_forward(x, w1, w2, keep=True)
print("ready", flush=True)
while True:
    go.wait()
    expert_forward(x, w1, w2, keep=True)
    done[0] += 1
"""


@dataclass(frozen=True)
class Layout:
    """Where each party runs: the issuing thread's core, this rank's worker cores, the other
    rank's, and this rank's host cores (its issuing and copy threads)."""

    issue: int
    workers: tuple[int, ...]
    other: tuple[int, ...]
    host: tuple[int, ...] = ()

    @classmethod
    def of_machine(cls, gpus: int) -> Layout:
        """Two ranks laid out as the executor lays them out (`--host-cores auto`), one per GPU
        on an even share of the cores; on a one-GPU machine the other rank takes the cores
        beyond the first rank's share, as far as there are any."""
        cores = allowed_cores()
        share = max(1, len(cores) // max(1, gpus))
        mine, rest = cores[:share], cores[share:2 * share] if gpus > 1 else cores[share:]
        # (a rank too small for host cores of its own: the issuing thread on its first core)
        host, workers = split_host_cores(mine, max(1, auto_host_cores(len(mine), True))) if len(mine) > 1 \
            else (mine, [])
        _, other = split_host_cores(rest, auto_host_cores(len(rest), True)) if rest else ([], [])
        return cls(mine[0], tuple(workers), tuple(other), tuple(host))

    def check(self) -> None:
        allowed = set(allowed_cores())
        for name, cores in (("issuing", (self.issue,)), ("worker", self.workers), ("other rank's", self.other),
                            ("host", self.host)):
            bad = [c for c in cores if c not in allowed]
            if bad:
                raise ValueError(f"{name} core {bad[0]} is not one this process may run on")
        if not self.workers and not self.other:
            raise ValueError("no cores for CPU experts beside the issuing core: give --workers or --other")


@dataclass(frozen=True)
class NeighbourCost:
    device: str
    layout: Layout
    call_us: dict[str, float]                    # condition (and "alone") -> median us a call
    ratio: dict[str, float]                      # condition -> median over rounds of beside / alone
    experts_per_s: dict[str, dict[str, float]] = field(default_factory=dict)   # condition -> party -> rate

    def report(self) -> str:
        lay = self.layout
        lines = [f"issuing loop of GPU expert forwards on core {lay.issue} ({self.device}); CPU experts on "
                 f"cores {_span(lay.workers)} (this process) and {_span(lay.other)} (another):",
                 f"  alone:    {self.call_us['alone']:7.1f} us a call"]
        for c in self.ratio:
            rates = ", ".join(f"{who} {r:.0f}" + ("" if who.endswith("GB/s") else "/s")
                              for who, r in self.experts_per_s.get(c, {}).items())
            what = ("a job's outputs to the device" if c in ("pageable", "pinned") else
                    "the rank's own copies and Adam chunks" if c in OWN_WORK else "CPU experts")
            lines.append(f"  {c + ':':9s} {self.call_us[c]:7.1f} us a call, {self.ratio[c]:.2f}x alone"
                         f"  ({what}: {rates})")
        return "\n".join(lines)


def _span(cores: Sequence[int]) -> str:
    return f"{cores[0]}-{cores[-1]}" if len(cores) > 1 else str(cores[0]) if cores else "none"


class _OwnExperts(Background):
    """This process's CPU worker: experts back to back on its cores, with as many torch threads."""

    def __init__(self, cpus: Sequence[int], job: Callable[[], None]) -> None:
        super().__init__(cpus)
        self.job = job
        self.count = 0

    def enter(self) -> None:
        start_worker_thread(self.cpus)

    def started(self) -> None:
        self.count = 0

    def run(self) -> None:
        while not self.stop.is_set():
            self.job()
            self.count += 1


class _Uploads(Background):
    """What a CPU job does with its experts' outputs: one copy to the device on a stream of its
    own, from pageable memory (`torch.cat` of the outputs, as `RankRuntime._submit_cpu` sends
    them) or from pinned memory, waited for on a blocking event, back to back, from a thread
    on the worker cores."""

    def __init__(self, cpus: Sequence[int], src: torch.Tensor, device: torch.device) -> None:
        super().__init__(cpus)
        self.src, self.device = src, device
        self.count = 0

    def started(self) -> None:
        self.count = 0

    def run(self) -> None:
        torch.cuda.set_device(self.device)
        stream = torch.cuda.Stream(self.device)
        dst = torch.empty(self.src.shape, dtype=self.src.dtype, device=self.device)
        done = torch.cuda.Event(blocking=True)
        while not self.stop.is_set():
            with torch.cuda.stream(stream):
                dst.copy_(self.src, non_blocking=True)
                done.record(stream)
            done.synchronize()
            self.count += 1


class _OtherRank:
    """Another process computing CPU experts on `cores` between `run()` and `stop()` (which
    says how many); `close()` ends it."""

    def __init__(self, cores: Sequence[int], d: int, f: int, tokens: int) -> None:
        code = _OTHER.format(cores=list(cores), d=d, f=f, tokens=tokens)
        env = {**os.environ, "OMP_NUM_THREADS": str(len(cores))}
        # -P: the working directory stays off sys.path (in the repository root, its aptmoe/ would
        # stand in for the installed package, which maps exec/ into it)
        self.proc = subprocess.Popen([sys.executable, "-P", "-c", code], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        if self.proc.stdout.readline().strip() != "ready":
            why = (self.proc.stderr.read().strip().splitlines() or ["it exited"])[-1]
            self.close()
            raise RuntimeError(f"the other rank's process did not start: {why}")

    def run(self) -> None:
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()

    def stop(self) -> int:
        self.proc.stdin.write("stop\n")
        self.proc.stdin.flush()
        return int(self.proc.stdout.readline())

    def close(self) -> None:
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()
        self.proc.stderr.close()


def issue_calls(call: Callable[[], None], sync: Callable[[], None], calls: int) -> float:
    """Seconds a call of `calls` back-to-back calls, the device drained before and after."""
    sync()
    t = time.perf_counter()
    for _ in range(calls):
        call()
    sync()
    return (time.perf_counter() - t) / calls


def measure(layout: Layout, device: str = "cuda", size: str = "S", tokens: int = 256, gpu_tokens: int = 64,
            calls: int = 2000, rounds: int = 5, settle_s: float = 0.1) -> NeighbourCost:
    """The issuing loop alone and beside each condition, alternating, `rounds` times."""
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("the issuing loop issues GPU experts: no CUDA GPU here (--device cpu times it on the CPU)")
    layout.check()
    model = moe_model(size, 8)
    d, f = model.embedding_dim, model.hidden_dim
    g = torch.Generator().manual_seed(0)
    dev = torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else torch.device(device)
    w1, w2 = ((torch.randn(f, d, generator=g) * 0.02).to(dev), (torch.randn(d, f, generator=g) * 0.02).to(dev))
    hd = torch.randn(4 * gpu_tokens, d, generator=g).to(dev)
    idx = torch.randperm(4 * gpu_tokens, generator=g)[:gpu_tokens].to(dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def gpu_call() -> None:                  # `LayerRun.gpu_expert`: gather its tokens, then the expert
        expert_forward(hd[idx], w1, w2, keep=True)

    cw1, cw2 = torch.randn(f, d, generator=g) * 0.02, torch.randn(d, f, generator=g) * 0.02
    cx = torch.randn(tokens, d, generator=g)

    def cpu_job() -> None:
        expert_forward(cx, cw1, cw2, keep=True)

    out = torch.randn(tokens, d, generator=g)                 # a job's outputs, on their way back
    pinned = out.pin_memory() if dev.type == "cuda" else None
    conditions = [c for c in CONDITIONS if (c != "own" or layout.workers) and (c != "other" or layout.other)
                  and (c != "both" or (layout.workers and layout.other))
                  and (c not in ("pageable", "pinned", *OWN_WORK) or (dev.type == "cuda" and layout.workers))]
    adam = adam_stream()[0] if any(c in OWN_WORK for c in conditions) else None
    copies = list(layout.host) or [layout.issue]

    def neighbours(c: str) -> list[Background]:
        if c in ("own", "both"):
            return [_OwnExperts(layout.workers, cpu_job)]
        if c in ("pageable", "pinned"):
            return [_Uploads(layout.workers, out if c == "pageable" else pinned, dev)]
        if c == "h2d":
            return [CopyLoop("h2d", dev.index, copies)]
        if c == "adam":
            return [_OwnExperts(layout.workers, adam)]
        if c == "d2h+adam":
            return [CopyLoop("d2h", dev.index, copies), _OwnExperts(layout.workers, adam)]
        return []

    def rate_of(c: str, n: Background, took: float) -> tuple[str, float]:
        if isinstance(n, CopyLoop):
            return "copies GB/s", n.GBps
        who = "uploads" if c in ("pageable", "pinned") else "Adam chunks" if c in OWN_WORK else "this process"
        return who, n.count / took

    before_aff, before_threads = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None, \
        torch.get_num_threads()
    other = _OtherRank(layout.other, d, f, tokens) if layout.other else None
    alone: list[float] = []
    beside: dict[str, list[float]] = {c: [] for c in conditions}
    ratios: dict[str, list[float]] = {c: [] for c in conditions}
    rates: dict[str, dict[str, list[float]]] = {c: {} for c in conditions}
    try:
        bind_this_thread([layout.issue])
        torch.set_num_threads(1)
        issue_calls(gpu_call, sync, max(1, calls // 10))         # warm-up: kernels, allocator
        for _ in range(rounds):
            a = issue_calls(gpu_call, sync, calls)
            alone.append(a)
            for c in conditions:
                with contextlib.ExitStack() as stack:        # this process's neighbours stop however it ends
                    mine = neighbours(c)
                    for n in mine:
                        n.settle_s = 0.0                     # they settle together, beside the other rank's, below
                        stack.enter_context(n)
                    if c in ("other", "both"):
                        other.run()
                    time.sleep(settle_s)
                    for n in mine:
                        n.started()
                    t0 = time.perf_counter()
                    b = issue_calls(gpu_call, sync, calls)
                    took = time.perf_counter() - t0
                    for n in mine:
                        who, r = rate_of(c, n, took)
                        rates[c].setdefault(who, []).append(r)
                if c in ("other", "both"):
                    rates[c].setdefault("other", []).append(other.stop() / (took + settle_s))
                beside[c].append(b)
                ratios[c].append(b / a)
    finally:
        if other is not None:
            other.close()
        if before_aff is not None:
            bind_this_thread(sorted(before_aff))
        torch.set_num_threads(before_threads)
    med = statistics.median
    return NeighbourCost(device, layout, {"alone": med(alone) * 1e6, **{c: med(v) * 1e6 for c, v in beside.items()}},
                         {c: med(v) for c, v in ratios.items()},
                         {c: {who: med(r) for who, r in rs.items()} for c, rs in rates.items()})


def main(argv: list[str] | None = None) -> int:
    p = make_parser("python -m aptmoe.calibration.expert_neighbours", __doc__.splitlines()[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="where the issuing loop's experts run")
    p.add_argument("--size", choices=("S", "M", "L"), default="S", help="the experts' model size")
    p.add_argument("--tokens", type=whole_number("token"), default=256, help="tokens a CPU expert")
    p.add_argument("--gpu-tokens", dest="gpu_tokens", type=whole_number("token"), default=64,
                   help="tokens a GPU expert call (few: the host sets the pace)")
    p.add_argument("--calls", type=whole_number("call"), default=2000, help="calls a timing")
    p.add_argument("--rounds", type=whole_number("round"), default=5)
    p.add_argument("--issue", type=int, default=None, help="the issuing thread's core (default: a rank's first host core)")
    p.add_argument("--workers", type=core_list, default=None, help="this process's CPU-expert cores (default: the rank's)")
    p.add_argument("--other", type=core_list, default=None, help="the other process's cores (default: the next rank's)")
    ns = p.parse_args(argv)
    gpus = torch.cuda.device_count() if ns.device == "cuda" else 2
    lay = Layout.of_machine(max(1, gpus))
    lay = Layout(lay.issue if ns.issue is None else ns.issue,
                 lay.workers if ns.workers is None else tuple(ns.workers),
                 lay.other if ns.other is None else tuple(ns.other))
    t = time.monotonic()
    try:
        r = measure(lay, ns.device, ns.size, ns.tokens, ns.gpu_tokens, ns.calls, ns.rounds)
    except (ValueError, RuntimeError) as e:
        print(f"{p.prog}: error: {e}", file=sys.stderr)
        return 2
    print(r.report())
    print(f"({time.monotonic() - t:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
