"""The same configs measured in several matrices: how far apart the measurements land, and the
least error any one prediction of them must make (`aptmoe-sim floor A B [C ...]`).

    aptmoe-sim floor docs/validation-h200-v22-fresh docs/validation-h200-v22-again [...] [--out floor.md]

A matrix measures a cell once: each schedule run `--repeats` times on one lease and the median
kept. Measured again, with the same run command and the same plans, the median lands elsewhere:
the machine's host speed moves from one minute and lease to the next (docs/validation-h200-v7).
A prediction is one figure per config, so whatever it is, it misses one of the lowest and highest
measurements m_lo, m_hi by at least (m_hi - m_lo) / (m_hi + m_lo): the figure 2 m_lo m_hi /
(m_lo + m_hi) is that far from both, and any other is farther from one. Where two measurements of
one cell order a pair of schedules opposite ways, each by more than the matrix's tie (sim/matrix.py
TIE), no prediction ranks the cell right in both. This reports both: the floor under the
worst-run target, and the cells whose ranking target no model can meet, from the measurements
alone (the predictions are not read for either).

Runs of a cell are the same work only where the cell's run command (`cell.json`, the planning
profile's name and the placements' replay aside: sim/cell_time.py `run_args`) and every
schedule's plan (`real/plan-<schedule>.txt`) agree; the work most of the folders did is the
cell's, and a folder whose cell differs is left out of it, and said so.
"""

from __future__ import annotations

import argparse
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path

from aptmoe.atomic import write_text_atomic
from aptmoe.config import Pipeline
from aptmoe.report import format_table
from aptmoe.sim.cell_time import run_args
from aptmoe.sim.matrix import TIE, same_plans
from aptmoe.sim.matrix_compare import load_runs

ORDER = [p.value for p in Pipeline]


def floor(measured: list[float]) -> float:
    """The least worst-case relative error of one figure against every one of `measured`."""
    if not measured or min(measured) <= 0:
        raise ValueError("a floor needs one or more positive step times")
    lo, hi = min(measured), max(measured)
    return (hi - lo) / (hi + lo)


def _work(folder: Path, cell: str) -> tuple[tuple[str, ...], dict[str, str]] | None:
    """A cell's run command as the run it makes (`cell_time.run_args`: the profile's name and the
    placements' replay aside), and each schedule's plan text; None where the folder does not hold
    the cell's command (a matrix of an older layout)."""
    try:
        command = run_args(json.loads((folder / "cells" / cell / "cell.json").read_text())["command"])
    except (OSError, ValueError, KeyError):
        return None
    plans = {}
    for name in ORDER:
        try:
            plans[name] = (folder / "cells" / cell / "real" / f"plan-{name}.txt").read_text()
        except OSError:
            pass
    return command, plans


@dataclass
class CellFloor:
    cell: str
    folders: list[str]                                   # the measurements kept, in the order given
    measured: dict[str, list[float]]                     # schedule -> step time per kept folder ({}: none)
    errors: dict[str, list[float]] = field(default_factory=dict)       # schedule -> stored error per folder
    opposite: list[tuple[str, str]] = field(default_factory=list)      # pairs ordered both ways past the tie
    left_out: list[str] = field(default_factory=list)    # folders whose cell is not the same work

    def floors(self) -> dict[str, float]:
        return {s: floor(v) for s, v in self.measured.items() if len(v) > 1}


def opposite_pairs(measured: dict[str, list[float]], groups: list[list[str]], tie: float = TIE) -> list[tuple[str, str]]:
    """The pairs of schedules that one measurement orders a < b and another b < a, each by more
    than `tie` of the faster (the matrix's ranking rule), pairs of one plan aside."""
    out = []
    for a, b in itertools.combinations([s for s in ORDER if s in measured], 2):
        if any(a in g and b in g for g in groups):
            continue
        ways = {x < y for x, y in zip(measured[a], measured[b]) if abs(x - y) > tie * min(x, y)}
        if len(ways) == 2:
            out.append((a, b))
    return out


def cell_floors(folders: list[Path], tie: float = TIE) -> list[CellFloor]:
    """Every cell measured in two or more of `folders`, as the same work."""
    if len(folders) < 2:
        raise ValueError("give two or more folders written by 'aptmoe-sim matrix' that measured the same cells")
    runs = [load_runs(f) for f in folders]
    cells = sorted({c for r in runs for c, _ in r}, key=lambda c: ("SML".find(c[0]), c))
    out = []
    for cell in cells:
        have = [i for i, r in enumerate(runs) if any(c == cell for c, _ in r)]
        if len(have) < 2:
            continue
        # the work most of them did (the first of it where as many did other work) is the cell's
        work = {i: _work(folders[i], cell) for i in have}
        alike = [[j for j in have if work[j] == work[i]] for i in have if work[i] is not None]
        kept = max(alike, key=len, default=[])
        left = [str(folders[i]) for i in have if i not in kept]
        names = [s for s in ORDER if all((cell, s) in runs[i] for i in kept)]
        if len(kept) < 2 or not names:
            out.append(CellFloor(cell, [], {}, left_out=[str(folders[i]) for i in have]))
            continue
        measured = {s: [runs[i][(cell, s)]["measured_s"] for i in kept] for s in names}
        errors = {s: [runs[i][(cell, s)]["error"] for i in kept] for s in names
                  if all(runs[i][(cell, s)]["error"] is not None for i in kept)}
        one_plan = same_plans(folders[kept[0]] / "cells" / cell / "real", names)
        out.append(CellFloor(cell, [str(folders[i]) for i in kept], measured, errors,
                             opposite_pairs(measured, one_plan, tie), left))
    if not any(c.measured for c in out):
        raise ValueError("the folders share no cell measured as the same work in two or more of them")
    return out


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def report(cells: list[CellFloor], tie: float = TIE) -> str:
    floors = [c for c in cells if c.measured]
    rows = []
    for c in floors:
        for s, v in c.measured.items():
            errs = c.errors.get(s)
            rows.append([c.cell, s, str(len(v)), " ".join(f"{x:.3f}" for x in v), f"{max(v) / min(v):.3f}",
                         _pct(floor(v)),
                         f"{_pct(min(map(abs, errs)))}-{_pct(max(map(abs, errs)))}" if errs else "-"])
    worst = max(((f, c.cell, s) for c in floors for s, f in c.floors().items()), default=None)
    contradicted = [c for c in floors if c.opposite]
    lines = ["The same cells measured more than once: step time (s) per measurement, in the order given; the "
             "highest over the lowest; the floor, the least error one prediction must make on one of them, "
             "(hi - lo) / (hi + lo); and the stored predictions' |error| over the same runs.", "",
             format_table(["cell", "schedule", "times", "measured s", "hi/lo", "floor", "stored |error|"], rows), ""]
    if worst:
        lines.append(f"Highest floor: {_pct(worst[0])} ({worst[1]} {worst[2]}): no prediction of it is within "
                     f"{_pct(worst[0])} of every measurement.")
    lines.append(f"Cells whose measurements order a pair of schedules both ways, each by more than {_pct(tie)}: "
                 f"{len(contradicted)} of {len(floors)}"
                 + "".join(f"\n- {c.cell}: " + ", ".join(f"{a} and {b}" for a, b in c.opposite)
                           + ": no prediction ranks this cell right in every measurement" for c in contradicted))
    for c in cells:
        if c.left_out:
            what = "left out, not the same run command or plans" if c.measured else \
                "measured more than once, never twice as the same work (run command and plans)"
            lines.append(f"{c.cell}: {what}: {', '.join(c.left_out)}")
    return "\n".join(lines) + "\n"


def make_floor_parser(prog: str) -> argparse.ArgumentParser:
    from aptmoe.flags import make_parser

    p = make_parser(f"{prog} floor", "The same configs measured in several matrices: how far apart they land, and "
                                     "the least error any one prediction of them must make.")
    p.add_argument("folders", nargs="+", type=Path, help="folders written by 'aptmoe-sim matrix' (two or more)")
    p.add_argument("--tie", type=float, default=TIE,
                   help=f"a pair of schedules closer than this (relative) is a tie, as in the matrix's ranking ({TIE})")
    p.add_argument("--out", default=None, help="also write the report to this file")
    return p


def run_floor(ns) -> int:
    if not 0 <= ns.tie < 1:
        raise ValueError(f"--tie {ns.tie} is a fraction of a step time: from 0 up to 1")
    text = report(cell_floors(list(ns.folders), ns.tie), ns.tie)
    print(text, end="")
    if ns.out:
        write_text_atomic(ns.out, text)
    return 0
