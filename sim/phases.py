"""Where a predicted step parts from the measured one: in the pipeline's compute or in the tail after it.

For each timed step and rank, the time from the step's start to the end of the rank's last
forward, backward or recompute on its issuing lane (the compute stream: "compute end"), to the
end of its last update (Adam: "step end"; the rank's last event where it has none), and the
tail between them, measured and predicted, and the prediction's differences, in ms; then per
cell and schedule the median differences over its steps and ranks. A tail that differs more
than the compute end points at the Adam updates and the CPU work that finish the step.

The summary also splits the compute phase, so that a compute end that differs says where:
the block calls themselves; the rest of the actions' time, between calls (the host's work
between them, waits for a load or a CPU expert) and in the gaps where a receive of the rank
ended (an action waiting for its input: a backward recomputes its stage first, then waits for
the next stage's gradient); and the time outside every action, of which the gaps between
two actions that a send or receive of the rank ended in (the executor's compute thread waits
there for its net thread to post the next receive; the simulator has no such wait).

    python -m aptmoe.sim.phases PATH [PATH ...] [--measured-only]

A PATH is a matrix cell (cells/<cell>: real/trace-X.json.xz against trace-X-predicted.json
beside real/, which `aptmoe-sim matrix --repredict` writes), a matrix folder (every cell below
it), or a run folder with trace-X.json, .json.gz or .json.xz (and trace-X-predicted.json beside
them).

Steps: both back-ends lay the timed steps end to end (the warm-up is not traced) and mark no
step, but every action (a stage's forward or backward of one micro-batch, `0F3`) runs once a
step on its rank, so its k-th run is step k, and a step starts with the first of its actions on
any rank (the executor's own lead before it, about 2 ms, is not counted). Where the run's
results.json gives fewer timed steps than the trace holds, the first ones are taken for warm-up.
"""

from __future__ import annotations

import argparse
import bisect
import statistics
import sys
import zlib
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from aptmoe.report import format_table
from aptmoe.stored import CORRUPT, RESULTS, read_json
from aptmoe.trace import PASS_CATEGORIES, Trace, TraceError, TraceEvent, is_action, is_block_call, message_ends

PROG = "python -m aptmoe.sim.phases"
PARTS = ("calls_s", "between_s", "input_wait_s", "outside_s", "message_gaps_s")     # the compute phase's parts
SPLIT = ("the block calls; the rest of the actions' time, between the calls (the host's work, waits for loads "
         "and CPU experts) and in the gaps a receive ended in (waits for the other stage's activations or gradient); "
         "the time outside every action, and of it the gaps between actions that a send or receive of the rank "
         "ended in")


@dataclass(frozen=True)
class Phases:
    """One rank's step, in seconds from the step's start."""
    step: int                    # counted from 0 over the timed steps
    rank: int
    compute_end_s: float         # its last forward, backward or recompute on the compute stream ends
    step_end_s: float            # its last update ends (its last event, where it has none)
    calls_s: float = 0.0         # its block calls' time (`0F3@12:e5`), all in the compute phase
    actions_s: float = 0.0       # its actions' time (`0F3`), which holds the calls
    input_wait_s: float = 0.0    # of its actions' time between calls, the gaps a receive of its ended in
    message_gaps_s: float = 0.0  # of the time outside its actions, the gaps a send or receive of its ended in

    @property
    def tail_s(self) -> float:
        return self.step_end_s - self.compute_end_s

    @property
    def between_s(self) -> float:
        """Inside its actions, between their block calls, less the waits for a receive."""
        return self.actions_s - self.calls_s - self.input_wait_s

    @property
    def outside_s(self) -> float:
        """In the compute phase, outside every action."""
        return self.compute_end_s - self.actions_s


@dataclass(frozen=True)
class Diff:
    """A rank's step measured and predicted; the differences are predicted - measured, in s."""
    measured: Phases
    predicted: Phases

    @property
    def compute_s(self) -> float:
        return self.predicted.compute_end_s - self.measured.compute_end_s

    @property
    def tail_s(self) -> float:
        return self.predicted.tail_s - self.measured.tail_s

    @property
    def end_s(self) -> float:
        return self.predicted.step_end_s - self.measured.step_end_s

    def part_s(self, name: str) -> float:
        """predicted - measured of one of a Phases' figures (`calls_s`, `between_s`, ...)."""
        return getattr(self.predicted, name) - getattr(self.measured, name)


def step_starts(trace: Trace) -> list[float]:
    """When each step of `trace` starts: the first start of its actions' k-th runs, over every
    rank. Raises TraceError where the actions ran unequal numbers of times or steps overlap."""
    runs: dict[tuple[int, str], list[TraceEvent]] = defaultdict(list)
    for e in trace.events:
        if is_action(e):
            runs[(e.rank, e.name)].append(e)
    counts = {len(v) for v in runs.values()}
    if not counts:
        raise TraceError("no forward or backward action (`0F3`) on a compute lane")
    if len(counts) > 1:
        raise TraceError(f"its actions ran {min(counts)} to {max(counts)} times: not whole steps")
    steps = list(zip(*(sorted(v, key=lambda e: e.start_s) for v in runs.values())))   # [k]: the k-th runs
    starts = [min(e.start_s for e in s) for s in steps]
    for k in range(1, len(steps)):
        if max(e.end_s for e in steps[k - 1]) > starts[k]:
            raise TraceError(f"step {k - 1}'s actions end after step {k}'s start")
    return starts


def phases(trace: Trace, timed: int | None = None) -> list[Phases]:
    """Each rank's compute end and step end in each step of `trace`, by step and rank; with
    `timed`, only its last `timed` steps (the ones before: warm-up). An event belongs to the
    step it starts in; markers count for nothing."""
    starts = step_starts(trace)
    first = max(0, len(starts) - timed) if timed else 0
    compute: dict[tuple[int, int], float] = {}
    update: dict[tuple[int, int], float] = {}
    last: dict[tuple[int, int], float] = {}
    spent: dict[tuple[int, int, str], float] = defaultdict(float)
    held: dict[tuple[int, int], list[TraceEvent]] = defaultdict(list)       # actions and calls, by step and rank
    received = message_ends(trace)                                        # when each rank's receives ended
    messaged = message_ends(trace, ("send", "recv"))                       # ... and its sends and receives
    for e in trace.events:
        k = bisect.bisect_right(starts, e.start_s) - 1
        if k < first or e.cat == "marker":
            continue
        key = (k, e.rank)
        last[key] = max(last.get(key, e.end_s), e.end_s)
        if e.stream == "compute" and e.cat in PASS_CATEGORIES:
            compute[key] = max(compute.get(key, e.end_s), e.end_s)
            part = "calls" if is_block_call(e) else "actions" if is_action(e) else None
            if part is not None:
                spent[(*key, part)] += e.end_s - e.start_s
                held[key].append(e)
        elif e.cat == "update":
            update[key] = max(update.get(key, e.end_s), e.end_s)
    out = []
    for (k, r), end in sorted(compute.items()):
        actions = sorted((e for e in held[(k, r)] if is_action(e)), key=lambda e: e.start_s)
        calls = sorted((e for e in held[(k, r)] if is_block_call(e)), key=lambda e: e.start_s)
        out.append(Phases(k - first, r, end - starts[k], update.get((k, r), last[(k, r)]) - starts[k],
                          spent[(k, r, "calls")], spent[(k, r, "actions")],
                          _input_wait(actions, calls, received[r]), _message_gaps(actions, messaged[r])))
    return out


def _ended_in(ends: list[float], lo: float, hi: float) -> bool:
    """Whether one of the sorted times `ends` is in (lo, hi]."""
    i = bisect.bisect_right(ends, lo)
    return hi > lo and i < len(ends) and ends[i] <= hi


def _message_gaps(actions: list[TraceEvent], messaged: list[float]) -> float:
    """Between these actions (in order), the gaps that a send or receive of the rank ended in:
    where the executor posts the sends of the action just run and the receive of the next
    (session 27: 0.5-0.9 ms a gap while the net thread posted the receive and handed it back;
    since 7c68210 the compute thread posts it, and each post's host time is in the trace)."""
    return sum(q.start_s - p.end_s for p, q in zip(actions, actions[1:]) if _ended_in(messaged, p.end_s, q.start_s))


def _input_wait(actions: list[TraceEvent], calls: list[TraceEvent], received: list[float]) -> float:
    """Of the time inside these actions between their calls (both in order; and before the
    first call, after the last), the gaps a receive ended in: an action that starts before its
    input has come waits inside it (a backward recomputes its stage first, then waits for the
    next stage's gradient)."""
    waited = 0.0
    for a in actions:
        inside = [c for c in calls if a.start_s <= c.start_s and c.end_s <= a.end_s]
        edges = [a.start_s, *(t for c in inside for t in (c.start_s, c.end_s)), a.end_s]
        for lo, hi in zip(edges[::2], edges[1::2]):
            if _ended_in(received, lo, hi):
                waited += hi - lo
    return waited


def compare(measured: list[Phases], predicted: list[Phases]) -> list[Diff]:
    """The (step, rank) pairs both have, in the measured order."""
    pred = {(p.step, p.rank): p for p in predicted}
    return [Diff(m, pred[(m.step, m.rank)]) for m in measured if (m.step, m.rank) in pred]


def folders(paths: list[Path]) -> list[Path]:
    """The cells and run folders named, a matrix folder standing for its cells."""
    out = []
    for p in paths:
        if not p.is_dir():
            raise TraceError(f"{p}: no such folder")
        out.extend(sorted(c for c in p.glob("cells/*") if c.is_dir()) or [p])
    return out


def traces(folder: Path) -> tuple[Path, dict[str, tuple[Path, Path | None]]]:
    """A cell's or run's folder of predicted traces, and schedule -> (its measured trace, its
    predicted one or None). A cell keeps the measured in real/ and the predicted beside it."""
    real = folder / "real" if (folder / "real").is_dir() else folder
    home = real.parent if real.name == "real" else real
    found: dict[str, tuple[Path, Path | None]] = {}
    for f in sorted(real.glob("trace-*.json*")):
        name = f.name.removeprefix("trace-").split(".json")[0]
        if not name.endswith("-predicted"):
            pred = home / f"trace-{name}-predicted.json"
            found.setdefault(name, (f, pred if pred.exists() else None))
    return home, found


def timed_steps(run: Path, name: str) -> int | None:
    """How many timed steps the run's results.json gives schedule `name`; None without one."""
    try:
        return len(read_json(run / RESULTS)["schedules"][name]["step_s"])
    except (OSError, ValueError, KeyError, TypeError, *CORRUPT):
        return None


def load_trace(path: Path) -> Trace:
    """The trace at `path` (any stored form); a missing, cut or corrupt one raises TraceError
    naming it, which the tools print as one line."""
    try:
        return Trace.load(path)
    except (ValueError, OSError, EOFError, zlib.error) as e:      # TraceError is a ValueError
        raise _naming(path, e) from None


def _naming(path: Path, e: Exception) -> TraceError:
    """`e` as a TraceError whose message names `path` (once)."""
    return TraceError(str(e) if str(path) in str(e) else f"{path}: {e}")


def _phases(path: Path, timed: int | None) -> list[Phases]:
    trace = load_trace(path)
    try:
        return phases(trace, timed)
    except TraceError as e:
        raise _naming(path, e) from None


def _ms(x: float, sign: str = "") -> str:
    return f"{round(x * 1e3, 1) + 0.0:{sign}.1f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("paths", nargs="+", type=Path, help="matrix folders, matrix cells or run folders")
    p.add_argument("--measured-only", action="store_true",
                   help="the measured traces alone: each rank's compute end, tail and step end")
    ns = p.parse_args(argv)
    rows, summary = [], []
    try:
        for folder in folders(ns.paths):
            home, found = traces(folder)
            if not found:
                raise TraceError(f"no measured trace (trace-*.json) in {folder}")
            missing = [n for n, (_, pred) in found.items() if pred is None]
            if missing and not ns.measured_only:
                matrix = home.parent.parent if home.parent.name == "cells" else "MATRIX"
                print(f"phases: no predicted trace of {', '.join(missing)} in {home}: `aptmoe-sim matrix "
                      f"--repredict --out {matrix}` (with its --calibration and --steps) writes them", file=sys.stderr)
            for name, (real, pred) in found.items():
                timed = timed_steps(real.parent, name)
                measured = _phases(real, timed)
                if ns.measured_only:
                    rows.extend([home.name, name, str(m.step), str(m.rank), _ms(m.compute_end_s), _ms(m.tail_s),
                                 _ms(m.step_end_s), *(_ms(getattr(m, f)) for f in PARTS)] for m in measured)
                elif pred is not None:
                    diffs = compare(measured, _phases(pred, timed))
                    rows.extend([home.name, name, str(d.measured.step), str(d.measured.rank),
                                 *(_ms(getattr(x, f)) for f in ("compute_end_s", "tail_s", "step_end_s")
                                   for x in (d.measured, d.predicted)),
                                 *(_ms(getattr(d, f), "+") for f in ("compute_s", "tail_s", "end_s"))] for d in diffs)
                    if diffs:
                        summary.append([home.name, name, str(len(diffs)),
                                        *(_ms(statistics.median(getattr(d, f) for d in diffs), "+")
                                          for f in ("compute_s", "tail_s", "end_s")),
                                        *(_ms(statistics.median(d.part_s(f) for d in diffs), "+") for f in PARTS)])
    except TraceError as e:
        print(f"phases: error: {e}", file=sys.stderr)
        return 2
    if not rows:
        print("phases: error: nothing to compare (no predicted traces; --measured-only reads the measured alone)",
              file=sys.stderr)
        return 2
    head = ["cell", "schedule", "step", "rank"]
    if ns.measured_only:
        print("ms from each timed step's start: the rank's compute end, the tail after it, its step end; the compute "
              f"phase split: {SPLIT}\n")
        print(format_table([*head, "compute end", "tail", "step end", "calls", "between", "input wait", "outside",
                            "at messages"], rows))
        return 0
    print("ms from each timed step's start, measured and predicted, and predicted - measured: the rank's compute "
          "end (its last forward, backward or recompute), the tail after it (to its last update), its step end\n")
    print(format_table([*head, "compute m", "p", "tail m", "p", "end m", "p", "d compute", "d tail", "d end"], rows))
    print(f"\nmedian over steps and ranks of predicted - measured, ms; the compute phase split: {SPLIT}\n")
    print(format_table(["cell", "schedule", "rows", "d compute end", "d tail", "d step end",
                        "d calls", "d between", "d input wait", "d outside", "d at messages"], summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
