"""Block calls that stalled: far longer than the simulator's twin of the same call.

A measured call 3x its prediction and 2 ms more stalled. On the 2 x H200 grids (session 22)
they were one-off: the same call, the same length, native and capped, most of them the first
call of their rank with their token count; the model has no term for them (a one-off cost of a
run's first steps is not the steady state it predicts), so validate and the matrix name them
per run (`stall_s_per_step`) and `host_calls --stalls` lists them.
"""

from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import dataclass

from aptmoe.trace import Trace, block_kind, by_occurrence, is_block_call, is_load, message_ends

# A call this much longer than its prediction, and by this much, stalled: the model's block costs
# are not that far off otherwise (session 22's longest stall: an expert's recompute of 228 ms).
STALL_FACTOR, STALL_FLOOR_S = 3.0, 2e-3


@dataclass(frozen=True)
class Stalls:
    """The block calls of one measured run that took `STALL_FACTOR` times their prediction and
    `STALL_FLOOR_S` more: how many, how many of those were the first call of their rank with
    their token count in their direction (forward and recompute share their kernels), how many
    such first calls there were in all, and the longest rank's time over the prediction."""
    calls: int
    first_shape: int
    first_calls: int
    excess_s: float
    # Of the stalled calls' host time, the median share their issuing thread ran
    # (exec/thread_clock.py; None for traces from before the executor kept it): the rest it
    # slept (the GIL, a lock, the driver) or waited for a core.
    ran: float | None = None


def stalls(real: Trace, predicted: Trace) -> Stalls:
    """The measured block calls that stalled against their predicted twins (the same rank, pass,
    name and occurrence). On the 2 x H200 grids v4, v5 and v6-fresh (84 runs; session 22, with
    its model) 139 calls stalled, 95 of them the first call of their rank with their token count
    in their direction (of 35,194 such first calls). In every L run at G 0.6 and 0.45 one or
    two did, 44-228 ms over the prediction in the run, and reproducibly (the same call, the same
    length, native and capped: L2 G0.6 GPipe's first 9-token expert backward, 72.6-72.8 ms); in
    no L run at G 0.3. A kernel the run had not used yet, it seems, not a cost the model has."""
    def by_call(trace: Trace):
        return by_occurrence((e for e in trace.events if is_block_call(e) and e.stream == "compute"),
                             lambda e: (e.rank, e.cat, e.name))
    ours, twins = by_call(real), by_call(predicted)
    shapes, calls, first, firsts, excess, held = set(), 0, 0, 0, Counter(), []
    for key, e in sorted(ours.items(), key=lambda kv: kv[1].start_s):
        shape = (e.rank, "b" if e.cat == "backward" else "f", block_kind(e.name), e.args.get("tokens"))
        new = shape not in shapes
        shapes.add(shape)
        firsts += new
        twin = twins.get(key)
        if twin is None:
            continue
        took, want = e.end_s - e.start_s, twin.end_s - twin.start_s
        if took >= STALL_FACTOR * want and took - want >= STALL_FLOOR_S:
            calls += 1
            first += new
            excess[e.rank] += took - want
            held.append(e.args)
    ran = [a["run_us"] / a["host_us"] for a in held if "run_us" in a and a.get("host_us")]
    return Stalls(calls, first, firsts, max(excess.values(), default=0.0),
                  statistics.median(ran) if ran else None)


# A load this many times longer than its bytes at the run's median copy rate, and at least this
# long, stalled: a capped stage load's copies ran within 1% of their slot otherwise.
LOAD_STALL_FACTOR, LOAD_STALL_FLOOR_S = 5.0, 0.02
# A stalled load "ended with" a receive of its rank that ended this close to it.
WITH_RECV_S = 3e-3


@dataclass(frozen=True)
class LoadStalls:
    """The loads of one measured run that stalled (`LOAD_STALL_FACTOR` times their bytes at the
    run's median copy rate, and `LOAD_STALL_FLOOR_S` or more): how many, of how many loads, their
    time over that rate, and how many ended within `WITH_RECV_S` of a receive of their rank."""
    loads: int
    stalled: int
    excess_s: float
    with_recv: int
    rate_Bps: float | None
    worst_rank_s: float = 0.0      # the rank with the most time over: its time over


def load_stalls(trace: Trace) -> LoadStalls:
    """Session 28: in the paper's regime on four H200s (8 GB/s), Mobius's stage loads ran at the
    cap but for 31 copies of 2,592 that took 0.14-0.54 s each, 9.5 s over the run's rate in all
    (four ranks, three timed steps). 30 of them ended within 3 ms of a receive of their
    rank that had waited for its peer (docs/measured/h200x4-session28). Session 29 found why: the
    issuing thread, far ahead of a GPU that waited for a message, blocked in the driver while
    recording a marker, the GIL held, so the copy threads stopped too; since the executor bounds
    how far it runs ahead (ScheduleConfig.ahead_blocks) such runs have none
    (docs/measured/session29). This still finds them in runs made before, or with the bound off."""
    loads = [e for e in trace.events if is_load(e) and e.args.get("bytes", 0) > 0 and e.end_s > e.start_s]
    if not loads:
        return LoadStalls(0, 0, 0.0, 0, None)
    rate = statistics.median(e.args["bytes"] / (e.end_s - e.start_s) for e in loads)
    ends = message_ends(trace)
    stalled = [e for e in loads
               if e.end_s - e.start_s >= max(LOAD_STALL_FACTOR * e.args["bytes"] / rate, LOAD_STALL_FLOOR_S)]
    with_recv = sum(any(abs(t - e.end_s) <= WITH_RECV_S for t in ends.get(e.rank, ())) for e in stalled)
    over = Counter()
    for e in stalled:
        over[e.rank] += e.end_s - e.start_s - e.args["bytes"] / rate
    return LoadStalls(len(loads), len(stalled), sum(over.values()), with_recv, rate, max(over.values(), default=0.0))
