"""The executor's benchmark: the seed's demo configuration and the paper's regime, all four
schedules side by side, written as a section of BENCHMARKS.md.

    python -m aptmoe.exec.bench --run --gpus 4 --keep runs/bench       # on the GPU machine
    python -m aptmoe.exec.bench --from demo=DIR/results.json --from regime4=... --write BENCHMARKS.md

`--run` launches `aptmoe-run` for each case (each schedule's step time is the median of its
timed steps, all schedules in one run); `--from` formats results already measured (how the
committed figures were made from `docs/measured/`). The section gives the command of every
case, its machine, the medians, and how far each target is.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

from aptmoe.benchmarking import write_section
from aptmoe.flags import whole_number
from aptmoe.stored import read_json

START, END = "<!-- exec-bench:start -->", "<!-- exec-bench:end -->"
SEED = ["--is_moe=True", "--model_config=S", "--num_experts=16", "--gini=0.3", "--topo=C1+G2", "--pipeline", "all"]
CASES = {
    "demo": ("the seed's demo configuration, native links", []),
    "regime": ("--gpu-memory 40 --link-bandwidth 8 (the paper's regime)", ["--gpu-memory", "40", "--link-bandwidth", "8"]),
}
ARTIFACT_BEST_S = 5.80          # the artifact on the same host: GPipeOffload 22.1 seq/s (issue 5, §11)


def run_case(name: str, gpus: int, keep: Path, steps: int, repeats: int = 1, calibration: str | None = None) -> Path:
    out = keep / f"{name}{gpus}"
    cmd = ["aptmoe-run", *SEED, "--gpus", str(gpus), "--num_warmup_steps", "1", "--num_training_steps", str(steps),
           "--no-plot", "-q", "--out", str(out), *CASES[name][1],
           *(["--repeats", str(repeats)] if repeats > 1 else []),
           *(["--calibration", calibration] if calibration else [])]
    subprocess.run(cmd, check=True)
    return out / "results.json"


def section(results: dict[str, Path]) -> str:
    lines = [START, "## Executor on the GPU machine", ""]
    for label, path in results.items():
        doc = read_json(path)
        sched = doc["schedules"]
        some = next((s for s in sched.values() if not s.get("oom")), {})
        runs = len((some.get("repeats") or {}).get("iteration_s", [])) or 1
        which = "one run" if runs == 1 else (f"the median run of {runs}, each in fresh processes, the schedules "
                                             "taking turns; every run's mean s/step after `runs:`")
        lines += [f"### {label}", "", "`" + " ".join(doc["command"]) + "`", "",
                  f"Device: {some.get('device', '?')} x {doc['config']['cluster']['gpus_per_node']}; "
                  f"{doc['created'][:10]}; each figure the median of the timed steps of {which} "
                  f"({len(some.get('step_s', []))} steps after 1 warm-up).", "",
                  "| schedule | s/step (median) | steps (s) | seq/s | peak GPU GB | busy compute / h2d / cpu | "
                  "CPU expert share | vs Mobius | vs artifact's best |", "|---|---|---|---|---|---|---|---|---|"]
        mob = sched.get("Mobius", {}).get("step_s")
        for name, s in sched.items():
            if s.get("oom"):
                lines.append(f"| {name} | refused or OOM | | | | | | | |")
                continue
            med = statistics.median(s["step_s"])
            m = s["metrics"]
            vs_m = f"{statistics.median(mob) / med:.2f}x" if mob else "-"
            reps = (s.get("repeats") or {}).get("iteration_s")
            steps = ", ".join(f"{x:.2f}" for x in s["step_s"]) + (
                f" (runs: {', '.join(f'{x:.2f}' for x in reps)})" if reps else "")
            lines.append(f"| {name} | {med:.3f} | {steps} | "
                         f"{doc['config']['train']['batch_size'] / med:.1f} | {s['peak_gpu_bytes'] / 1e9:.1f} | "
                         f"{m['busy/compute'] * 100:.0f}% / {m['busy/h2d'] * 100:.0f}% / {m['busy/cpu'] * 100:.0f}% | "
                         f"{m['cpu/expert_share'] * 100:.2f}% | {vs_m} | {ARTIFACT_BEST_S / med:.2f}x |")
        lines.append("")
    lines.append(END)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m aptmoe.exec.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--run", action="store_true", help="measure now (needs the GPUs)")
    p.add_argument("--gpus", default="4", help="comma-separated GPU counts for the regime case (4)")
    p.add_argument("--no-demo", dest="demo", action="store_false",
                   help="leave out the seed's demo (it needs 4 GPUs): the regime cases only")
    p.add_argument("--steps", type=int, default=3, help="timed steps per schedule (3)")
    p.add_argument("--repeats", type=whole_number("run"), default=1,
                   help="runs of each schedule, the median kept (aptmoe-run --repeats) (1)")
    p.add_argument("--calibration", default=None, metavar="PROFILE",
                   help="the profile APTMoE plans with (aptmoe-run --calibration; default: the built-in one of "
                        "this kind of machine), e.g. one calibrated on this lease just before")
    p.add_argument("--keep", default="runs/exec-bench", help="where --run leaves its output folders")
    p.add_argument("--from", dest="from_", action="append", default=[], metavar="LABEL=RESULTS_JSON",
                   help="format an earlier run instead")
    p.add_argument("--write", default=None, help="replace the executor section of this file (BENCHMARKS.md)")
    ns = p.parse_args(argv)
    results: dict[str, Path] = {}
    if ns.run:
        keep = Path(ns.keep)
        if ns.demo:
            results["seed demo, 4 GPUs, native"] = run_case("demo", 4, keep, ns.steps, ns.repeats, ns.calibration)
        for g in ns.gpus.split(","):
            results[f"paper regime, {g} GPUs"] = run_case("regime", int(g), keep, ns.steps, ns.repeats, ns.calibration)
    for item in ns.from_:
        label, _, path = item.partition("=")
        if not path:
            print(f"{p.prog}: error: --from {item!r} is not LABEL=RESULTS_JSON", file=sys.stderr)
            return 2
        results[label] = Path(path)
    if not results:
        print(f"{p.prog}: error: nothing to report: give --run or --from", file=sys.stderr)
        return 2
    text = section(results)
    print(text)
    if ns.write:
        write_section(Path(ns.write), text, START, END)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
