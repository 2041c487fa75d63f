"""Two matrices of the same configs side by side (`aptmoe-sim compare BEFORE AFTER`).

    aptmoe-sim compare docs/validation-h200 docs/validation-h200-v2 [--out compare.md]

For every run (cell and schedule) in both folders' `matrix.csv`: the measured step time
after / before, and the prediction error before and after. Prints the median ratio per
schedule and model size, over all matched runs, and each folder's median absolute error
over the matched runs. What changed between the two (the executor, a flag such as
`--host-cores`, the profile) is for the reader to say; GPipe, which has no CPU work and no
loads, is the control for the machine when the two were measured on different leases.
"""

from __future__ import annotations

import argparse
import csv
import statistics
from collections import defaultdict
from pathlib import Path

from aptmoe.atomic import write_text_atomic
from aptmoe.config import Pipeline
from aptmoe.report import format_table


def load_runs(folder: Path) -> dict[tuple[str, str], dict]:
    """(cell, pipeline) -> its row of `matrix.csv` (measured_s and error as floats)."""
    path = Path(folder) / "matrix.csv"
    if not path.is_file():
        raise ValueError(f"{path} does not exist: give a folder written by 'aptmoe-sim matrix'")
    out = {}
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            try:
                measured = float(row["measured_s"])
            except (KeyError, ValueError):
                continue                      # a run that did not finish (OOM, failure): nothing to compare
            err = row.get("error")
            out[(row["cell"], row["pipeline"])] = {"model": row.get("model", "?"), "measured_s": measured,
                                                   "error": float(err) if err else None}
    if not out:
        raise ValueError(f"{path} holds no measured run")
    return out


def compare(before: dict, after: dict) -> dict:
    """Ratios after/before of the runs in both, grouped; errors of both on the same runs."""
    both = sorted(set(before) & set(after))
    if not both:
        raise ValueError("the two matrices share no run (cell and schedule): compare folders of the same configs")
    by = defaultdict(list)
    for k in both:
        r = after[k]["measured_s"] / before[k]["measured_s"]
        by[(k[1], before[k]["model"])].append(r)
        by[(k[1], "all")].append(r)
        by[("all", "all")].append(r)
    errs = {name: [abs(d[k]["error"]) for k in both if d[k]["error"] is not None]
            for name, d in (("before", before), ("after", after))}
    return {"runs": len(both), "only_before": sorted(set(before) - set(after)),
            "only_after": sorted(set(after) - set(before)),
            "ratio": {k: statistics.median(v) for k, v in by.items()},
            "median_abs_error": {k: statistics.median(v) if v else None for k, v in errs.items()}}


def report(c: dict, before: str, after: str) -> str:
    sizes = sorted({m for (_, m) in c["ratio"] if m != "all"})
    rows = []
    for s in (p.value for p in Pipeline):
        if (s, "all") in c["ratio"]:
            rows.append([s, *(f"{c['ratio'][(s, m)]:.3f}" if (s, m) in c["ratio"] else "-" for m in sizes),
                         f"{c['ratio'][(s, 'all')]:.3f}"])
    e = c["median_abs_error"]
    lines = [f"Measured step time, {after} / {before}: median per schedule and model size "
             f"({c['runs']} runs in both; all runs {c['ratio'][('all', 'all')]:.3f})", "",
             format_table(["schedule", *[f"MoE-{m}" for m in sizes], "all"], rows), "",
             "Median absolute step-time error on these runs: "
             + ", ".join(f"{name} {100 * v:.1f}%" if v is not None else f"{name} -" for name, v in
                         ((before, e["before"]), (after, e["after"])))]
    for label, keys in ((f"only in {before}", c["only_before"]), (f"only in {after}", c["only_after"])):
        if keys:
            lines.append(f"{label}: " + ", ".join(f"{cell} {p}" for cell, p in keys))
    return "\n".join(lines) + "\n"


def make_compare_parser(prog: str) -> argparse.ArgumentParser:
    from aptmoe.flags import make_parser

    p = make_parser(f"{prog} compare", "Two matrices of the same configs side by side: measured step time "
                                       "after/before per run, medians per schedule and model size.")
    p.add_argument("before", help="a folder written by 'aptmoe-sim matrix'")
    p.add_argument("after", help="another, of the same configs")
    p.add_argument("--out", default=None, help="also write the report to this file")
    return p


def run_compare(ns) -> int:
    text = report(compare(load_runs(Path(ns.before)), load_runs(Path(ns.after))), ns.before, ns.after)
    print(text, end="")
    if ns.out:
        write_text_atomic(ns.out, text)
    return 0
