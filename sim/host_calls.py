"""How long the issuing thread took to issue each kind of block, per schedule, in measured runs.

Every block a GPU rank issues carries the host time of its call (`host_us`, exec/runtime.py).
The simulator prices that time from the dispatch probe, the same for every schedule; where one
schedule's calls take longer than another's for the same block, something beside the issuing
thread slows it that the model does not know. On the 2-GPU grid of session 15
(docs/validation-h200-2gpu-v3) APTMoE's expert forwards on a capped link took about twice
Mobius's host time.

    python -m aptmoe.sim.host_calls RUN_DIR [RUN_DIR ...] [--landings fe] [--beside fe] [--loading fe] [--jobs fe]
        [--gaps f|b] [--budget] [--cpu-jobs] [--own-work] [--first-use] [--load-stalls] [--predicted [--stalls]]

A RUN_DIR is an `aptmoe-run` output (its trace-*.json, .json.gz or .json.xz) or a matrix folder (every
cells/*/real below it). Prints one row per run and schedule: the median host time and span
of each (pass, block kind) call, in microseconds.
"""

from __future__ import annotations

import argparse
import bisect
import statistics
import sys
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from aptmoe.own_work import CONDITIONS as OWN_WORK
from aptmoe.own_work import first_use_cell, first_uses, own_work_factors, rank_lanes
from aptmoe.report import format_table
from aptmoe.sim.phases import folders, load_trace, traces
from aptmoe.stalls import LOAD_STALL_FACTOR, LOAD_STALL_FLOOR_S, STALL_FACTOR, STALL_FLOOR_S, WITH_RECV_S, load_stalls, stalls
from aptmoe.trace import (CPU_JOB_PHASES, PASS_LETTERS, Trace, TraceError, action_runs, block_kind, call_kind,
                          is_action, is_block_call, is_cpu_job, is_load)


def _calls(trace: Trace):
    """(pass and kind, e.g. 'fe'; host us; event) of every block call the run timed the host of."""
    for e in trace.events:
        if is_block_call(e) and "host_us" in e.args:
            yield call_kind(e), float(e.args["host_us"]), e


def host_calls(trace: Trace) -> dict[str, tuple[int, float, float]]:
    """'fe' (pass, kind) -> (calls, median host us, median span us) over every rank."""
    host, span = defaultdict(list), defaultdict(list)
    for key, us, e in _calls(trace):
        host[key].append(us)
        span[key].append((e.end_s - e.start_s) * 1e6)
    return {k: (len(v), statistics.median(v), statistics.median(span[k])) for k, v in host.items()}


def _issued(trace: Trace, key: str):
    """(event, host us, (issue start, issue end)) of every `key` call: a call is issued from
    its start to its start plus its host time."""
    for k, us, e in _calls(trace):
        if k == key:
            yield e, us, (e.start_s, e.start_s + us * 1e-6)


def _medians(groups: dict[str, list[float]], order) -> dict[str, tuple[int, float]]:
    """group -> (calls, median host us), in `order`, the empty groups left out."""
    return {k: (len(groups[k]), statistics.median(groups[k])) for k in order if groups.get(k)}


def _overlaps(spans, a: float, b: float) -> bool:
    return any(s < b and t > a for s, t, *_ in spans)


def _cpu_expert_spans(trace: Trace) -> dict[int, list[tuple[float, float]]]:
    """Each rank's CPU experts computing: (start, end) of its CPU lane's expert jobs."""
    return rank_lanes(trace)[2]


def _others_busy(spans: dict[int, list[tuple[float, float]]], rank: int, a: float, b: float) -> bool:
    return any(_overlaps(v, a, b) for r, v in spans.items() if r != rank)


LANDED = ("0", "1", "2+")


def by_landings(trace: Trace, key: str = "fe") -> dict[str, tuple[int, float]]:
    """The `key` calls (pass and kind, as `host_calls` names them) by how many of the rank's
    loads landed while the call was issued: '0', '1', '2+' -> (calls, median host us). A
    landing wakes the copy engine, whose work then competes with the issuing thread for the
    GIL; calls with none beside them show what is left."""
    ends: dict[int, list[float]] = defaultdict(list)
    for e in trace.events:
        if is_load(e):
            ends[e.rank].append(e.end_s)
    for v in ends.values():
        v.sort()
    out = defaultdict(list)
    for e, us, (a, b) in _issued(trace, key):
        r = ends.get(e.rank, [])
        n = bisect.bisect_right(r, b) - bisect.bisect_left(r, a)
        out[LANDED[min(n, 2)]].append(us)
    return _medians(out, LANDED)


BESIDE = ("none", "own", "other", "both")


def by_cpu_experts(trace: Trace, key: str = "fe") -> dict[str, tuple[int, float]]:
    """The `key` calls by the CPU experts computing while each was issued: none, the rank's
    own ('own'), another rank's ('other'), or both -> (calls, median host us). The simulator
    slows the issuing thread by a measured factor for each (`issue_tolls.expert_factor` and
    the like, calibration/expert_neighbours.py); this shows what the runs themselves saw.
    Ranks are taken to share one host."""
    spans = _cpu_expert_spans(trace)
    out = defaultdict(list)
    for e, us, (a, b) in _issued(trace, key):
        own = _overlaps(spans.get(e.rank, []), a, b)
        other = _others_busy(spans, e.rank, a, b)
        out["both" if own and other else "own" if own else "other" if other else "none"].append(us)
    return _medians(out, BESIDE)


# a copy's phase (its event's category after "load-"): whole stages (GPipeOffload, Mobius), then
# APTMoE's three, innermost last
PHASES = ("none", "stage", "inter-stage", "inter-layer", "inter-expert")


def by_loading(trace: Trace, key: str = "fe") -> dict[str, tuple[int, float]]:
    """The `key` calls by the loading phase of the rank's copies in flight while each was
    issued: none, or the innermost phase among them (inter-expert over inter-layer over
    inter-stage) -> (calls, median host us). Session 17's A/B on a capped link found APTMoE's
    expert forwards slower beside its inner phases' copies than beside its inter-stage ones,
    and its steps slower with those phases than without (--inter_stage_only)."""
    spans: dict[int, list[tuple[float, float, int]]] = defaultdict(list)
    for e in trace.events:
        if is_load(e) and e.cat[5:] in PHASES:
            spans[e.rank].append((e.start_s, e.end_s, PHASES.index(e.cat[5:])))
    out = defaultdict(list)
    for e, us, (a, b) in _issued(trace, key):
        inner = max((i for s, t, i in spans.get(e.rank, []) if s < b and t > a), default=0)
        out[PHASES[inner]].append(us)
    return _medians(out, PHASES)


GAP_PASSES = {"f": "forward", "b": "backward"}    # an action's category by its pass
JOBS = ("alone", "other", "job")


def _action_layers(trace: Trace) -> Callable:
    """A function from an event (a block call or a CPU lane's job) to its rank, action (`0F3`:
    a pass of one micro-batch on one stage), the action's run (the step: trace.action_runs)
    and layer."""
    run_of = action_runs(trace)

    def key(e) -> tuple[int, str, int, object]:
        return (e.rank, *run_of(e), e.args.get("layer"))
    return key


def by_jobs(trace: Trace, key: str = "fe") -> dict[str, tuple[int, float]]:
    """The `key` calls by whether their layer ran CPU experts in the same occurrence of the
    action, that is in the same step (a "job layer"), and for the others whether another
    rank's CPU experts computed while each was issued: 'alone', 'other', 'job' -> (calls,
    median host us). A backward's CPU experts and its recompute's share the action's name,
    so they count for both. In session 17's APTMoE runs with --inter_stage_only a job layer's
    expert forwards took 1.4-1.9x those of a layer without one, also while none of its
    experts computed, and another rank's experts cost nothing (docs/measured/h200x2-session17).
    Sessions 17 and 18 keyed a job layer by action and layer alone, so a layer that ran CPU
    experts in any step counted as one in every step; APTMoE's split changes from step to
    step, and its figures were read again (docs/measured/h200x2-session17)."""
    place = _action_layers(trace)
    jobs = {place(e) for e in trace.events if is_cpu_job(e)}
    spans = _cpu_expert_spans(trace)
    out = defaultdict(list)
    for e, us, (a, b) in _issued(trace, key):
        group = "job" if place(e) in jobs else "other" if _others_busy(spans, e.rank, a, b) else "alone"
        out[group].append(us)
    return _medians(out, JOBS)


def gaps(trace: Trace, pass_: str = "f") -> dict[str, tuple[int, float, float]]:
    """The time inside each action of `pass_` (f: a stage's forward of one micro-batch, b: its
    backward with the recompute) that none of its block calls covers, by where it falls:
    'start' (the action's start to its first call), 'end' (its last call to its end), and
    between two calls 'fg>fe' (a gate to an expert of the same layer), 'fe>fa+' (the '+': the
    next layer), and so on -> (gaps, median us, mean us per action). A measured action holds
    the host work between its calls (a layer's combine, APTMoE's CPU experts handed over) and
    the waits the executor does inside it (a load not landed, a CPU expert's output, the
    output gradient after the recompute). The simulator's calls run back to back: it charges a
    layer's host work between its blocks (the profile's `dispatch.between`) to the issuing
    thread's clock, so that work shows in the layer's first expert call, and it places waits
    before an action, not inside.

    Session 18 (docs/validation-h200-2gpu-v4): in S8 the forwards' 'fg>fe' took 30-70 us in
    GPipe and Mobius and about 300-460 us in APTMoE."""
    cat = GAP_PASSES[pass_]
    actions = [e for e in trace.events if is_action(e) and e.cat == cat]
    calls: dict[tuple[int, str], list] = defaultdict(list)
    for e in trace.events:
        if is_block_call(e):
            calls[(e.rank, e.name.split("@", 1)[0])].append(e)
    out: dict[str, list[float]] = defaultdict(list)
    for act in actions:
        inside = sorted((c for c in calls.get((act.rank, act.name), ())
                         if act.start_s <= c.start_s and c.end_s <= act.end_s + 1e-9), key=lambda c: c.start_s)
        if not inside:
            continue
        out["start"].append(inside[0].start_s - act.start_s)
        out["end"].append(act.end_s - inside[-1].end_s)
        for x, y in zip(inside, inside[1:]):
            turn = "+" if x.args.get("layer") != y.args.get("layer") else ""
            out[f"{PASS_LETTERS[x.cat]}{block_kind(x.name)}>{PASS_LETTERS[y.cat]}{block_kind(y.name)}{turn}"].append(
                y.start_s - x.end_s)
    n = len(out.get("start", ()))         # actions with a call: none in a run without this pass
    return {k: (len(v), statistics.median(v) * 1e6, sum(v) / n * 1e6) for k, v in out.items()}


def budget(trace: Trace) -> dict[int, tuple[float, float, float]]:
    """Where each rank's compute stream spends a step, in ms: (its block calls, the time inside
    its forward and backward actions that no call covers, the rest of its span: between
    actions, the update, the step's tail) -> rank -> those three. A step is one occurrence of
    each action. Measured against predicted, it shows how a step's error splits: in session
    18's S8 runs the simulator's block calls were longer (they hold the layer's host work
    between blocks, `gaps`), its actions had almost no gaps, and the time between them was
    about right (docs/validation-h200-2gpu-v4)."""
    out = {}
    for rank in sorted({e.rank for e in trace.events}):
        events = [e for e in trace.events if e.rank == rank]
        actions = [e for e in events if is_action(e)]
        if not actions:
            continue
        steps = max(Counter(e.name for e in actions).values())
        blocks = sum(e.end_s - e.start_s for e in events if is_block_call(e))
        inside = sum(e.end_s - e.start_s for e in actions)
        span = max(e.end_s for e in events) - min(e.start_s for e in events)
        out[rank] = (blocks / steps * 1e3, (inside - blocks) / steps * 1e3, (span - inside) / steps * 1e3)
    return out


JOB_PASSES = {"f": "forward", "r": "recompute", "b": "backward"}
JOB_COLUMNS = (*CPU_JOB_PHASES, "total", "next")


def cpu_jobs(trace: Trace) -> dict[str, dict[str, tuple[int, float]]]:
    """The rank's CPU jobs (a layer's CPU experts in one pass, the `cpu-job` events) by pass
    (f, r: a backward's recompute, b) -> each phase of trace.CPU_JOB_PHASES, 'total' (the
    hand-over to the outputs landed) and 'next' (from there to the rank's next block call:
    the issuing thread's wake-up and the layer's combine) -> (jobs, median us). On a capped
    link APTMoE's forwards spent 1550 us from their last GPU expert to the next layer, where
    the simulator put 184 (session 18, `gaps`): this says which phase holds it."""
    starts: dict[int, list[float]] = defaultdict(list)
    for e in trace.events:              # every block call, predicted ones too (they have no host_us)
        if is_block_call(e):
            starts[e.rank].append(e.start_s)
    for v in starts.values():
        v.sort()
    out: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for j in trace.events:
        if j.cat != "cpu-job":
            continue
        action = j.name.split("@", 1)[0]
        pass_ = "f" if "F" in action else "r" if j.args.get("of") == "recompute" else "b"
        for k in CPU_JOB_PHASES:
            out[pass_][k].append(float(j.args[f"{k}_us"]))
        out[pass_]["total"].append(j.dur_s * 1e6)
        later = starts.get(j.rank, [])
        i = bisect.bisect_left(later, j.end_s)
        if i < len(later):
            out[pass_]["next"].append((later[i] - j.end_s) * 1e6)
    return {p: _medians(out[p], JOB_COLUMNS) for p in JOB_PASSES if p in out}


def traces_of(run: Path, predicted: bool = False) -> dict[str, Path]:
    """A cell's or run's measured traces by schedule (sim/phases.py `traces`); with
    `predicted`, also the simulator's of each where it is a matrix cell's (`trace-X-predicted.json`
    beside `real/`, written by `aptmoe-sim matrix --repredict`), as 'X (predicted)'."""
    found = {}
    for name, (real, pred) in traces(run)[1].items():
        found[name] = real
        if predicted and pred is not None:
            found[f"{name} (predicted)"] = pred
    return found


@dataclass(frozen=True)
class Split:
    """One way to split a kind of call: its flag, the function, its groups and their headers."""
    flag: str
    split: Callable[[Trace, str], dict[str, tuple[int, float]]]
    groups: tuple[str, ...]
    headers: tuple[str, ...]
    by: str                      # what the split goes by, as the help and the table's title say it


SPLITS = (
    Split("landings", by_landings, LANDED, ("none", "one", "two or more"),
          "by the loads that landed while it was issued"),
    Split("beside", by_cpu_experts, BESIDE, ("none", "own", "another rank's", "both"),
          "by the CPU experts computing while it was issued"),
    Split("loading", by_loading, PHASES, PHASES,
          "by the loading phase of the copies in flight while it was issued"),
    Split("jobs", by_jobs, JOBS, ("no job", "no job, another rank's computing", "job layer"),
          "by the CPU experts of its layer (a job layer) and, in the others, another rank's"),
)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m aptmoe.sim.host_calls", description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path, help="aptmoe-run output folders or matrix folders")
    for s in SPLITS:
        p.add_argument(f"--{s.flag}", metavar="CALL", default=None,
                       help=f"also split one kind of call (e.g. fe: expert forwards) {s.by}: {', '.join(s.headers)}")
    p.add_argument("--gaps", choices=sorted(GAP_PASSES), default=None,
                   help="also the time inside each forward (f) or backward (b) action between its block "
                        "calls: median us (mean us per action) by where it falls")
    p.add_argument("--budget", action="store_true",
                   help="also where each rank's compute stream spends a step: its block calls, the gaps inside "
                        "its actions, the rest (ms a step)")
    p.add_argument("--cpu-jobs", action="store_true",
                   help="also the CPU jobs' phases by pass: waiting for the CPU, for the inputs, the copy down, "
                        "the experts, the copy up, in all, and on to the next block call (median us)")
    p.add_argument("--own-work", action="store_true",
                   help="also each rank's calls beside its own Adam, a copy, or both, over its calls alone, as "
                        "the calibration reads them (aptmoe.own_work): the calls' time over their kinds' "
                        "medians alone, the median of their ratios (calls)")
    p.add_argument("--first-use", dest="first_use", action="store_true",
                   help="also the calls alone of blocks the rank loads: the first call after a block's load "
                        "against its later calls, median host us (calls)")
    p.add_argument("--load-stalls", dest="load_stalls", action="store_true",
                   help=f"also the loads that took {LOAD_STALL_FACTOR:g}x their bytes at the run's median copy rate "
                        f"and {LOAD_STALL_FLOOR_S * 1e3:g} ms or more, their ms over that rate, and how many ended "
                        f"within {WITH_RECV_S * 1e3:g} ms of a receive of their rank")
    p.add_argument("--predicted", action="store_true",
                   help="also read each matrix cell's predicted traces (after aptmoe-sim matrix --repredict)")
    p.add_argument("--stalls", action="store_true",
                   help=f"with --predicted: the calls that took {STALL_FACTOR:g}x their prediction and "
                        f"{STALL_FLOOR_S * 1e3:g} ms more, how many were the first of their token count, and "
                        "the longest rank's time over the prediction")
    ns = p.parse_args(argv)
    if ns.stalls and not ns.predicted:
        p.error("--stalls compares each run with its prediction: add --predicted")
    asked = [(s, getattr(ns, s.flag)) for s in SPLITS if getattr(ns, s.flag)]
    rows, keys, gap_rows, budget_rows, job_rows, own_rows, first_rows = [], set(), [], [], [], [], []
    stall_rows, load_rows, measured = [], [], {}
    splits: dict[str, list[list[str]]] = {s.flag: [] for s, _ in asked}
    try:
        runs = folders(ns.runs)
    except TraceError as e:
        print(f"host_calls: error: {e}", file=sys.stderr)
        return 2
    for run in runs:
        found = traces_of(run, ns.predicted)
        if not found:
            print(f"host_calls: error: no measured trace (trace-*.json) in {run}", file=sys.stderr)
            return 2
        label = run.parent.name if run.name == "real" else run.name
        for name, path in found.items():
            try:
                trace = load_trace(path)
            except TraceError as e:
                print(f"host_calls: error: {e}", file=sys.stderr)
                return 2
            if ns.stalls:
                if name.endswith(" (predicted)"):
                    st = stalls(measured.pop(name.removesuffix(" (predicted)")), trace)
                    stall_rows.append([label, name.removesuffix(" (predicted)"), str(st.calls),
                                       f"{st.first_shape} of {st.first_calls}", f"{st.excess_s * 1e3:.1f}",
                                       "-" if st.ran is None else f"{st.ran:.2f}"])
                else:
                    measured[name] = trace
            if ns.load_stalls and not name.endswith(" (predicted)"):
                ls = load_stalls(trace)
                load_rows.append([label, name, str(ls.loads), "-" if ls.rate_Bps is None else f"{ls.rate_Bps / 1e9:.1f}",
                                  str(ls.stalled), f"{ls.excess_s * 1e3:.0f}", str(ls.with_recv)])
            calls = host_calls(trace)
            keys |= calls.keys()
            rows.append((label, name, calls))
            for s, call in asked:
                splits[s.flag].append([label, name, *_cells(s.split(trace, call), s.groups)])
            if ns.gaps:
                gap_rows.append((label, name, gaps(trace, ns.gaps)))
            if ns.cpu_jobs:
                job_rows.extend([label, name, pass_, str(max(n for n, _ in g.values())),
                                 *(f"{g[k][1]:.0f}" if k in g else "-" for k in JOB_COLUMNS)]
                                for pass_, g in cpu_jobs(trace).items())
            if ns.own_work:
                f = own_work_factors(trace)
                own_rows.append([label, name, *(f"{f[c].factor:.2f} {f[c].median:.2f} ({f[c].calls})"
                                                if c in f else "-" for c in OWN_WORK)])
            if ns.first_use:
                first_rows.append((label, name, first_uses(trace)))
            if ns.budget:
                budget_rows.extend([label, name, str(rank), *(f"{round(x, 1) + 0.0:.1f}" for x in (*b, sum(b)))]
                                   for rank, b in budget(trace).items())
    cols = sorted(keys, key=_pass_order)
    table = [[label, name, *(f"{c[k][1]:.0f} / {c[k][2]:.0f}" if k in c else "-" for k in cols)]
             for label, name, c in rows]
    print("median host us / span us per block call (f forward, b backward, r recompute; a attention, g gate, "
          "e expert)\n")
    print(format_table(["run", "schedule", *cols], table))
    for s, call in asked:
        print(f"\nmedian host us (calls) of {call} {s.by}\n")
        print(format_table(["run", "schedule", *s.headers], splits[s.flag]))
    if ns.gaps:
        where = sorted({k for *_, g in gap_rows for k in g} - {"start", "end"})
        print(f"\nus inside each {GAP_PASSES[ns.gaps]} action outside its block calls: median (mean per action)\n")
        print(format_table(["run", "schedule", "start", *where, "end"],
                           [[label, name, *(f"{round(g[k][1])} ({round(g[k][2])})" if k in g else "-"
                                            for k in ("start", *where, "end"))] for label, name, g in gap_rows]))
    if ns.cpu_jobs:
        print("\nmedian us of the CPU jobs (f forward, r recompute, b backward) in each phase, in all, and from "
              "their outputs' landing to the rank's next block call\n")
        print(format_table(["run", "schedule", "pass", "jobs", *JOB_COLUMNS], job_rows))
    if ns.own_work:
        print("\nthe calls beside the rank's own work against their kinds' median calls alone: their time over "
              "those medians (the factor), the median of their ratios (calls)\n")
        print(format_table(["run", "schedule", *OWN_WORK], own_rows))
    if ns.first_use:
        kinds = sorted({k for *_, f in first_rows for k in f}, key=_pass_order)
        print("\nthe calls alone of blocks the rank loads: median host us of the first call after a block's load "
              "/ of its later calls (first calls)\n")
        print(format_table(["run", "schedule", *kinds],
                           [[label, name, *(first_use_cell(f.get(k)) for k in kinds)] for label, name, f in first_rows]))
    if ns.stalls:
        print(f"\nblock calls that took {STALL_FACTOR:g}x their prediction and {STALL_FLOOR_S * 1e3:g} ms more: how "
              "many, how many were the first of their rank's calls with their token count (of all such first "
              "calls), the longest rank's ms over the prediction (the whole run), and of the stalled calls' host "
              "time the median share their thread ran (the rest it slept, on the GIL, a lock or the driver, or "
              "waited for a core; - in traces from before the executor kept it)\n")
        print(format_table(["run", "schedule", "stalls", "first of a shape", "ms over", "ran"], stall_rows))
    if ns.load_stalls:
        print(f"\nloads that took {LOAD_STALL_FACTOR:g}x their bytes at the run's median copy rate and "
              f"{LOAD_STALL_FLOOR_S * 1e3:g} ms or more (the whole run): how many, their ms over that rate, and how "
              f"many ended within {WITH_RECV_S * 1e3:g} ms of a receive of their rank\n")
        print(format_table(["run", "schedule", "loads", "GB/s", "stalled", "ms over", "with a receive"], load_rows))
    if ns.budget:
        print("\nms a step on each rank's compute stream\n")
        print(format_table(["run", "schedule", "rank", "block calls", "gaps in actions", "rest", "span"], budget_rows))
    return 0


def _pass_order(kind: str) -> tuple[int, str]:
    """'fe', 'ba', 're'... in table order: forward, backward, recompute, then the block kind."""
    return "fbr".index(kind[0]), kind[1:]


def _cells(groups: dict[str, tuple[int, float]], order) -> list[str]:
    return [f"{groups[k][1]:.0f} ({groups[k][0]})" if k in groups else "-" for k in order]


if __name__ == "__main__":
    sys.exit(main())
