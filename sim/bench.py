"""Simulator speed benchmark: `python -m aptmoe.sim.bench [--repeats N] [--write BENCHMARKS.md]`.

Wall time (median of N runs, each in a fresh process so no cache carries over) to simulate
one training step of: MoE-S-16 and MoE-S-64 on 4 GPUs (MoE-S-16 also with an H200 profile,
whose block calls run on the host's clock); the widths of MoE-M-16 on 32 nodes x
8 GPUs (256 GPUs, with 256 layers so that every GPU holds a stage: a pipeline cannot spread
64 layers over 256 GPUs, and data parallelism is not modelled); and the whole Fig.-11 sweep
(6 models x 4 G x 4 schedules, `aptmoe-sim sweep --preset fig11`, 2 worker processes).
With --write, the table replaces the section between the sim-bench markers of the file.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from aptmoe.benchmarking import machine_line, table_rows, time_command, write_section

CASES = {
    "MoE-S-16, 4 GPUs, APTMoE, G=0.3, one step": [
        "--is_moe=True", "--model_config", "MoE-S-16", "--gini", "0.3", "--topo", "C1+G2", "--pipeline", "APTMoE"],
    # The H200 profiles have host costs: every block call runs on the issuing thread's clock,
    # held one block at a time (sim/engine.py `_issue`), where the rooflines hold a run at once.
    "MoE-S-16, 4 GPUs, APTMoE, G=0.3, one step, h200-4gpu (host clock)": [
        "--is_moe=True", "--model_config", "MoE-S-16", "--gini", "0.3", "--topo", "C1+G2", "--pipeline", "APTMoE",
        "--calibration", "h200-4gpu"],
    "MoE-S-64, 4 GPUs, APTMoE, G=0.15, one step": [
        "--is_moe=True", "--model_config", "MoE-S-64", "--gini", "0.15", "--topo", "C1+G2", "--pipeline", "APTMoE"],
    "MoE-M-16 widths, 256 layers, 32x8 GPUs, APTMoE, G=0.3, one step": [
        "--is_moe=True", "--model_config", "MoE-M-16", "--num_layers", "256", "--num_stages", "256",
        "--nodes", "32", "--gpus", "8", "--batch_size", "256", "--gini", "0.3", "--topo", "C1+G2",
        "--pipeline", "APTMoE"],
}
SWEEP = "Fig.-11 sweep: 6 models x 4 G x 4 schedules (96 points), --jobs 2"
TARGETS = {SWEEP: "< 60 s", "MoE-M-16 widths, 256 layers, 32x8 GPUs, APTMoE, G=0.3, one step": "< 30 s"}
MARK_START, MARK_END = "<!-- sim-bench:start -->", "<!-- sim-bench:end -->"


def run(repeats: int) -> str:
    exe = [sys.executable, "-P", "-m", "aptmoe.sim.cli"]
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="aptmoe-bench-"))
    try:
        for n, (name, args) in enumerate(CASES.items()):
            times = [time_command(exe + args + ["--measured-steps", "1", "--no-trace", "-q", "--out", str(tmp / f"case{n}-{i}")])
                     for i in range(repeats)]
            rows.append((name, times))
            print(f"{name}: median {statistics.median(times):.2f} s", file=sys.stderr)
        times = [time_command(exe + ["sweep", "--preset", "fig11", "--jobs", "2", "-q", "--out", str(tmp / f"sweep{i}")])
                 for i in range(repeats)]
        rows.append((SWEEP, times))
        print(f"{SWEEP}: median {statistics.median(times):.2f} s", file=sys.stderr)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    lines = [
        MARK_START,
        "## Simulator wall time",
        "",
        f"Command: `python -m aptmoe.sim.bench --repeats {repeats}` (each run a fresh `aptmoe-sim` process with "
        "`--no-trace`, start-up, plan building and the results files included).",
        machine_line(),
        "",
        *table_rows(rows, TARGETS),
    ]
    lines.append(MARK_END)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m aptmoe.sim.bench", description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--write", type=Path, default=None, help="update this markdown file's sim-bench section")
    ns = p.parse_args(argv)
    section = run(ns.repeats)
    print(section)
    if ns.write:
        write_section(ns.write, section, MARK_START, MARK_END)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
