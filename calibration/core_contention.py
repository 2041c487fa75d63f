"""Which cores slow the issuing thread's core: a busy process on each other core in turn.

On nvidia-h200-x2 (docs/validation-h200-2gpu-v3) APTMoE's expert forwards on a capped link
took twice the host time of every other schedule's. They were issued while the rank's CPU experts
ran on its worker cores, and the recomputed forwards, with no CPU experts beside them, were
not slowed. The VM shows one thread per core, so it cannot say whether two of its vCPUs
are hyperthreads of one physical core at the hypervisor, or what else they share. This
measures it. It times a fixed pure-Python loop (`aptmoe.host.python_loop_s`, the reference
loop every run times) on one core, the victim (by default the first core, a rank's first
host core). The loop runs alone, then beside a busy process on each other core in turn, then
beside busy processes on all of them at once, as a rank's CPU worker keeps its cores busy.
The busy work is a single-threaded float matmul loop (what each of a CPU expert's OpenMP
threads does) or a pure-Python loop.

    python -m aptmoe.calibration.core_contention [--victim 0] [--cores 1-15] [--work matmul|python]

Prints, per busy core, the loop's time beside it over its time alone. A core well above 1
shares something with the victim that the scheduler cannot keep apart.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

from aptmoe.flags import core_list, make_parser
from aptmoe.host import allowed_cores, python_loop_s

# A busy process: bound to its core, one BLAS thread, says "ready" once it computes.
_BUSY = {
    "matmul": ("import os, sys, numpy as np\n"
               "os.sched_setaffinity(0, [{core}])\n"
               "a = np.random.default_rng(0).standard_normal((256, 256), dtype=np.float32)\n"
               "b = a @ a\n"
               "print('ready', flush=True)\n"
               "while True:\n"
               "    b = a @ b\n"
               "    b *= 1e-3\n"),
    "python": ("import os\n"
               "os.sched_setaffinity(0, [{core}])\n"
               "print('ready', flush=True)\n"
               "acc = 0\n"
               "while True:\n"
               "    for i in range(100000):\n"
               "        acc += i * i\n"
               "    acc = 0\n"),
}
ONE_THREAD = {k: "1" for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}


@dataclass(frozen=True)
class Contention:
    victim: int
    work: str
    alone_s: float                       # the loop alone (median of the rounds before and after)
    beside: dict[int, float]             # busy core -> loop time beside it / alone
    all_at_once: float | None            # beside every core of `beside` busy at once

    def slowing(self, above: float) -> list[int]:
        return [c for c, r in self.beside.items() if r >= above]


class Busy:
    """Busy processes on `cores` for the `with` block, gone when it ends, however it ends."""

    def __init__(self, cores: Sequence[int], work: str) -> None:
        self.cores, self.work, self.procs = list(cores), work, []

    def __enter__(self) -> Busy:
        env = {**os.environ, **ONE_THREAD}
        try:
            for c in self.cores:
                self.procs.append(subprocess.Popen([sys.executable, "-c", _BUSY[self.work].format(core=c)],
                                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
            for c, p in zip(self.cores, self.procs):
                if p.stdout.readline().strip() != "ready":
                    why = (p.stderr.read().strip().splitlines() or ["it exited"])[-1]
                    raise RuntimeError(f"the busy process on core {c} did not start: {why}")
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        for p in self.procs:
            p.kill()
        for p in self.procs:
            p.wait()
            p.stdout.close()
            p.stderr.close()


def measure(victim: int, cores: Sequence[int], work: str = "matmul", reps: int = 5,
            iterations: int | None = None) -> Contention:
    """The victim's loop alone and beside each of `cores` busy, then all of them at once.
    Binds the calling thread to `victim` for the measurement and gives it back its cores."""
    if work not in _BUSY:
        raise ValueError(f"--work must be one of {', '.join(_BUSY)}, not {work!r}")
    allowed = allowed_cores()
    bad = [c for c in (victim, *cores) if c not in allowed]
    if bad:
        raise ValueError(f"core {bad[0]} is not one this process may run on ({allowed[0]}-{allowed[-1]} here)")
    if victim in cores:
        raise ValueError(f"the victim core {victim} cannot also be a busy one")
    kw = {} if iterations is None else {"iterations": iterations}
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {victim})
    try:
        def loop() -> float:
            return python_loop_s(repeats=reps, **kw)

        alone = [loop()]
        beside = {}
        for c in cores:
            with Busy([c], work):
                beside[c] = loop()
        every = None
        if len(cores) > 1:
            with Busy(cores, work):
                every = loop()
        alone.append(loop())
    finally:
        os.sched_setaffinity(0, before)
    base = statistics.median(alone)
    return Contention(victim, work, base, {c: t / base for c, t in beside.items()},
                      None if every is None else every / base)


def report(r: Contention, above: float) -> str:
    lines = [f"core {r.victim}'s reference loop: {r.alone_s * 1e3:.2f} ms alone; beside a busy process "
             f"({r.work}) on each core, times its time alone:"]
    lines += [f"  core {c:>3}: {x:5.2f}x" + ("   <- slows it" if x >= above else "") for c, x in r.beside.items()]
    if r.all_at_once is not None:
        lines.append(f"  all {len(r.beside)} at once: {r.all_at_once:5.2f}x")
    slow = r.slowing(above)
    lines.append(f"cores at or above {above:g}x: {', '.join(map(str, slow)) if slow else 'none'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = make_parser("python -m aptmoe.calibration.core_contention", __doc__.splitlines()[0])
    p.add_argument("--victim", type=int, default=None, help="the core timed (default: the first this process may use)")
    p.add_argument("--cores", type=core_list, default=None,
                   help="busy cores, e.g. 1-15 or 1,3,5 (default: every other core this process may use)")
    p.add_argument("--work", choices=sorted(_BUSY), default="matmul", help="what the busy processes run")
    p.add_argument("--reps", type=int, default=5, help="loop runs per measurement (their median)")
    p.add_argument("--above", type=float, default=1.3, help="flag cores that slow the loop this much or more")
    ns = p.parse_args(argv)
    allowed = allowed_cores()
    victim = allowed[0] if ns.victim is None else ns.victim
    cores = [c for c in allowed if c != victim] if ns.cores is None else ns.cores
    if not cores:
        print(f"{p.prog}: error: no core to keep busy beside core {victim} (this process may use {allowed})",
              file=sys.stderr)
        return 2
    t = time.monotonic()
    try:
        r = measure(victim, cores, ns.work, ns.reps)
    except (ValueError, RuntimeError) as e:
        print(f"{p.prog}: error: {e}", file=sys.stderr)
        return 2
    print(report(r, ns.above))
    print(f"({time.monotonic() - t:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
