"""The CPU worker's own time between one Adam chunk and the next (`cpu_job.adam_gap_s`).

Read from the executor's own traces (aptmoe/adam_gaps.py), by loading policy: the CPU-job
probe's APTMoE run for "aptmoe", whose `adam_done` weighs the Adam still owed with its cost
model after every chunk, and its Mobius run for "stage" (calibration/cpu_jobs.py; a full
calibration's cpujob part reads both from one run). The probe is 12 layers deep, a depth no
matrix cell has, so the figure stays apart from the runs it is judged on.

    python -m aptmoe.calibration.adam_gaps [--repeats 3] [--keep DIR] [--onto PROFILE --out FILE]
    python -m aptmoe.calibration.adam_gaps --from RUN [RUN ...] [--onto PROFILE --out FILE]

`--repeats` runs the probe that many times, each its own processes (the host moves between
runs); `--keep DIR` keeps each run as DIR/run-N (results.json and traces, xz), which `--from`
reads again; `--from` reads any stored `aptmoe-run` folders, each schedule's trace under its
policy. `--onto` puts each policy's median over the runs into a copy of PROFILE's `cpu_job`
(which it must have), keeping its other fields.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
from pathlib import Path

from aptmoe.adam_gaps import POLICY_OF, gaps_by_policy
from aptmoe.calibration.cpu_jobs import probe_traces
from aptmoe.calibration import merge
from aptmoe.flags import whole_number
from aptmoe.trace import run_traces

PROG = "python -m aptmoe.calibration.adam_gaps"


def probe_runs(repeats: int, keep: Path | None):
    """(label, {policy: gap}) of each run of the CPU-job probe."""
    for i in range(repeats):
        label = f"run-{i + 1}"
        yield label, gaps_by_policy(probe_traces(None if keep is None else keep / label), label)


def stored_runs(runs: list[Path]):
    """(label, {policy: gap}) of each stored run."""
    for run in runs:
        yield str(run), gaps_by_policy(run_traces(run, POLICY_OF), str(run))


def put_onto(profile: str, out: str, medians: dict[str, float], what: str, command: str) -> dict | None:
    """PROFILE with `medians` as its cpu_job.adam_gap_s (None after one line on stderr where
    PROFILE is bad or has no cpu_job)."""
    note = (f"adam_gap_s: the medians over {what} of the CPU worker's time between one block's Adam "
            "chunks (calibration/adam_gaps.py): " + ", ".join(f"{k} {v * 1e6:.1f} us" for k, v in medians.items()))

    def change(job: dict) -> None:
        job["adam_gap_s"] = {**job.get("adam_gap_s", {}), **medians}
    return merge.put_onto(PROG, profile, out, "cpu_job", change, note, command,
                          "the gaps in: calibrate its cpujob part first")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=whole_number("run"), default=None, help="runs of the CPU-job probe, each its "
                                                                             "own processes (1)")
    p.add_argument("--keep", type=Path, metavar="DIR", help="keep each probe run as DIR/run-N")
    p.add_argument("--from", dest="runs", nargs="+", type=Path, metavar="RUN", default=None,
                   help="stored aptmoe-run folders to read instead of running the probe")
    p.add_argument("--onto", metavar="PROFILE", help="with --out: put each policy's median into this profile's cpu_job")
    p.add_argument("--out", metavar="FILE", help="where --onto writes the profile")
    ns = p.parse_args(argv)
    if ns.runs is not None and (ns.repeats is not None or ns.keep is not None):
        p.error("--repeats and --keep run the probe; --from reads stored runs: give one or the other")
    if (ns.onto is None) != (ns.out is None):
        p.error("--onto and --out go together: the profile to put the gaps into and where to write it")
    command = f"{PROG} " + shlex.join(argv if argv is not None else sys.argv[1:])
    got: dict[str, list[float]] = {}
    try:
        runs = probe_runs(ns.repeats or 1, ns.keep) if ns.runs is None else stored_runs(ns.runs)
        for label, gaps in runs:
            print(f"{label}: " + ", ".join(f"{k} {v * 1e6:.1f} us" for k, v in gaps.items()), flush=True)
            for k, v in gaps.items():
                got.setdefault(k, []).append(v)
    except (ValueError, RuntimeError) as e:
        print(f"adam_gaps: error: {e}", file=sys.stderr)
        return 1
    medians = {k: statistics.median(v) for k, v in sorted(got.items())}
    for k, v in medians.items():
        print(f"{k}: median {v * 1e6:.1f} us over {len(got[k])} runs ({', '.join(f'{x * 1e6:.1f}' for x in got[k])})")
    if ns.onto is not None:
        what = (f"{ns.repeats or 1} runs of the CPU-job probe" if ns.runs is None else
                f"{len(ns.runs)} stored runs (" + ", ".join(map(str, ns.runs)) + ")")
        if put_onto(ns.onto, ns.out, medians, what, command) is None:
            return 2
        print(f"wrote {ns.out}: {ns.onto} with cpu_job.adam_gap_s " +
              ", ".join(f"{k} {v * 1e6:.1f} us" for k, v in medians.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
