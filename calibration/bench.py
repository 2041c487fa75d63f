"""Calibration run time: `python -m aptmoe.calibration.bench [--repeats N] [--full] [--write BENCHMARKS.md]`.

Times `aptmoe-calibrate --quick` (and, with --full, the full default run) on this machine,
each run a fresh process, median of N; with --write, the table replaces this machine's
calibration section of the file (one section per machine kind: GPU or CPU-only).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from aptmoe.benchmarking import machine_line, table_rows, time_command, write_section


def _has_gpu() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except ImportError:
        return False


def run(repeats: int, full: bool, extra: list[str]) -> tuple[str, str, str]:
    kind = "gpu" if _has_gpu() else "cpu"
    start, end = f"<!-- calibrate-bench-{kind}:start -->", f"<!-- calibrate-bench-{kind}:end -->"
    exe = [sys.executable, "-P", "-m", "aptmoe.calibration.cli"]
    modes = [("quick", ["--quick"])] + ([("full", [])] if full else [])
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="aptmoe-cal-bench-"))
    try:
        for mode, flags in modes:
            name = f"aptmoe-calibrate {' '.join(flags + extra)}".strip() + f" ({mode})"
            times = []
            for i in range(repeats):
                times.append(time_command(exe + flags + extra + ["-q", "--out", str(tmp / f"{mode}{i}.json")]))
                print(f"{name}: run {i + 1}: {times[-1]:.1f} s", file=sys.stderr)    # a partial record
            rows.append((name, times))
            print(f"{name}: median {statistics.median(times):.1f} s", file=sys.stderr)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    flag = " --full" if full else ""
    lines = [start, f"## Calibration run time ({'GPU machine' if kind == 'gpu' else 'CPU-only machine'})", "",
             f"Command: `python -m aptmoe.calibration.bench --repeats {repeats}{flag}` (each run a fresh process).",
             machine_line(), "", *table_rows(rows, {}), end]
    return "\n".join(lines) + "\n", start, end


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m aptmoe.calibration.bench", description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--full", action="store_true", help="also time the full default calibration")
    p.add_argument("--write", type=Path, default=None, help="update this machine kind's section of the file")
    p.add_argument("extra", nargs="*", help="extra aptmoe-calibrate flags (after --)")
    ns = p.parse_args(argv)
    section, start, end = run(ns.repeats, ns.full, ns.extra)
    print(section)
    if ns.write:
        write_section(ns.write, section, start, end)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
