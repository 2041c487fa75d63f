"""The CPU worker's own time between one Adam chunk and the next, read from the executor's trace.

The executor updates a stage's host parameters block by block, each block's chunks handed to
the rank's CPU worker at once (exec/runtime.py `_update_cpu`). Each chunk is one fused torch
call, timed as its trace event; after it the worker takes the rank's condition lock to tell
the loading policy (`adam_done`; APTMoE's weighs the Adam still owed with its cost model),
sets the chunk's future and takes the next job off its queue, holding the GIL that the
issuing thread keeps most of the time. None of that is in the chunk's event. On the one-GPU
H200 runs of v10- to v21-fresh (96 runs, read in session 38) the next chunk of the same block
began a median 22 us after the last one ended under Mobius and GPipeOffload, and 44 us under
APTMoE (the medians of the runs' medians): with some 250 chunks a step on MoE-M, 5 and 11 ms
a step on a CPU worker that holds the step's last 40% (its Adam), none of which the
simulator had.

A gap is read only between consecutive chunks of one block on one rank (chunk i, then i + 1
of the same event name): those were queued together, so nothing but the worker's own work
sits between them.
"""

from __future__ import annotations

import statistics
from collections import defaultdict

from aptmoe.trace import Trace

# A gap longer than this is a worker taken by something else (a CPU expert job, which goes
# first): not the hand-over.
MAX_GAP_S = 500e-6
MIN_GAPS = 30            # gaps a figure needs
# Each schedule whose Adam runs on the CPU, by the loading policy its plan has
# (aptmoe/plan/builders.py; a test holds the two together).
POLICY_OF = {"APTMoE": "aptmoe", "Mobius": "stage", "GPipeOffload": "stage"}


def adam_chunk_gaps(trace: Trace) -> list[float]:
    """Seconds between consecutive chunks of one block's Adam on each rank's CPU worker."""
    chunks: dict[tuple[int, str], list] = defaultdict(list)
    for e in trace.events:
        if e.stream == "cpu" and e.cat == "update" and "chunk" in e.args:
            chunks[(e.rank, e.name)].append(e)
    gaps = []
    for events in chunks.values():
        events.sort(key=lambda e: e.start_s)
        for a, b in zip(events, events[1:]):
            if b.args["chunk"] == a.args["chunk"] + 1 and 0.0 <= b.start_s - a.end_s <= MAX_GAP_S:
                gaps.append(b.start_s - a.end_s)
    return gaps


def gaps_by_policy(traces: dict[str, Trace], what: str) -> dict[str, float]:
    """Loading policy -> the median gap over the traces of its schedules (schedule -> trace),
    pooled; one clear error naming `what` where a policy's traces hold fewer than MIN_GAPS, or
    none of the schedules runs Adam on the CPU."""
    pooled: dict[str, list[float]] = {}
    for schedule, t in traces.items():
        if schedule in POLICY_OF:
            pooled.setdefault(POLICY_OF[schedule], []).extend(adam_chunk_gaps(t))
    if not pooled:
        raise ValueError(f"{what} has no trace of {', '.join(POLICY_OF)}: none of its schedules runs Adam on the CPU")
    for policy, gaps in pooled.items():
        if len(gaps) < MIN_GAPS:
            raise ValueError(f"{what} has {len(gaps)} gaps between one block's Adam chunks under the {policy} policy, "
                             f"fewer than {MIN_GAPS}: too few steps, or a trace without its chunks")
    return {policy: statistics.median(gaps) for policy, gaps in sorted(pooled.items())}
