"""Two matrices of the same configs side by side (`aptmoe-sim compare BEFORE AFTER`).

    aptmoe-sim compare docs/validation-h200 docs/validation-h200-v2 [--out compare.md]

For every run (cell and schedule) in both folders' `matrix.csv`: the measured step time
after / before, and the prediction error before and after. Prints the median ratio per
schedule and model size, over all matched runs, and each folder's median absolute error
over the matched runs. What changed between the two (the executor, a flag such as
`--host-cores`, the profile) is for the reader to say; GPipe, which has no CPU work and no
loads, is the control for the machine when the two were measured on different leases.

Then, per cell in both, one schedule's step time over another's (`--ratio`, APTMoE/Mobius),
measured and predicted, before and after: two schedules of one cell ran side by side in one
process on one lease, so their ratio survives a change of machine that the step times do not.
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
            err, pred = row.get("error"), row.get("predicted_s")
            out[(row["cell"], row["pipeline"])] = {"model": row.get("model", "?"), "measured_s": measured,
                                                   "predicted_s": float(pred) if pred else None,
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


def cell_ratios(before: dict, after: dict, num: str, den: str) -> list[dict]:
    """Per cell with both schedules in both matrices: num / den, measured and predicted."""
    def ratio(d: dict, cell: str, key: str) -> float | None:
        a, b = d[(cell, num)][key], d[(cell, den)][key]
        return a / b if a is not None and b else None

    cells = sorted({c for c, _ in before} & {c for c, _ in after}, key=lambda c: ("SML".find(c[0]), c))
    return [{"cell": c, **{f"{key[:-2]}_{name}": ratio(d, c, key) for name, d in (("before", before), ("after", after))
                           for key in ("measured_s", "predicted_s")}}
            for c in cells if all((c, s) in d for s in (num, den) for d in (before, after))]


def ratio_table(rows: list[dict], num: str, den: str, before: str, after: str) -> str:
    if not rows:
        return f"No cell has {num} and {den} in both."
    body = [[r["cell"], *(f"{r[k]:.3f}" if r[k] is not None else "-"
                          for k in ("measured_before", "measured_after", "predicted_before", "predicted_after"))]
            for r in rows]
    return "\n".join([f"{num} / {den} per cell, each side by side in one run (below 1: {num} faster)", "",
                      format_table(["cell", f"measured {before}", f"measured {after}", f"predicted {before}",
                                    f"predicted {after}"], body)])


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
    p.add_argument("--ratio", default="APTMoE/Mobius", metavar="A/B",
                   help="per cell, schedule A's step time over B's, both matrices (APTMoE/Mobius)")
    p.add_argument("--out", default=None, help="also write the report to this file")
    return p


def run_compare(ns) -> int:
    names = {p.value for p in Pipeline}
    num, _, den = ns.ratio.partition("/")
    if num not in names or den not in names or num == den:
        raise ValueError(f"--ratio {ns.ratio!r} is not A/B of two schedules ({', '.join(sorted(names))})")
    before, after = load_runs(Path(ns.before)), load_runs(Path(ns.after))
    text = report(compare(before, after), ns.before, ns.after)
    text += "\n" + ratio_table(cell_ratios(before, after, num, den), num, den, ns.before, ns.after) + "\n"
    print(text, end="")
    if ns.out:
        write_text_atomic(ns.out, text)
    return 0
