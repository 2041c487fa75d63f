"""A profile's CPU expert curves against the executor's own CPU experts in measured runs.

    python -m aptmoe.calibration.cpu_vs_runs PROFILE FOLDER... [--json OUT]

Every CPU expert job of every measured run under the folders (a run folder: results.json, or the
results.json.xz a stored run keeps, with its traces; a matrix or any folder above: each run
below it) is set beside what the profile says one expert on that many tokens takes, in its
direction (a recompute's is a forward), at the run's thread count (its rank's worker cores).
Prints, per model width and direction and over all: the jobs, the median of run / profile, and
the mean |log(run / profile)| (0.10: about 10% off either way, job by job). A job in a run also
shares the host with copies, the other ranks and the issuing threads, which the simulator adds
on its own (host memory, tolls): a calibration that times experts as the runs run them comes out
near 1, one that times them faster than runs can comes out above it. Where the runs' events
carry their worker thread's clocks (exec/thread_clock.py), it prints too the median share of a
job's time the thread ran (`ran`) and waited for a core (`queued`): a job slower than the curve
that ran all along computed slower; one that did not, waited.

Session 24 judged the CPU expert calibrations with it (docs/measured/session24).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

from aptmoe.atomic import write_json_atomic
from aptmoe.config import ConfigError, RunConfig
from aptmoe.profile import ProfileCost, ProfileError, load_profile
from aptmoe.stored import RESULTS, plain_name, read_json, run_source, stored_file
from aptmoe.trace import Trace, TraceError, action_runs, is_cpu_job, run_trace


@dataclass(frozen=True)
class Fit:
    group: str               # "MoE d1024 fwd", ..., "all"
    jobs: int
    median_ratio: float      # run / profile
    mean_abs_log: float
    # of the jobs' time, the median share their worker thread ran and waited for a core
    # (exec/thread_clock.py; None for runs from before the executor kept them)
    ran: float | None = None
    queued: float | None = None


def run_folders(paths: list[Path]) -> list[Path]:
    """The measured runs (results.json, or the results.json.xz a stored run keeps, with source
    "real") at or under `paths`."""
    out = []
    for p in paths:
        folders = [p] if stored_file(p / RESULTS) else sorted({r.parent for r in p.rglob(RESULTS + "*")
                                                               if plain_name(r) == RESULTS and r.is_file()})
        out += [f for f in folders if run_source(f) == "real"]
    return out


def job_ratios(profile_path: str, runs: list[Path]) -> dict[str, list[float]]:
    """{group: [run / profile per CPU expert job]} over the runs' traces."""
    return _ratios(_jobs(profile_path, runs))


def _ratios(jobs: dict[str, list[tuple[float, dict]]]) -> dict[str, list[float]]:
    return {g: [r for r, _ in v] for g, v in jobs.items()}


def job_shares(profile_path: str, runs: list[Path]) -> dict[str, dict[str, list[float]]]:
    """{group: {"run_us": [...], "queued_us": [...]}}: each job's share of its time that its
    worker thread ran and waited for a core, over the jobs whose events carry them."""
    return _shares(_jobs(profile_path, runs))


def _shares(jobs: dict[str, list[tuple[float, dict]]]) -> dict[str, dict[str, list[float]]]:
    return {g: {k: [a[k] / a["dur_us"] for _, a in v if k in a and a["dur_us"] > 0] for k in ("run_us", "queued_us")}
            for g, v in jobs.items()}


def _jobs(profile_path: str, runs: list[Path]) -> dict[str, list[tuple[float, dict]]]:
    """{group: [(run / profile, the job's args with its duration as dur_us)]}."""
    profile = load_profile(profile_path)
    out: dict[str, list[tuple[float, dict]]] = defaultdict(list)
    for folder in runs:
        results = read_json(folder / RESULTS)
        cfg = RunConfig.from_dict(results["config"])
        cost = ProfileCost(profile, cfg.model)
        threads = cfg.cluster.worker_cores
        for name in results.get("schedules", {}):
            path = run_trace(folder, name)
            if path is None:
                continue
            trace = Trace.load(path)
            run_of = action_runs(trace)
            for e in trace.events:
                if not is_cpu_job(e) or e.dur_s <= 0:
                    continue
                direction = "bwd" if e.cat == "cpu-expert" and "B" in run_of(e)[0] else "fwd"
                predicted = cost.cpu_expert_s(int(e.args["tokens"]), direction, threads)
                if predicted > 0:
                    job = (e.dur_s / predicted, {**e.args, "dur_us": e.dur_s * 1e6})
                    out[f"MoE d{cfg.model.embedding_dim} {direction}"].append(job)
                    out["all"].append(job)
    return out


def fits(ratios: dict[str, list[float]], shares: dict[str, dict[str, list[float]]] | None = None) -> list[Fit]:
    def median(g: str, key: str) -> float | None:
        xs = (shares or {}).get(g, {}).get(key)
        return statistics.median(xs) if xs else None

    return [Fit(g, len(v), statistics.median(v), statistics.fmean(abs(math.log(x)) for x in v),
                median(g, "run_us"), median(g, "queued_us"))
            for g, v in sorted(ratios.items(), key=lambda kv: (kv[0] == "all", kv[0])) if v]


def table(rows: list[Fit]) -> str:
    def share(x: float | None) -> str:
        return f"{'-' if x is None else f'{x:.2f}':>8}"

    lines = [f"{'group':<16}{'jobs':>7}{'run/profile':>13}{'mean |log|':>12}{'ran':>8}{'queued':>8}"]
    lines += [f"{f.group:<16}{f.jobs:>7}{f.median_ratio:>13.2f}{f.mean_abs_log:>12.3f}{share(f.ran)}{share(f.queued)}"
              for f in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m aptmoe.calibration.cpu_vs_runs", description=__doc__.splitlines()[0])
    p.add_argument("profile", help="profile name or file")
    p.add_argument("folders", nargs="+", type=Path, help="run folders, or folders above them (a matrix)")
    p.add_argument("--json", type=Path, help="write the rows here too")
    ns = p.parse_args(argv)
    try:
        runs = run_folders(ns.folders)
        if not runs:
            raise ValueError(f"no measured run (results.json with source real) under {', '.join(map(str, ns.folders))}")
        jobs = _jobs(ns.profile, runs)
        rows = fits(_ratios(jobs), _shares(jobs))
        if not rows:
            raise ValueError(f"the {len(runs)} measured runs have no CPU expert job (APTMoE puts them there)")
    except (ValueError, OSError, KeyError, ConfigError, ProfileError, TraceError) as e:
        print(f"cpu_vs_runs: {e}", file=sys.stderr)
        return 1
    print(f"{len(runs)} runs; profile {ns.profile}")
    print(table(rows))
    if ns.json:
        write_json_atomic(ns.json, [asdict(f) for f in rows], indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
