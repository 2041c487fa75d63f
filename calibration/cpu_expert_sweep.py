"""CPU experts at dense token counts: as the calibration times them and as the executor runs them.

    python -m aptmoe.calibration.cpu_expert_sweep [--sizes S,M] [--tokens 1,2,4,...] [--threads 14]
        [--ranks 2] [--host-cores 2] [--reps 15] [--profile h200-2gpu] [--out sweep.json]

In the stored 2-GPU runs APTMoE's CPU experts took longer than the profile's curves: MoE-S
forwards of 16 to 63 tokens 1.2-1.4x, MoE-M backwards 1.32x at the median (v2 to v7-fresh,
5,230 jobs; calibration/cpu_vs_runs.py and docs/measured/session24). This times them several ways on the same pool, in fresh processes:

  main     the calibration's way (`measure_cpu_expert`): the main thread, torch's threads
           bound to the first `--threads` cores
  worker   the executor's way (a GPU rank): a CPU worker thread bound to rank 0's worker cores
           (its cores less `--host-cores`) with as many torch threads, the main thread at one
  pair     `worker` in each of `--ranks` processes at once, each on its rank's worker cores,
           as APTMoE's ranks run CPU experts side by side on one host

and three samples of each count: `fwd` (the next expert of a pool larger than the caches),
`bwd-warm` (right after an untimed forward of the same expert: the calibration before
2026-11-30) and `bwd` (the next expert, whose forward ran a pool ago, as in a step).
Prints, per size and count, the profile's figure and each arrangement's median, and writes
every median to `--out`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from aptmoe.atomic import write_json_atomic
from aptmoe.flags import number_list

ARRANGEMENTS = ("main", "worker", "pair")
SAMPLES = ("fwd", "bwd-warm", "bwd")
START_AFTER_S = 8.0       # the pair's processes have imported torch by then
TOKENS = (1, 2, 3, 4, 6, 8, 10, 12, 14, 16, 20, 24, 28, 32, 40, 48, 56, 64, 80, 96, 128)


def _sweep(size: str, tokens: list[int], reps: int, pool_mib: int) -> dict[str, dict[int, float]]:
    """{sample: {tokens: median seconds}} on this thread, with its torch threads as they are."""
    import torch

    from aptmoe.calibration.profiler import TORCH_DTYPES, ExpertPool, expert_samplers, model_dims
    from aptmoe.calibration.timing import Reps, host_sample, median_of

    d, h = model_dims(size)
    pool = ExpertPool(d, h, TORCH_DTYPES["fp32"], torch.device("cpu"), pool_bytes=pool_mib << 20)
    r = Reps(1, reps, reps, 0.0)
    out: dict[str, dict[int, float]] = {k: {} for k in SAMPLES}
    for n in tokens:
        cold = expert_samplers(pool, n, host_sample)
        warm = expert_samplers(pool, n, host_sample, warm_backward=True)
        out["fwd"][n] = median_of(cold["fwd"], r)
        out["bwd-warm"][n] = median_of(warm["bwd"], r)
        out["bwd"][n] = median_of(cold["bwd"], r)
    return out


def _child(ns) -> dict:
    from aptmoe.calibration.cpu_ranks import on_worker

    cores = [int(c) for c in ns.cores.split(",")]
    if ns.arrangement == "main":
        from aptmoe.calibration.profiler import pinned_threads
        with pinned_threads(cores):
            return {s: _sweep(s, ns.tokens, ns.reps, ns.pool_mib) for s in ns.sizes}
    return on_worker(cores, ns.host_cores, lambda: {s: _sweep(s, ns.tokens, ns.reps, ns.pool_mib) for s in ns.sizes},
                     ns.start_at)


def _rank_cores(rank: int, ranks: int) -> list[int]:
    from aptmoe.calibration.cpu_ranks import rank_cores
    from aptmoe.host import allowed_cores
    return rank_cores(rank, ranks, allowed_cores())


def _spawn(ns, arrangement: str, cores: list[int], start_at: float = 0.0) -> subprocess.Popen:
    args = [sys.executable, "-P", "-m", "aptmoe.calibration.cpu_expert_sweep", "--arrangement", arrangement,
            "--cores", ",".join(map(str, cores)), "--sizes", ",".join(ns.sizes),
            "--tokens", ",".join(map(str, ns.tokens)), "--reps", str(ns.reps), "--host-cores", str(ns.host_cores),
            "--pool-mib", str(ns.pool_mib),
            "--start-at", repr(start_at)]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _result(proc: subprocess.Popen, what: str) -> dict:
    out, err = proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"{what} failed: {(err.strip().splitlines() or ['?'])[-1]}")
    return json.loads(out.strip().splitlines()[-1])


def measure(ns) -> dict:
    per = _rank_cores(0, ns.ranks)
    threads = len(per) - ns.host_cores
    out = {"threads": threads, "ranks": ns.ranks, "host_cores": ns.host_cores, "tokens": ns.tokens, "reps": ns.reps}
    for arr in ns.arrangements:
        t0 = time.perf_counter()
        if arr == "main":
            res = [_result(_spawn(ns, "main", per[:threads]), "main")]
        elif arr == "worker":
            res = [_result(_spawn(ns, "worker", per), "worker")]
        else:
            start = time.time() + START_AFTER_S
            procs = [_spawn(ns, "worker", _rank_cores(r, ns.ranks), start) for r in range(ns.ranks)]
            res = [_result(p, f"pair rank {r}") for r, p in enumerate(procs)]
        out[arr] = res
        print(f"  {arr}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return out


def table(result: dict, profile: str | None) -> str:
    cost = None
    if profile:
        from aptmoe.config import moe_model
        from aptmoe.profile import ProfileCost, load_profile
        prof = load_profile(profile)
    lines = [f"{result['threads']} threads a rank, {result['ranks']} ranks, median of {result['reps']} per point, ms"]
    sizes = list(result[next(a for a in ARRANGEMENTS if a in result)][0])
    for size in sizes:
        if profile:
            cost = ProfileCost(prof, moe_model(size, 8, num_layers=1))
        cols = [("profile", None)] if cost else []
        cols += [(f"{a} {s}", (a, s)) for s in SAMPLES for a in ARRANGEMENTS if a in result]
        lines.append(f"MoE-{size}")
        lines.append("  tokens " + " ".join(f"{c[0]:>14}" for c in cols))
        for n in result["tokens"]:
            cells = []
            for name, key in cols:
                if key is None:
                    cells.append(f"{cost.cpu_expert_s(n, 'fwd', result['threads']) * 1e3:6.2f}/"
                                 f"{cost.cpu_expert_s(n, 'bwd', result['threads']) * 1e3:<7.2f}")
                    continue
                a, s = key
                v = statistics.median(r[size][s][str(n)] for r in result[a])
                cells.append(f"{v * 1e3:>14.2f}")
            lines.append(f"  {n:>6} " + " ".join(f"{c:>14}" for c in cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m aptmoe.calibration.cpu_expert_sweep",
                                description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=lambda s: s.split(","), default=["S", "M"])
    p.add_argument("--tokens", type=number_list(int, "tokens"), default=",".join(map(str, TOKENS)))
    p.add_argument("--ranks", type=int, default=2, help="ranks sharing the host: each gets 1/ranks of its cores")
    p.add_argument("--host-cores", type=int, default=2, help="of a rank's cores, kept for its host threads")
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--pool-mib", type=int, default=1024, help="experts cycled through (the calibration's 1024: "
                                                              "more than the caches)")
    p.add_argument("--arrangements", type=lambda s: s.split(","), default=list(ARRANGEMENTS))
    p.add_argument("--profile", default="h200-2gpu", help="whose curves to print beside ('' for none)")
    p.add_argument("--out", type=Path)
    p.add_argument("--arrangement", help=argparse.SUPPRESS)
    p.add_argument("--cores", help=argparse.SUPPRESS)
    p.add_argument("--start-at", type=float, default=0.0, help=argparse.SUPPRESS)
    ns = p.parse_args(argv)
    if ns.arrangement:
        print(json.dumps(_child(ns)))
        return 0
    if not set(ns.sizes) <= {"S", "M", "L"}:
        p.error(f"--sizes {','.join(ns.sizes)}: each must be S, M or L")
    bad = [a for a in ns.arrangements if a not in ARRANGEMENTS]
    if bad:
        p.error(f"--arrangements: {bad[0]!r} is not one of {', '.join(ARRANGEMENTS)}")
    if ns.reps < 1 or ns.pool_mib < 1:
        p.error("--reps and --pool-mib must be at least 1")
    if ns.ranks < 1 or not 0 <= ns.host_cores < len(_rank_cores(0, ns.ranks)):
        p.error(f"--host-cores {ns.host_cores} must leave each of --ranks {ns.ranks} a worker core")
    try:
        result = measure(ns)
    except RuntimeError as e:
        print(f"cpu_expert_sweep: {e}", file=sys.stderr)
        return 1
    if ns.out:
        write_json_atomic(ns.out, result, indent=1)
    print(table(result, ns.profile or None))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
