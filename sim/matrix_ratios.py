"""Each schedule's step over GPipe's in the same cell, measured and predicted.

The host's speed moves from one lease to the next by more than the targets allow (MoE-S8's
GPipe step ran 0.20-0.32 s on one H200 from lease to lease, docs/fidelity.md), and it moves
every schedule of a cell alike: the cell's schedules run one after another on one lease,
minutes apart. Their step over GPipe's mostly cancels it, so the error of that ratio is the
model's: what the offloading schedules add to GPipe's work (loads, CPU Adam, CPU experts, and
the issuing thread's calls slowed beside them). A profile whose level is off moves every step
error of a cell one way and leaves these nearly alone; a missing cost of the offloading
schedules shows here whatever the lease.

`aptmoe-sim matrix` reports them per cell and, per schedule and model size, their median
(`over_gpipe` in matrix.json, a section of matrix.md).
"""

from __future__ import annotations

import statistics
from collections import defaultdict

from aptmoe.report import fmt, format_table

BASE = "GPipe"


def over_gpipe(configs: list[dict], models: dict[str, str]) -> list[dict]:
    """One row per cell and offloading schedule with both its and GPipe's step measured and
    predicted: {cell, set, model, pipeline, measured, predicted, error} (the ratios, and the
    predicted ratio over the measured one less 1). `models`: cell -> model size."""
    rows = []
    for c in configs:
        m, p = c["measured"], c["predicted"]
        if not (m.get(BASE) and p.get(BASE)):
            continue
        for name in m:
            if name == BASE or name not in p:
                continue
            rm, rp = m[name] / m[BASE], p[name] / p[BASE]
            rows.append({"cell": c["cell"], "set": c["set"], "model": models.get(c["cell"], "?"), "pipeline": name,
                         "measured": rm, "predicted": rp, "error": rp / rm - 1})
    return rows


def medians(rows: list[dict]) -> dict[str, dict[str, float]]:
    """pipeline -> model size -> the median error of the rows' ratios."""
    got: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        got[r["pipeline"]][r["model"]].append(r["error"])
    return {p: {m: statistics.median(v) for m, v in sorted(by.items(), key=lambda kv: "SML".find(kv[0]))}
            for p, by in sorted(got.items())}


def summary_line(rows: list[dict]) -> str | None:
    """One line for the terminal: the medians by schedule and model size (None without rows)."""
    if not rows:
        return None
    return "against GPipe in the same cell (predicted ratio over measured, median): " + "; ".join(
        f"{p} " + ", ".join(f"{m} {_pct(v)}" for m, v in by.items()) for p, by in medians(rows).items())


def lines(rows: list[dict]) -> list[str]:
    """The matrix.md section: the medians, then every row (nothing where no cell has GPipe)."""
    if not rows:
        return []
    meds = medians(rows)
    models = sorted({m for by in meds.values() for m in by}, key=lambda m: "SML".find(m))
    summary = format_table(["pipeline", *models],
                           [[p, *[_pct(by.get(m)) for m in models]] for p, by in meds.items()])
    table = format_table(["cell", "set", "pipeline", "measured", "predicted", "error"],
                         [[r["cell"], r["set"], r["pipeline"], fmt(r["measured"], ".3f"), fmt(r["predicted"], ".3f"),
                           _pct(r["error"])] for r in rows])
    return [f"## Against {BASE} in the same cell (a schedule's step over {BASE}'s, all sets)", "",
            (f"The schedules of a cell ran on one lease minutes apart, so the host's speed, which moves every "
             f"step of a cell alike, mostly cancels in these; their error (predicted ratio over measured, less 1) "
             f"is what the model makes of the offloading schedules' own costs. The median by schedule and model "
             f"size:"), "", "```", summary, "```", "", "```", table, "```", ""]


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:+.1f}%"
