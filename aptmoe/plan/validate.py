"""Plan checks: a unit-time dry run (deadlock), ordering, send/receive matching, memory.

The dry run executes every stream of every rank with each action taking one time unit,
honouring program order and explicit dependencies. It finds deadlocks (nothing can start,
actions remain) and gives every action a start step, from which the ordering rules are
checked and the per-GPU memory high-water mark is computed. A failure raises `PlanError`
carrying the rank-by-step grid with the failing step marked, as torch's
`_format_pipeline_order` shows a schedule.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from aptmoe.memory import MemoryModel
from aptmoe.plan.actions import RECEIVES, Action, Kind
from aptmoe.plan.plan import STREAM_OF, STREAMS, Plan, PlanError


@dataclass
class DryRun:
    start: dict[Action, int]
    steps: int
    peak_bytes: list[int]          # per rank; empty without a memory model
    peak_step: list[int]


def dry_run(plan: Plan, memory: MemoryModel | None = None) -> DryRun:
    """Unit-time execution. Raises PlanError on deadlock.

    An action starts one step after the later of its stream predecessor and its
    dependencies finished: start times follow from one pass in topological order (Kahn's
    algorithm, linear in the plan's size); actions left over sit on a cycle, a deadlock.
    """
    preds: dict[Action, list[Action]] = {}
    for _, stream, a in plan.actions():
        preds[a] = list(plan.deps_of(a))
    for r in range(plan.num_ranks):
        for prog in plan.programs[r].values():
            for prev, a in zip(prog, prog[1:]):
                preds[a].append(prev)
    succs: dict[Action, list[Action]] = defaultdict(list)
    waiting = {}
    for a, ps in preds.items():
        known = [p for p in ps if p in preds]
        waiting[a] = len(known)
        for p in known:
            succs[p].append(a)
    start: dict[Action, int] = {}
    ready = [a for a, n in waiting.items() if n == 0]
    while ready:
        a = ready.pop()
        start[a] = max((start[p] + 1 for p in preds[a] if p in start), default=0)
        for b in succs[a]:
            waiting[b] -= 1
            if waiting[b] == 0:
                ready.append(b)
    if len(start) < len(preds):
        blocked = []
        for r in range(plan.num_ranks):
            for stream in STREAMS:
                head = next((a for a in plan.programs[r].get(stream, []) if a not in start), None)
                if head is not None:
                    waits = [str(d) for d in plan.deps_of(head) if d not in start]
                    blocked.append(f"rank {r} {stream}: {head} waits for {', '.join(waits) or 'its stream'}")
        t = 1 + max(start.values(), default=-1)
        raise PlanError("deadlock: no action can start\n  " + "\n  ".join(blocked) + "\n"
                        + format_grid(plan, start, t))
    steps = 1 + max(start.values(), default=-1)
    peaks, peak_steps = ([], []) if memory is None else _memory(plan, memory, start)
    return DryRun(start, steps, peaks, peak_steps)


def _memory(plan: Plan, mem: MemoryModel, start: dict[Action, int]) -> tuple[list[int], list[int]]:
    """Allocate at an action's start, free at its end (a conservative order within a step)."""
    layers = {st.index: st.layers for st in plan.stages}
    events: list[list[tuple[int, int]]] = [[] for _ in range(plan.num_ranks)]   # (time, delta)
    base = [0] * plan.num_ranks
    for st in plan.stages:
        if plan.resident:
            base[st.rank] += mem.param_bytes(st.layers) + mem.adam_bytes(st.layers)
            if not plan.fwd_only:
                base[st.rank] += mem.grad_bytes(st.layers)
    for a, t in start.items():
        r, ly = plan.rank_of(a.stage), layers[a.stage]
        k = a.kind
        if k in (Kind.LOAD_F, Kind.LOAD_B):
            events[r].append((2 * t, mem.param_bytes(ly)))
        elif k is Kind.DROP_F:
            events[r].append((2 * t + 1, -mem.param_bytes(ly)))
        elif k is Kind.DROP_B:
            events[r].append((2 * t + 1, -mem.param_bytes(ly) - mem.grad_bytes(ly)))
        elif k is Kind.FWD and plan.fwd_only:              # nothing kept for a backward
            events[r].append((2 * t, mem.activation_bytes(ly)))
            events[r].append((2 * t + 1, -mem.activation_bytes(ly)))
        elif k is Kind.FWD:
            events[r].append((2 * t, mem.saved_bytes(ly, plan.recomputes(a.mb))))
        elif k is Kind.BWD:
            if a.mb == 0 and not plan.resident:
                events[r].append((2 * t, mem.grad_bytes(ly)))
            work = mem.backward_working_bytes(ly, plan.recomputes(a.mb))
            events[r].append((2 * t, work))
            events[r].append((2 * t + 1, -work - mem.saved_bytes(ly, plan.recomputes(a.mb))))
    peaks, steps = [], []
    for r in range(plan.num_ranks):
        cur = peak = base[r]
        at = 0
        for t2, delta in sorted(events[r]):
            cur += delta
            if cur > peak:
                peak, at = cur, t2 // 2
        peaks.append(peak)
        steps.append(at)
    return peaks, steps


def format_grid(plan: Plan, start: dict[Action, int], mark_step: int | None = None,
                mark_rank: int | None = None) -> str:
    """Rank-by-step grid of the actions that start at each step; `<-- here` marks a step."""
    cells: dict[int, dict[int, list[str]]] = defaultdict(lambda: defaultdict(list))
    for a, t in start.items():
        cells[t][plan.rank_of(a.stage)].append(str(a))
    last = max(list(cells) + [mark_step or 0]) if cells or mark_step is not None else -1
    width = max([8] + [len(",".join(v)) for row in cells.values() for v in row.values()])
    head = "step  " + " ".join(f"{'rank ' + str(r):<{width}}" for r in range(plan.num_ranks))
    lines = [head]
    for t in range(last + 1):
        row = " ".join(f"{','.join(cells[t][r]):<{width}}" for r in range(plan.num_ranks))
        mark = ""
        if t == mark_step:
            mark = "  <-- here" + (f" (rank {mark_rank})" if mark_rank is not None else "")
        lines.append(f"{t:4d}  {row}{mark}")
    return "\n".join(lines)


def validate(plan: Plan, *, memory: MemoryModel | None = None, capacity_bytes: int | None = None) -> DryRun:
    """Check a plan; returns its dry run (with the memory high-water mark) or raises PlanError."""
    _check_structure(plan)
    run = dry_run(plan, memory)
    st = run.start

    def fail(msg: str, a: Action) -> None:
        raise PlanError(f"{msg}\n{format_grid(plan, st, st.get(a), plan.rank_of(a.stage))}")

    _check_matching(plan, st, fail)

    drops = {(a.stage, a.kind): a for a in st if a.kind in (Kind.DROP_F, Kind.DROP_B)}
    loads: dict[int, list[Action]] = defaultdict(list)
    for a in st:
        if a.kind in (Kind.LOAD_F, Kind.LOAD_B):
            loads[a.stage].append(a)
    for a, t in sorted(st.items(), key=lambda kv: kv[1]):
        if a.kind is Kind.FWD:
            if a.stage > 0:
                prev = Action(a.stage, Kind.RECV_F, a.mb)
                prev = prev if prev in st else Action(a.stage - 1, Kind.FWD, a.mb)
                if st[prev] >= t:
                    fail(f"{a} starts before its input {prev} has arrived", a)
        if a.kind is Kind.BWD:
            fwd = Action(a.stage, Kind.FWD, a.mb)
            if fwd not in st or st[fwd] >= t:
                fail(f"{a} starts before its forward {fwd} has finished", a)
            if a.stage < plan.num_stages - 1:
                prev = Action(a.stage, Kind.RECV_B, a.mb)
                prev = prev if prev in st else Action(a.stage + 1, Kind.BWD, a.mb)
                if st.get(prev, t) >= t:
                    fail(f"{a} starts before its output gradient {prev} has arrived", a)
        if a.kind in (Kind.FWD, Kind.BWD) and not plan.resident:
            want = Kind.LOAD_B if a.kind is Kind.BWD else Kind.LOAD_F
            cands = [ld for ld in loads[a.stage] if st[ld] < t]
            loaded = [ld for ld in cands if ld.kind is want] or (
                [ld for ld in cands if ld.kind is Kind.LOAD_F] if a.kind is Kind.BWD else [])
            if not loaded:
                fail(f"{a} uses stage {a.stage}'s parameters before they are loaded", a)
            drop = drops.get((a.stage, Kind.DROP_F))
            if a.kind is Kind.FWD and drop is not None and st[drop] <= t:
                fail(f"{a} runs after stage {a.stage} was dropped by {drop}", a)
            if a.kind is Kind.BWD and drop is not None and loaded[-1].kind is Kind.LOAD_F:
                fail(f"{a} runs on parameters dropped by {drop} and never reloaded", a)
        if a.kind is Kind.UPDATE and not plan.fwd_only:
            last_b = Action(a.stage, Kind.BWD, plan.micro_batches - 1)
            if st.get(last_b, t) >= t:
                fail(f"{a} updates stage {a.stage} before its backward {last_b} has finished", a)
    if memory is not None and capacity_bytes is not None:
        for r, peak in enumerate(run.peak_bytes):
            if peak > capacity_bytes:
                step = run.peak_step[r]
                raise PlanError(f"rank {r} needs {peak / 1e9:.2f} GB of GPU memory at step {step}, more than "
                                f"its {capacity_bytes / 1e9:.2f} GB\n{format_grid(plan, st, step, r)}")
    return run


def _check_structure(plan: Plan) -> None:
    seen: dict[Action, tuple[int, str]] = {}
    for rank, stream, a in plan.actions():
        if a in seen:
            raise PlanError(f"{a} appears twice (rank {seen[a][0]} {seen[a][1]} and rank {rank} {stream})")
        seen[a] = (rank, stream)
        if not 0 <= a.stage < plan.num_stages:
            raise PlanError(f"{a} names stage {a.stage}, but the plan has {plan.num_stages}")
        if plan.rank_of(a.stage) != rank:
            raise PlanError(f"{a} is on rank {rank}, but stage {a.stage} lives on rank {plan.rank_of(a.stage)}")
        want = STREAM_OF.get(a.kind)
        if a.kind is Kind.UPDATE:
            want = "compute" if plan.resident else "cpu"
        if stream != want:
            raise PlanError(f"{a} is on the {stream} stream; {a.kind.name} belongs on {want}")
        if a.mb is not None and not 0 <= a.mb < plan.micro_batches:
            raise PlanError(f"{a} names micro-batch {a.mb}, but the plan has {plan.micro_batches}")
    for a, ds in plan.deps.items():
        if a not in seen:
            raise PlanError(f"{a} has dependencies but is in no program")
        for d in ds:
            if d not in seen:
                raise PlanError(f"{a} depends on {d}, which is in no program")


def _check_matching(plan: Plan, start: dict[Action, int], fail) -> None:
    """Every send has its receive on the peer's rank, waiting for it, and vice versa."""
    pairs = {Kind.SEND_F: (Kind.RECV_F, 1), Kind.SEND_B: (Kind.RECV_B, -1)}
    for a in sorted(start, key=start.__getitem__):
        if a.kind in pairs:
            kind, step = pairs[a.kind]
            peer = Action(a.stage + step, kind, a.mb)
            if not 0 <= peer.stage < plan.num_stages:
                fail(f"{a} sends to stage {peer.stage}, which does not exist", a)
            if peer not in start:
                fail(f"{a} has no matching {peer} on rank {plan.rank_of(peer.stage)}", a)
            if a not in plan.deps_of(peer):
                fail(f"{peer} does not wait for its send {a}", peer)
        if a.kind in RECEIVES:
            step = -1 if a.kind is Kind.RECV_F else 1
            peer = Action(a.stage + step, Kind.SEND_F if step < 0 else Kind.SEND_B, a.mb)
            if peer not in start:
                fail(f"{a} has no matching send {peer}", a)
