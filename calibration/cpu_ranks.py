"""CPU experts timed as a GPU host's ranks run them: on each rank's CPU worker, every rank at once.

The executor computes a GPU rank's CPU experts on its CPU worker thread (exec/cpu_worker.py),
bound to the rank's cores less those its host threads keep, with as many torch threads, while
the main thread holds one. APTMoE's ranks compute their cold experts at about the same time,
and share the socket's memory. The calibration timed one process's main thread on the first
cores, alone. In the stored 2-GPU runs (v2 to v7-fresh, 5,230 CPU expert jobs) the experts took
1.09x those curves at the median, MoE-M's backwards 1.32x (calibration/cpu_vs_runs.py); the
sweep of session 24 (calibration/cpu_expert_sweep.py, docs/measured/session24) timed the ways
side by side on one lease, and every rank's worker at once came nearest to the runs: 1.08x at
the median, 1.02x for MoE-M, against 1.16x for the main thread's way.

`measure_cpu_expert` (calibration/profiler.py) calls `at_once` on a machine with GPUs for each
thread count a rank's share of the cores holds: one process per rank (the executor's layout:
rank r on the r-th share of the allowed cores, its worker on the last `threads` of them), the
series started together. A curve's point is the median over the ranks of the median over
`rounds` passes through the counts: the host's CPU speed drifts from one minute to the next
(in the calibration that made h200-2gpu's curves, the slowest of three passes at a point took
a median of 1.06-1.41x the fastest, and up to 2.67x, by size, thread count and rank), and
passes spread each point over the run's length.
"""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

READY = "ready"           # a rank's line once its pool and worker are made


def rank_cores(rank: int, ranks: int, allowed: Sequence[int]) -> list[int]:
    """Rank `rank`'s cores of `ranks` on one host: its even share, as the executor binds it
    (aptmoe.exec.cores.rank_share)."""
    from aptmoe.exec.cores import rank_share

    return rank_share(rank, len(allowed) // ranks, allowed)


def on_worker(cores: Sequence[int], host_cores: int, fn: Callable[[], Any], start_at: float = 0.0) -> Any:
    """`fn()` on a CPU worker as a GPU rank's runtime starts one: bound to `cores` less the first
    `host_cores`, with as many torch threads, this thread on those first cores at one torch
    thread; begun at `start_at` (time.time()) where given, so that ranks start together."""
    import torch

    from aptmoe.exec.cores import bind_this_thread, start_worker_thread
    from aptmoe.exec.cpu_worker import EXPERT, CpuWorker

    host, workers = list(cores[:host_cores]), list(cores[host_cores:])
    w = CpuWorker("calibration-cpu", on_start=lambda: start_worker_thread(workers))
    try:
        w.submit(EXPERT, lambda: None).result()
        if host:
            bind_this_thread(host)
        torch.set_num_threads(1)
        time.sleep(max(0.0, start_at - time.time()))
        return w.submit(EXPERT, fn).result()
    finally:
        w.close()


def rank_series(size: str, dtype: str, tokens: Sequence[int], reps: dict, limit_s: float | None,
                rounds: int, pool_bytes: int, begin: Callable[[], None] = lambda: None) -> dict:
    """{tokens, fwd, bwd, cut} on this thread: `rounds` passes over the counts (the first stops
    after a point whose fwd + bwd exceed `limit_s`), each with its share of `reps`; each point
    the median of the passes' medians. `begin()` runs once the pool is made, before any timing."""
    import torch

    from aptmoe.calibration.profiler import TORCH_DTYPES, ExpertPool, _series, expert_samplers, model_dims
    from aptmoe.calibration.timing import Reps, host_sample

    d, h = model_dims(size)
    pool = ExpertPool(d, h, TORCH_DTYPES[dtype], torch.device("cpu"), pool_bytes=pool_bytes)
    begin()
    r = Reps(**reps)
    share = Reps(r.warmup, max(1, math.ceil(r.reps / rounds)), max(1, math.ceil(r.min_reps / rounds)),
                 r.budget_s / rounds, r.warmup_s)
    done, first, cut = _series(pool, tokens, host_sample, share, limit_s, samplers=expert_samplers)
    again = Reps(share.warmup, share.reps, share.min_reps, share.budget_s)     # warm by now: no warm-up time
    passes = [first] + [_series(pool, done, host_sample, again, samplers=expert_samplers)[1]
                        for _ in range(rounds - 1)]
    return {"tokens": done, "cut": cut, "spread": spread(passes),
            **{k: [statistics.median(p[k][i] for p in passes) for i in range(len(done))] for k in ("fwd", "bwd")}}


def spread(passes: Sequence[dict]) -> dict[str, tuple[float, float]]:
    """{direction: (median, worst) over the counts of the slowest pass's median over the fastest's}."""
    out = {}
    for k in ("fwd", "bwd"):
        ratios = [max(v) / min(v) for v in zip(*(p[k] for p in passes)) if min(v) > 0]
        out[k] = (statistics.median(ratios), max(ratios)) if ratios else (1.0, 1.0)
    return out


def at_once(size: str, dtype: str, threads: int, ranks: int, allowed: Sequence[int], tokens: Sequence[int],
            reps: Any, limit_s: float | None, rounds: int, pool_bytes: int) -> tuple[list[int], dict, bool]:
    """(tokens, {fwd, bwd: seconds per count}, cut): every rank's worker on `threads` of its
    cores, all at once, each point the median over ranks. Ranks that stopped at different
    counts are cut to the shortest series."""
    per = len(allowed) // ranks
    if not 1 <= threads <= per:
        raise ValueError(f"{threads} threads do not fit a rank's {per} cores of {len(allowed)} shared by {ranks} ranks")
    job = {"size": size, "dtype": dtype, "tokens": list(tokens), "limit_s": limit_s, "rounds": rounds,
           "pool_bytes": pool_bytes, "reps": {k: getattr(reps, k) for k in ("warmup", "reps", "min_reps", "budget_s",
                                                                            "warmup_s")},
           "host_cores": per - threads}
    procs = [subprocess.Popen([sys.executable, "-P", "-m", "aptmoe.calibration.cpu_ranks",
                               json.dumps({**job, "cores": rank_cores(r, ranks, allowed)})],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(ranks)]
    # every rank has its pool and its worker before any starts timing: they start together
    ready = [p.stdout.readline().strip() == READY for p in procs]
    for p in procs:
        try:
            p.stdin.write("go\n")
            p.stdin.flush()
        except BrokenPipeError:          # it has ended: its error is read below
            pass
    results = []
    for r, (p, ok) in enumerate(zip(procs, ready)):
        out, err = p.communicate()
        if p.returncode or not ok:
            raise RuntimeError(f"CPU experts on rank {r}'s worker failed: {(err.strip().splitlines() or ['?'])[-1]}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    for r, x in enumerate(results):
        if rounds > 1:
            print(f"  {size} {dtype} {threads}t rank {r}: the slowest of {rounds} passes over the fastest, at a count: "
                  + ", ".join(f"{k} median {a:.2f} worst {b:.2f}" for k, (a, b) in x["spread"].items()),
                  file=sys.stderr, flush=True)
    n = min(len(x["tokens"]) for x in results)
    secs = {k: [statistics.median(x[k][i] for x in results) for i in range(n)] for k in ("fwd", "bwd")}
    return results[0]["tokens"][:n], secs, any(x["cut"] for x in results)


def main(argv: list[str] | None = None) -> int:
    """One rank's part of `at_once` (its job as JSON): prints its series as JSON."""
    job = json.loads((argv if argv is not None else sys.argv[1:])[0])

    def begin() -> None:                 # say so, and wait for every other rank to be ready too
        print(READY, flush=True)
        sys.stdin.readline()

    out = on_worker(job["cores"], job["host_cores"],
                    lambda: rank_series(job["size"], job["dtype"], job["tokens"], job["reps"], job["limit_s"],
                                        job["rounds"], job["pool_bytes"], begin))
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
