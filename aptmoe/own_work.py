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

import bisect
import statistics
from collections import defaultdict
from dataclasses import dataclass

from aptmoe.trace import Trace, call_kind, is_block_call, is_cpu_job, is_load

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


def rank_lanes(trace: Trace) -> tuple[dict[int, list[Span]], dict[int, list[Span]], dict[int, list[Span]]]:
    """Each rank's copies in flight, Adam chunks and CPU experts, as (start, end) spans."""
    copies, adam, experts = defaultdict(list), defaultdict(list), defaultdict(list)
    for e in trace.events:
        span = (e.start_s, e.end_s)
        if is_load(e) or (e.stream == "offload" and e.cat == "offload"):
            copies[e.rank].append(span)
        elif e.stream == "cpu" and e.cat == "update":
            adam[e.rank].append(span)
        elif is_cpu_job(e):
            experts[e.rank].append(span)
    return copies, adam, experts


def _conditions(trace: Trace):
    """(condition, call event, host us) of each block call in one condition: 'alone' or one of
    CONDITIONS."""
    copies, adam, experts = rank_lanes(trace)
    for e in trace.events:
        if not is_block_call(e) or "host_us" not in e.args:
            continue
        us = float(e.args["host_us"])
        a, b = e.start_s, e.start_s + us * 1e-6
        if any(_covered(v, a, b) > 0 for v in experts.values()):
            continue
        c, m = _covered(copies.get(e.rank, []), a, b), _covered(adam.get(e.rank, []), a, b)
        if c == 0 and m == 0:
            yield "alone", e, us
        elif (c == 0 or c >= 0.5) and (m == 0 or m >= 0.5):
            yield "copy+adam" if c and m else "copy" if c else "adam", e, us
        # else: a neighbour for part of the call only; which condition it stands for is unclear


def calls_by_condition(trace: Trace) -> dict[str, list[tuple[str, float]]]:
    """'alone' and each of CONDITIONS -> (kind, host us) of its calls."""
    out: dict[str, list[tuple[str, float]]] = defaultdict(list)
    for cond, e, us in _conditions(trace):
        out[cond].append((call_kind(e), us))
    return out


def _block_key(e) -> tuple[int, str, str]:
    """(rank, stage, block) of a block call or a load: `0F3@2:e5` and `0LF@2:e5` -> (r, '0', '2:e5')."""
    head, block = e.name.split("@", 1)
    return e.rank, head[:len(head) - len(head.lstrip("0123456789"))], block


def first_uses(trace: Trace) -> dict[str, dict[str, list[float]]]:
    """Kind -> {'first': host us, 'later': host us} of the calls alone of blocks the rank
    loads: 'first' the block's first call after a load of it landed, 'later' its calls after
    that. On the 2-GPU H200 a Mobius rank's expert forwards alone took 237 us as the first call
    after their load and 162-164 us in the last two micro-batches (session 21); the model has
    no such cost. Resident blocks (GPipe's) are not counted."""
    landed: dict[tuple, list[float]] = defaultdict(list)
    for e in trace.events:
        if is_load(e) and "@" in e.name:
            landed[_block_key(e)].append(e.end_s)
    for v in landed.values():
        v.sort()
    first_ids: set[int] = set()
    last_call: dict[tuple, float] = {}
    for e in sorted((e for e in trace.events if is_block_call(e)), key=lambda e: e.start_s):
        key = _block_key(e)
        ends = landed.get(key)
        if not ends:
            continue
        i = bisect.bisect_right(ends, e.start_s)
        if i and ends[i - 1] > last_call.get(key, float("-inf")):
            first_ids.add(id(e))
        last_call[key] = e.start_s
    out: dict[str, dict[str, list[float]]] = defaultdict(lambda: {"first": [], "later": []})
    for cond, e, us in _conditions(trace):
        if cond == "alone" and landed.get(_block_key(e)):
            out[call_kind(e)]["first" if id(e) in first_ids else "later"].append(us)
    return dict(out)


def first_use_cell(got: dict[str, list[float]] | None) -> str:
    """One kind of `first_uses`, printed: 'first / later (n)', the median host us of its first
    calls after a load and of its later calls, and how many first calls ('-' for none)."""
    if not got:
        return "-"
    first, later = (f"{statistics.median(got[k]):.0f}" if got[k] else "-" for k in ("first", "later"))
    return f"{first} / {later} ({len(got['first'])})"


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
