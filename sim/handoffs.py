"""The loading chain's hand-offs between the executor's threads, measured against predicted.

A stage's parameters come and go through three of a rank's threads (exec/runtime.py): the
offload thread copies the stage's gradients to the host and then drops the stage from the GPU
(`{s}DB`, after its offload `{s}O`); the load program opens the next stage's window (`{s}LB`,
`{s}LF`) once what it waits for is done; the copy engine launches the window's first copy. Each
acts when woken, and must get the GIL from the issuing thread first. The simulator lets each
act at once. This reads, per rank, how long each hand-off took:

* offload -> drop: from a stage's offload end to its drop marker;
* drop -> window: from a drop (`DB`, `DF`) to the first load window opened within 5 ms after it;
* window -> copy: from a window's marker to the first load that starts after it (within 50 ms).

On the native-link one-H200 runs of sessions 30-39 (docs/validation-h200-v10- to -v24-fresh)
GPipeOffload's took a median 0.41, 0.12 and 0.30 ms on MoE-S, 0.62, 0.13 and 0.37 ms on MoE-M,
none of them predicted: its backward waits for the next stage's load behind each drop, about
0.8-1.1 ms a stage (docs/measured/session40). On a capped link a load's event starts at a
marker the link's pacing thread records on the copy's stream (exec/link.py), so behind the copy
itself, run at the machine's rate, while the capped link counts its bytes from when it was
queued: there "window -> copy" (1.8-5.8 ms) is mostly that marker's place, not a late copy.

    python -m aptmoe.sim.handoffs PATH [PATH ...]

A PATH is a matrix folder (every cell), a matrix cell (real/ and the predicted traces beside it,
which `aptmoe-sim matrix --repredict` writes) or a run folder (its traces, measured only unless
trace-X-predicted.json lies beside them).
"""

from __future__ import annotations

import argparse
import bisect
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from aptmoe.report import format_table
from aptmoe.sim.phases import folders, load_trace, traces
from aptmoe.trace import Trace, TraceError, is_load

PROG = "python -m aptmoe.sim.handoffs"
HANDOFFS = ("offload -> drop", "drop -> window", "window -> copy")
AFTER_DROP_S = 0.005       # a window this soon after a drop is taken to have waited for it
WITHIN_S = 0.05            # a drop or copy later than this is not the hand-off's


def handoffs(trace: Trace) -> dict[str, list[float]]:
    """Seconds each hand-off took in `trace`, by hand-off (HANDOFFS), over its ranks."""
    markers: dict[int, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    windows: dict[int, list[float]] = defaultdict(list)
    drops: dict[int, list[float]] = defaultdict(list)
    loads: dict[int, list[float]] = defaultdict(list)
    offloads = []
    for e in trace.events:
        if e.cat == "marker":
            markers[e.rank][e.name].append(e.start_s)
            if e.stream == "load" and e.name.endswith(("LB", "LF")):
                windows[e.rank].append(e.start_s)
            elif e.name.endswith(("DB", "DF")):
                drops[e.rank].append(e.start_s)
        elif is_load(e):
            loads[e.rank].append(e.start_s)
        elif e.stream == "offload" and e.cat == "offload":
            offloads.append(e)
    for d in (windows, drops, loads, *markers.values()):
        for v in d.values():
            v.sort()
    out: dict[str, list[float]] = {h: [] for h in HANDOFFS}
    for o in offloads:
        took = _first_after(markers[o.rank].get(o.name.removesuffix("O") + "DB", []), o.end_s, WITHIN_S)
        if took is not None:
            out["offload -> drop"].append(took)
    for rank, ds in drops.items():
        for d in ds:
            took = _first_after(windows[rank], d, AFTER_DROP_S)
            if took is not None:
                out["drop -> window"].append(took)
    for rank, ws in windows.items():
        for w in ws:
            took = _first_after(loads[rank], w, WITHIN_S)
            if took is not None:
                out["window -> copy"].append(took)
    return out


def _first_after(times: list[float], t: float, within: float) -> float | None:
    """How long after `t` the first of the sorted `times` at or after it comes, if within `within`."""
    i = bisect.bisect_left(times, t)
    return times[i] - t if i < len(times) and times[i] - t <= within else None


def _us(values: list[float]) -> str:
    return f"{statistics.median(values) * 1e6:.0f}" if values else "-"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("paths", nargs="+", type=Path, help="matrix folders, matrix cells or run folders")
    ns = p.parse_args(argv)
    rows = []
    try:
        for folder in folders(ns.paths):
            home, found = traces(folder)
            if not found:
                raise TraceError(f"no measured trace (trace-*.json) in {folder}")
            for name, (real, pred) in found.items():
                m = handoffs(load_trace(real))
                if not any(m.values()):
                    continue                    # a resident schedule: nothing is loaded
                q = handoffs(load_trace(pred)) if pred is not None else None
                rows.append([home.name, name, *(x for h in HANDOFFS for x in (
                    f"{_us(m[h])} ({len(m[h])})", "-" if q is None else _us(q[h])))])
    except TraceError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    if not rows:
        print(f"{PROG}: error: no offload, drop or load window in the traces given", file=sys.stderr)
        return 2
    print("median us of each hand-off, measured (how many) and predicted: " + "; ".join(HANDOFFS) + "\n")
    print(format_table(["cell", "schedule", *(x for h in HANDOFFS for x in (h, "predicted"))], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
