"""The issuing thread's block calls beside the rank's own copies and Adam, read from a run.

The simulator slows a GPU rank's issuing thread by measured factors for what runs beside it
(sim/issuing.py). Loops that stand for the executor's calls beside its neighbours
(calibration/issue_tolls.py, calibration/expert_neighbours.py) found 1.13-1.33x beside the
rank's Adam chunks and 1.28-1.39x beside a native gradient offload with Adam, where the 2-GPU
H200 runs' own calls took 1.24-1.57x and 2.4-3.9x (docs/validation-h200-2gpu-v4, read in
session 20). The loops' calls touch little memory; the runs' calls, with their autograd and
their many tensors, seem to lose more to the host memory that Adam and the copies load, and
no loop yet stands for them. So the figures are read here from the executor's own calls.

Each block call with its host time (`host_us`) is issued from its start for that long. A
call is in one condition when, over at least half of that span, the rank had:

* `alone`: nothing of the below at any moment (the reference);
* `adam`: the rank's Adam chunks running on its CPU worker, no copy;
* `copy`: a copy in flight on the rank's host link (a parameter load or a gradient offload),
  no Adam;
* `copy+adam`: both at once.

Calls beside any CPU expert (the rank's or another's) are left out: their factors are
measured apart. Each call is set against the median of its kind's calls alone (a kind is a
pass and a block kind, `re`: an expert's recompute), so that a mix of kinds does not weigh
in. A condition's factor is its calls' host time over what the same calls would have taken at
those medians (a ratio of sums): the simulator gives each call of the condition its kind's
host cost (the dispatch probe's median) times the factor, and what a step takes is the sum.
The median of the calls' ratios is kept beside it. On the 2-GPU H200 runs the calls beside a
neighbour have long tails (a recompute beside an offload with Adam took 281-1137 us where
alone it took 138): on v4's native S8 cells the factor ran 6-16% over the median beside Adam,
8-16% beside a copy and 2-21% beside both (docs/validation-h200-2gpu-v4, read in session 21).
The medians, which the calibration took until then, left that time out of the predicted steps.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from dataclasses import dataclass

from aptmoe.trace import CPU_EXPERT_CATEGORIES, Trace, call_kind, is_block_call

CONDITIONS = ("adam", "copy", "copy+adam")
MIN_ALONE = 10          # calls alone a kind needs before its calls beside anything count


@dataclass(frozen=True)
class OwnWork:
    """A condition's factor (a ratio of sums), the median of its calls' ratios, and what they
    rest on."""

    factor: float
    calls: int
    kinds: int
    median: float

    def __str__(self) -> str:
        return f"{self.factor:.2f}x (median {self.median:.2f}; {self.calls} calls of {self.kinds} kinds)"


Span = tuple[float, float]


def _covered(spans: list[Span], a: float, b: float) -> float:
    """The share of [a, b] that `spans` cover (they may overlap each other: merged first)."""
    if b <= a:
        return 0.0
    cut = sorted((max(a, s), min(b, t)) for s, t in spans if s < b and t > a)
    covered, at = 0.0, a
    for s, t in cut:
        s = max(s, at)
        if t > s:
            covered += t - s
            at = t
    return covered / (b - a)


def _lanes(trace: Trace) -> tuple[dict[int, list[Span]], dict[int, list[Span]], dict[int, list[Span]]]:
    """Each rank's copies in flight, Adam chunks and CPU experts, as (start, end) spans."""
    copies, adam, experts = defaultdict(list), defaultdict(list), defaultdict(list)
    for e in trace.events:
        span = (e.start_s, e.end_s)
        if (e.stream == "load" and e.cat.startswith("load-")) or (e.stream == "offload" and e.cat == "offload"):
            copies[e.rank].append(span)
        elif e.stream == "cpu" and e.cat == "update":
            adam[e.rank].append(span)
        elif e.stream == "cpu" and e.cat in CPU_EXPERT_CATEGORIES:
            experts[e.rank].append(span)
    return copies, adam, experts


def calls_by_condition(trace: Trace) -> dict[str, list[tuple[str, float]]]:
    """'alone' and each of CONDITIONS -> (kind, host us) of its calls."""
    copies, adam, experts = _lanes(trace)
    out: dict[str, list[tuple[str, float]]] = defaultdict(list)
    for e in trace.events:
        if not is_block_call(e) or "host_us" not in e.args:
            continue
        us = float(e.args["host_us"])
        a, b = e.start_s, e.start_s + us * 1e-6
        if any(_covered(v, a, b) > 0 for v in experts.values()):
            continue
        c, m = _covered(copies.get(e.rank, []), a, b), _covered(adam.get(e.rank, []), a, b)
        if c == 0 and m == 0:
            out["alone"].append((call_kind(e), us))
        elif (c == 0 or c >= 0.5) and (m == 0 or m >= 0.5):
            out["copy+adam" if c and m else "copy" if c else "adam"].append((call_kind(e), us))
        # else: a neighbour for part of the call only; which condition it stands for is unclear
    return out


Call = tuple[str, float, float]          # kind, host us, its kind's median us alone


def own_work_ratios(trace: Trace, min_alone: int = MIN_ALONE) -> dict[str, list[Call]]:
    """Each condition -> (kind, host us, its kind's median us alone) of its calls, for the
    kinds with at least `min_alone` calls alone."""
    groups = calls_by_condition(trace)
    alone: dict[str, list[float]] = defaultdict(list)
    for kind, us in groups.get("alone", []):
        alone[kind].append(us)
    ref = {k: statistics.median(v) for k, v in alone.items() if len(v) >= min_alone}
    return {cond: [(kind, us, ref[kind]) for kind, us in groups.get(cond, []) if ref.get(kind, 0) > 0]
            for cond in CONDITIONS}


def own_work_factors(traces: Trace | list[Trace], min_alone: int = MIN_ALONE) -> dict[str, OwnWork]:
    """Each condition with calls of a kind that has at least `min_alone` calls alone -> its
    factor and median (each at least 1: less is noise around none). Over several traces (runs
    or schedules), each call against its own trace's calls alone, the calls pooled."""
    pooled: dict[str, list[Call]] = defaultdict(list)
    for t in [traces] if isinstance(traces, Trace) else traces:
        for cond, got in own_work_ratios(t, min_alone).items():
            pooled[cond].extend(got)
    return {cond: OwnWork(max(1.0, sum(us for _, us, _ in got) / sum(ref for _, _, ref in got)), len(got),
                          len({k for k, _, _ in got}), max(1.0, statistics.median(us / ref for _, us, ref in got)))
            for cond, got in pooled.items() if got}
