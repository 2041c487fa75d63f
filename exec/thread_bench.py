"""Adam chunks and CPU experts as the calibration times them and as the executor runs them.

    python -m aptmoe.exec.thread_bench [--host-cores N|auto] [--size S] [--calls 200]

The calibration times CPU work on the main thread in a tight loop. The executor runs it on
its CPU worker thread (`exec/cpu_worker.py`), one job at a time, while the main thread waits.
Until 2026-11-29 the main thread of a GPU rank had made an OpenMP team of its own at start;
with two teams in the process, more OpenMP threads than cores, libgomp stops spinning between
parallel regions and each call pays the wake-up of the worker's threads: on the one-GPU H200
an Adam call cost 0.24-0.54 ms in the runs against 0.043 ms calibrated. This puts the
arrangements side by side, each in a fresh process (OpenMP's teams live as long as it):

  main       the calibration's way
  two-teams  the executor's way before: the main thread with a team of its own, the worker
             with every core
  worker     the executor's way now (a GPU rank): the main thread at one torch thread from
             the start, so no team of its own; the worker with every core
  host       --host-cores N: the worker on the cores the host threads leave

  issuing    the executor's way now, with the main thread busy as a GPU rank's compute thread
             is (Python between small device calls; it holds the GIL almost all the time), at
             each of --switch-us (sys.setswitchinterval): how long the worker waits for the GIL,
             and for the core it shares with the busy thread (an OpenMP region waits for its
             slowest thread)
  issuing-host  the same with --host-cores N: the busy thread on the first N cores, the
             worker on the others

Per arrangement: one chunk's Adam call on 8 K parameters (all call cost, as the executor makes
it: aptmoe.exec.block_adam), per parameter on 4 M-parameter chunks taken in turn from a pool
larger than the caches, and one expert's forward on a few tokens (MoE-`--size`, a different
expert of a 512 MiB pool each call).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import threading
import time

from aptmoe.flags import number_list

ARRANGEMENTS = ("main", "two-teams", "worker", "host", "issuing", "issuing-host")


def _measure(ns) -> dict[str, float]:
    import torch

    from aptmoe.calibration.timing import host_sample
    from aptmoe.exec.cores import split_host_cores
    from aptmoe.exec.cpu_expert_bench import expert_pool
    from aptmoe.exec.cpu_worker import EXPERT
    from aptmoe.host import allowed_cores
    from aptmoe.exec.model import expert_forward
    from aptmoe.exec.block_adam import BlockAdam
    from aptmoe.memory import ADAM_CHUNK_PARAMS

    cores = allowed_cores()
    # the main thread's OpenMP team: made by the calibration and by the executor before
    torch.set_num_threads(len(cores) if ns.arrangement in ("main", "two-teams") else 1)
    (torch.randn(1 << 22) * 2).sum()

    def adam(n: int):
        a = BlockAdam([torch.randn(n)], 1e-4)
        a.begin_step()
        grad = torch.randn(n)
        return lambda: a.step_chunk(0, grad)

    small = [adam(8192) for _ in range(64)]
    pool = ns.pool_mib << 20
    big = [adam(ADAM_CHUNK_PARAMS) for _ in range(max(2, pool // (16 * ADAM_CHUNK_PARAMS)))]
    model, experts = expert_pool(ns.size, pool)
    x = torch.randn(ns.tokens, model.embedding_dim)

    def timed(fn) -> float:
        return host_sample(fn)()

    def series() -> dict[str, float]:
        for step in small[:8] + big[:2]:
            step()
        call = statistics.median(timed(small[i % len(small)]) for i in range(ns.calls))
        per = statistics.median(timed(big[i % len(big)]) for i in range(2 * len(big))) / ADAM_CHUNK_PARAMS
        fwd = statistics.median(timed(lambda i=i: expert_forward(x, *experts[i % len(experts)].flat_views(),
                                                                   keep=True)) for i in range(ns.calls // 4))
        return {"adam_call_s": call, "adam_s_per_param": per, "expert_fwd_s": fwd,
                "threads": float(torch.get_num_threads())}

    if ns.arrangement == "main":
        return series()
    if ns.arrangement in ("issuing", "issuing-host"):
        sys.setswitchinterval(ns.switch_us * 1e-6)
        return _while_issuing(series, *split_host_cores(cores, ns.host_cores if ns.arrangement == "issuing-host"
                                                         else 0))
    host, workers = split_host_cores(cores, ns.host_cores if ns.arrangement == "host" else 0)
    with _worker(host, workers, own_team=ns.arrangement != "two-teams") as w:
        return w.submit(EXPERT, series).result()


@contextlib.contextmanager
def _worker(host: list[int], workers: list[int], own_team: bool = True):
    """A CPU worker as the executor starts one: bound to `workers` with as many torch threads,
    this thread then on `host` (where given) at one torch thread. `own_team=False`: as before
    1121e15, the worker unbound and this thread keeping its OpenMP team."""
    import torch

    from aptmoe.exec.cores import bind_this_thread, start_worker_thread
    from aptmoe.exec.cpu_worker import EXPERT, CpuWorker

    w = CpuWorker("bench-cpu", on_start=(lambda: start_worker_thread(workers)) if own_team else None)
    try:
        w.submit(EXPERT, lambda: None).result()
        if host:
            bind_this_thread(host)
        if own_team:
            torch.set_num_threads(1)
        yield w
    finally:
        w.close()


def _issue_loop(x, stop, loops: list[int]) -> None:
    """A GPU rank's compute thread, roughly: some Python (the plan's bookkeeping), then a few
    small device calls on `x` (each lets go of the GIL and takes it back)."""
    book: dict[int, int] = {}
    while not stop.is_set():
        for i in range(300):
            book[i & 63] = book.get(i & 63, 0) + i
        for _ in range(3):
            x.add_(1.0)
        loops[0] += 1


def _while_issuing(series, host: list[int], workers: list[int]) -> dict[str, float]:
    import torch

    from aptmoe.exec.cpu_worker import EXPERT

    with _worker(host, workers) as w:
        # made and used once before any timing: a CUDA context's start would count as issuing
        x = torch.zeros(16, device="cuda" if torch.cuda.is_available() else "cpu")
        _issue_loop_for(x, 0.1, [0])
        stop, loops = threading.Event(), [0]
        t = time.perf_counter()
        _issue_loop_for(x, 0.5, loops)
        alone = loops[0] / (time.perf_counter() - t)
        loops[0] = 0
        fut = w.submit(EXPERT, series)
        fut.add_done_callback(lambda _: stop.set())
        t = time.perf_counter()
        _issue_loop(x, stop, loops)
        busy = loops[0] / (time.perf_counter() - t)
        return {**fut.result(), "main_rate": busy / alone}


def _issue_loop_for(x, seconds: float, loops: list[int]) -> None:
    stop = threading.Event()
    threading.Timer(seconds, stop.set).start()
    _issue_loop(x, stop, loops)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m aptmoe.exec.thread_bench", description=__doc__.splitlines()[0])
    p.add_argument("--host-cores", default="auto", help="cores kept for the host threads in 'host' (auto: "
                                                        "aptmoe-run's rule for a GPU rank of this machine's cores)")
    p.add_argument("--size", choices=("S", "M", "L"), default="S")
    p.add_argument("--tokens", type=int, default=4)
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--pool-mib", type=int, default=512, help="Adam chunks and experts cycled through (beyond the caches)")
    p.add_argument("--switch-us", type=number_list(float, "microseconds"), default="5000,100",
                   help="GIL switch intervals for 'issuing', microseconds (Python's default is 5000)")
    p.add_argument("--arrangement", choices=ARRANGEMENTS, help=argparse.SUPPRESS)     # one child's part
    ns = p.parse_args(argv)
    from aptmoe.config import auto_host_cores
    from aptmoe.host import allowed_cores

    cores = len(allowed_cores())
    try:
        ns.host_cores = auto_host_cores(cores, True) if ns.host_cores == "auto" else int(ns.host_cores)
    except ValueError:
        p.error(f"--host-cores {ns.host_cores!r} is not a number or auto")
    if not 0 <= ns.host_cores < cores:
        p.error(f"--host-cores {ns.host_cores} must leave the worker a core of this machine's {cores}")
    switches = ns.switch_us
    if any(x <= 0 for x in switches):
        p.error("--switch-us: each interval must be above 0 microseconds")
    if ns.arrangement:
        ns.switch_us = switches[0] if switches else 5000.0
        print(json.dumps(_measure(ns)))
        return 0
    runs = [(arr, None) for arr in ARRANGEMENTS if not arr.startswith("issuing")] + \
        [(arr, us) for arr in ("issuing", "issuing-host") for us in switches]
    rows = []
    for arr, us in runs:
        if arr in ("host", "issuing-host") and not ns.host_cores:
            print(f"  {arr}: skipped (--host-cores resolves to 0 on {cores} cores)")
            continue
        out = subprocess.run([sys.executable, "-P", "-m", "aptmoe.exec.thread_bench", "--arrangement", arr,
                              "--host-cores", str(ns.host_cores), "--size", ns.size, "--tokens", str(ns.tokens),
                              "--calls", str(ns.calls), "--pool-mib", str(ns.pool_mib),
                              "--switch-us", str(us or 5000)],
                             capture_output=True, text=True, check=False)
        if out.returncode:
            print(f"  {arr}: failed: {(out.stderr.strip().splitlines() or ['?'])[-1]}", file=sys.stderr)
            return 1
        rows.append((arr if us is None else f"{arr} {us:g}", json.loads(out.stdout.strip().splitlines()[-1])))
    print(f"{cores} cores; --host-cores {ns.host_cores}; medians; MoE-{ns.size} expert forward on {ns.tokens} tokens;"
          f" 'issuing N': N us GIL switch interval, main = the issuing loop's rate against its rate alone")
    print(f"  {'arrangement':<19}{'threads':>8}{'adam call us':>14}{'adam ns/param':>15}{'expert fwd ms':>15}{'main':>7}")
    for arr, r in rows:
        main_rate = f"{r['main_rate']:.2f}" if "main_rate" in r else "-"
        print(f"  {arr:<19}{int(r['threads']):>8}{r['adam_call_s'] * 1e6:>14.1f}{r['adam_s_per_param'] * 1e9:>15.3f}"
              f"{r['expert_fwd_s'] * 1e3:>15.3f}{main_rate:>7}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
