"""Median time from one layer's attention call to the next layer's, per pass, measured against
predicted: how long a layer takes on the compute stream, whatever its calls and gaps.

    python docs/measured/offline-session22/periods.py CELL SCHEDULE

CELL is a matrix cell folder after `aptmoe-sim matrix --repredict` (its real/trace-X.json.xz
and trace-X-predicted.json). Session 22's reading, on the committed 2-GPU grids.
"""

from __future__ import annotations

import statistics
import sys
from collections import defaultdict
from pathlib import Path

from aptmoe.trace import Trace, is_action, is_block_call


def periods(path: Path, cat: str) -> list[float]:
    """Microseconds from each attention call of `cat` to the next one inside the same action."""
    events = Trace.load(path).events
    att = sorted((e for e in events if is_block_call(e) and e.stream == "compute" and e.cat == cat
                  and e.name.split(":")[1] == "a"), key=lambda e: e.start_s)
    by_rank = defaultdict(list)
    for e in att:
        by_rank[e.rank].append(e)
    out = []
    for a in (e for e in events if is_action(e) and e.stream == "compute" and e.cat in ("forward", "backward")):
        inside = [e for e in by_rank[a.rank] if a.start_s <= e.start_s <= a.end_s and e.name.startswith(f"{a.name}@")]
        out += [(y.start_s - x.start_s) * 1e6 for x, y in zip(inside, inside[1:])]
    return out


def main(argv: list[str]) -> int:
    cell, schedule = Path(argv[0]), argv[1]
    for cat in ("forward", "recompute", "backward"):
        real = periods(cell / "real" / f"trace-{schedule}.json", cat)      # Trace.load reads its .xz
        model = periods(cell / f"trace-{schedule}-predicted.json", cat)
        if real and model:
            print(f"{cat:9s}  real {statistics.median(real):6.0f} us  model {statistics.median(model):6.0f} us"
                  f"  ({len(real)} and {len(model)} layer periods)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
