"""A/B runs of the executor: one `aptmoe-run` command with and without some flags, the two arms
alternated (A B B A A B ...) so that a drift of the machine falls on both, each run its own
processes. Prints, per schedule and arm, the median step time over the runs' timed steps, the
CPU experts' seconds per step and their slowest job (from the runs' traces), and where the
ranks' threads could run, then B over A.

    python -m aptmoe.exec.ab --rounds 2 --b=--no-confine-threads --out runs/ab -- \\
        --is_moe=True --model_config=S --num_experts=16 --gini=0.3 --gpus 2 --pipeline APTMoE,Mobius

Each run keeps its folder under --out (A1, B1, B2, A2, ...); the table goes to the terminal and
to ab.md there.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

from aptmoe.stored import RESULTS, read_json
from aptmoe.trace import Trace, run_trace


def arm_order(rounds: int) -> list[str]:
    """A B, B A, A B, ...: each arm first in half of the rounds."""
    out: list[str] = []
    for r in range(rounds):
        out += ["A", "B"] if r % 2 == 0 else ["B", "A"]
    return out


def cpu_expert_seconds(trace: Path | None) -> tuple[float, float]:
    """(summed seconds, slowest job's seconds) of the trace's CPU-expert jobs, all ranks."""
    if trace is None or not trace.exists():
        return 0.0, 0.0
    durs = [e.dur_s for e in Trace.load(trace).events if e.cat == "cpu-expert"]
    return sum(durs), max(durs, default=0.0)


def run_summary(folder: Path) -> dict[str, dict]:
    """Per schedule of one run: its timed steps, CPU-expert seconds per step, slowest CPU-expert
    job, and the ranks' loose threads (aptmoe.exec.cores.thread_placement)."""
    doc = read_json(folder / RESULTS)
    out = {}
    for name, s in doc["schedules"].items():
        if s.get("oom") or not s.get("step_s"):
            continue
        total, worst = cpu_expert_seconds(run_trace(folder, name))
        out[name] = {"step_s": list(s["step_s"]), "cpu_expert_s": total / len(s["step_s"]), "worst_job_s": worst,
                     "loose": sum(t.get("loose", 0) for t in s.get("threads", []))}
    return out


def table(runs: dict[str, dict[str, dict]]) -> str:
    """runs: label (A1, B1, ...) -> run_summary. One row per schedule and arm, then B over A."""
    rows = ["| schedule | arm | runs | s/step (median of all timed steps) | runs' medians | CPU experts s/step | "
            "slowest CPU-expert job ms | loose threads |", "|---|---|---|---|---|---|---|---|"]
    scheds = sorted({s for r in runs.values() for s in r})
    ratios = []
    for s in scheds:
        med = {}
        for arm in ("A", "B"):
            mine = [r[s] for label, r in runs.items() if label.startswith(arm) and s in r]
            if not mine:
                continue
            med[arm] = statistics.median([x for m in mine for x in m["step_s"]])
            rows.append(f"| {s} | {arm} | {len(mine)} | {med[arm]:.3f} | "
                        + ", ".join(f"{statistics.median(m['step_s']):.3f}" for m in mine)
                        + f" | {statistics.median(m['cpu_expert_s'] for m in mine):.3f} | "
                        + f"{max(m['worst_job_s'] for m in mine) * 1e3:.1f} | "
                        + ", ".join(str(m["loose"]) for m in mine) + " |")
        if len(med) == 2:
            # round i's two runs ran next to each other: their ratio is the A/B least touched
            # by the machine's drift, and the rounds' spread says how far to trust the pooled one
            rounds = [statistics.median(runs[f"B{i}"][s]["step_s"]) / statistics.median(runs[f"A{i}"][s]["step_s"])
                      for i in range(1, len(runs) + 1) if s in runs.get(f"A{i}", {}) and s in runs.get(f"B{i}", {})]
            ratios.append(f"{s}: B/A {med['B'] / med['A']:.3f} (rounds: {', '.join(f'{r:.3f}' for r in rounds)})")
    return "\n".join(rows + ["", "; ".join(ratios)])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m aptmoe.exec.ab", description=__doc__.split("\n\n")[0])
    p.add_argument("--a", default="",
                   help="flags of arm A, added to the command (none); as --a=FLAGS, since they start with --")
    p.add_argument("--b", required=True, help="flags of arm B, added to the command; as --b=FLAGS")
    p.add_argument("--rounds", type=int, default=2, help="runs of each arm (2)")
    p.add_argument("--out", required=True, help="folder for the runs and ab.md (must not hold them yet)")
    p.add_argument("run", nargs=argparse.REMAINDER, help="-- then the aptmoe-run flags both arms share")
    ns = p.parse_args(argv)
    run = ns.run[1:] if ns.run[:1] == ["--"] else ns.run
    if ns.rounds < 1:
        p.error("--rounds must be at least 1")
    out = Path(ns.out)
    if out.exists() and any(out.iterdir()):
        p.error(f"{out} is not empty: give a new --out")
    out.mkdir(parents=True, exist_ok=True)
    runs, seen = {}, {"A": 0, "B": 0}
    for arm in arm_order(ns.rounds):
        seen[arm] += 1
        label = f"{arm}{seen[arm]}"
        # -P: the package as installed, never a folder of the working directory that shares its name
        cmd = [sys.executable, "-P", "-m", "aptmoe.exec.cli", *run, *shlex.split(ns.a if arm == "A" else ns.b),
               "-q", "--no-plot", "--out", str(out / label)]
        print(f"{label}: {shlex.join(cmd)}", flush=True)
        if subprocess.run(cmd).returncode != 0:
            print(f"{label} failed; the table has the runs before it", file=sys.stderr)
            break
        runs[label] = run_summary(out / label)
        text = (f"A: `{ns.a or '(no flags)'}`; B: `{ns.b}`; shared: `{shlex.join(run)}`\n\n" + table(runs) + "\n")
        (out / "ab.md").write_text(text)         # after every run: a call cut short keeps the runs before
    print((out / "ab.md").read_text() if runs else "no run finished")
    return 0 if len(runs) == 2 * ns.rounds else 1


if __name__ == "__main__":
    sys.exit(main())
