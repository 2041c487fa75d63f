"""Calibration run time: `python -m aptmoe.calibration.bench [--repeats N] [--full] [--write BENCHMARKS.md]`.

Times `aptmoe-calibrate --quick` (and, with --full, the full run) on this machine, each run a
fresh process, median of N; with --write, the table replaces this machine's calibration section
of the file (one section per machine kind: GPU or CPU-only).

A full run on a GPU machine takes longer than one device call may run (10 minutes), so its
repeats are spread over calls: `--record FILE` appends each run to FILE (one JSON line per run,
with the machine and commit it ran on), and the table is the median of every recorded run of
each case. `--repeats 0 --record FILE --write BENCHMARKS.md` writes that table without running.
`--keep DIR` keeps each run's calibration file and log.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from aptmoe.benchmarking import machine_line, table_rows, time_command, write_section


@dataclass(frozen=True)
class Run:
    """One timed calibration: the case's name, wall seconds, and where and when it ran."""
    case: str
    seconds: float
    kind: str          # "gpu" or "cpu": the BENCHMARKS.md section it belongs to
    machine: str       # machine_line() of the machine that ran it, with its GPUs
    date: str
    bench: str         # the bench command that timed it


def _gpus() -> str:
    """'N x NAME' of this machine's GPUs, or '' without one (or without torch)."""
    try:
        import torch
    except ImportError:
        return ""
    if not torch.cuda.is_available():
        return ""
    return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"


def read_record(path: Path) -> list[Run]:
    """The runs recorded in `path` (none if it does not exist); ValueError naming the line
    that is not a run."""
    if not path.exists():
        return []
    runs = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            runs.append(Run(**json.loads(line)))
        except (ValueError, TypeError) as e:
            raise ValueError(f"{path}:{n} is not a recorded run ({e}); remove that line or the file") from None
    return runs


def _append(path: Path, run: Run) -> None:
    with path.open("a") as f:             # one whole line per run: a run cut short records nothing
        f.write(json.dumps(asdict(run)) + "\n")


def section(runs: list[Run], kind: str) -> tuple[str, str, str]:
    """The marked BENCHMARKS.md section of `kind` from `runs` (cases in first-run order)."""
    start, end = f"<!-- calibrate-bench-{kind}:start -->", f"<!-- calibrate-bench-{kind}:end -->"
    mine = [r for r in runs if r.kind == kind]
    if not mine:
        raise ValueError(f"no {kind} runs recorded; run the bench on a {kind.upper()} machine first")
    machines = list(dict.fromkeys(r.machine for r in mine))
    if len(machines) > 1:
        raise ValueError(f"the recorded {kind} runs come from {len(machines)} machines or commits "
                         f"({' / '.join(machines)}); keep one machine's runs in a record")
    cases = list(dict.fromkeys(r.case for r in mine))
    rows = [(c, [r.seconds for r in mine if r.case == c]) for c in cases]
    dates = sorted({r.date for r in mine})
    when = dates[0] if len(dates) == 1 else f"{dates[0]} to {dates[-1]}"
    title = "GPU machine" if kind == "gpu" else "CPU-only machine"
    benches = " and ".join(f"`{b}`" for b in dict.fromkeys(r.bench for r in mine))
    lines = [start, f"## Calibration run time ({title})", "",
             f"Command: {benches} (each run a fresh process).",
             f"{machines[0]} Runs dated {when}.", "", *table_rows(rows, {}), end]
    return "\n".join(lines) + "\n", start, end


def run(repeats: int, modes: list[str], extra: list[str], record: Path | None, keep: Path | None,
        bench: str) -> list[Run]:
    """Time `repeats` runs of each mode; each run is appended to `record` as it ends."""
    gpus = _gpus()
    kind = "gpu" if gpus else "cpu"
    machine = machine_line(with_date=False) + (f" GPUs: {gpus}." if gpus else "")
    exe = [sys.executable, "-P", "-m", "aptmoe.calibration.cli"]
    runs = read_record(record) if record else []
    tmp = Path(tempfile.mkdtemp(prefix="aptmoe-cal-bench-"))
    try:
        for mode in modes:
            flags = ["--quick"] if mode == "quick" else []
            name = f"aptmoe-calibrate {' '.join(flags + extra)}".strip() + f" ({mode})"
            for _ in range(repeats):
                i = sum(r.case == name for r in runs)
                out = (keep or tmp) / f"{mode}{i}.json"
                log = keep / f"{mode}{i}.log" if keep else None
                # With a log kept: no -q, so the log has a line per part as it ends (a run that a
                # device call's limit stopped left no part's time in session 20)
                quiet = [] if log else ["-q"]
                secs = time_command(exe + flags + extra + [*quiet, "--out", str(out)], log)
                runs.append(Run(name, round(secs, 2), kind, machine, datetime.date.today().isoformat(), bench))
                if record:
                    _append(record, runs[-1])
                print(f"{name}: run {i + 1}: {secs:.1f} s", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return runs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m aptmoe.calibration.bench", description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3, help="runs of each mode (3); 0 with --record: only the table")
    p.add_argument("--full", action="store_true", help="also time the full calibration")
    p.add_argument("--no-quick", dest="quick", action="store_false", help="do not time the quick calibration")
    p.add_argument("--record", type=Path, default=None, help="append each run to this JSON-lines file; "
                   "the table is the median of every run in it")
    p.add_argument("--keep", type=Path, default=None, help="keep each run's calibration file and log in this folder")
    p.add_argument("--kind", choices=("gpu", "cpu"), default=None,
                   help="with --repeats 0: which machine kind's runs to write (that of the last run)")
    p.add_argument("--write", type=Path, default=None, help="update this machine kind's section of the file")
    p.add_argument("extra", nargs="*", help="extra aptmoe-calibrate flags (after --)")
    ns = p.parse_args(argv)
    modes = (["quick"] if ns.quick else []) + (["full"] if ns.full else [])
    try:
        if ns.repeats < 0 or (ns.repeats == 0 and not ns.record):
            raise ValueError("--repeats must be at least 1 (or 0 with --record, to write its table)")
        if ns.repeats and not modes:
            raise ValueError("nothing to time: --no-quick needs --full")
        if ns.keep:
            ns.keep.mkdir(parents=True, exist_ok=True)
        bench = " ".join(["python -m aptmoe.calibration.bench", *(argv if argv is not None else sys.argv[1:])])
        runs = run(ns.repeats, modes, ns.extra, ns.record, ns.keep, bench)
        if not runs:
            raise ValueError(f"{ns.record} holds no runs; time some first (--repeats 1 or more)")
        kind = runs[-1].kind if ns.repeats else ns.kind or runs[-1].kind
        text, start, end = section(runs, kind)
    except (ValueError, subprocess.CalledProcessError) as e:
        print(f"calibration bench: {e}", file=sys.stderr)
        return 2
    print(text)
    if ns.write:
        write_section(ns.write, text, start, end)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
