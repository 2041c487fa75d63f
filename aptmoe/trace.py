"""One trace schema for both back-ends: Chrome Trace Event JSON, in microseconds.

Each complete event (``"ph": "X"``) has ``pid`` = rank, ``tid`` = stream index (names in
``TRACE_STREAMS``, given by thread_name metadata so Perfetto and chrome://tracing label rows),
``name`` = the plan action's printed form (``2F0``, ``5LF@12:e3``, ``2F0@12:e3`` for a CPU
expert), ``cat`` = what it is for colouring (one of ``CATEGORIES``), ``ts``/``dur`` in
microseconds, and ``args`` with at least ``source`` ("sim" or "real") and, where they apply,
``layer``, ``experts``, ``bytes``, ``phase``, ``stage``, ``mb``. A measured block call also has
``host_us`` (its issuing thread's wall time) and ``run_us`` (that thread's CPU time over it); a
measured CPU expert or Adam chunk ``run_us`` and, where Linux keeps it, ``queued_us`` (its
thread's wait for a core: aptmoe.exec.thread_clock).
"""

from __future__ import annotations

import bisect
import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from aptmoe.atomic import write_json_atomic
from aptmoe.plan.plan import STREAMS
from aptmoe.stored import CORRUPT, kept, open_text, stored_file

__all__ = ["Trace", "TraceEvent", "TraceError", "CATEGORIES", "CPU_JOB_PHASES", "TRACE_STREAMS", "block_kind",
           "action_runs", "by_occurrence", "call_kind", "is_action", "is_block_call", "is_cpu_job", "is_load", "run_trace",
           "write_json_atomic"]

US_PER_S = 1_000_000

# What an event is, for plots and filters.
CATEGORIES = (
    "forward", "backward",            # compute stream, GPU work of a stage and micro-batch
    "recompute",                       # forward again from a stage checkpoint, before its backward
    "cpu-expert",                      # expert FFN on the CPU (cpu stream)
    "cpu-job",                         # a layer's CPU experts from hand-over to outputs landed (cpu-jobs)
    "load-inter-stage", "load-inter-layer", "load-inter-expert", "load-stage",   # host -> GPU
    "offload",                         # GPU -> host gradients
    "update",                          # optimizer step
    "send", "recv",                    # activations between ranks
    "wait",                            # compute stalled on a block or a receive
    "marker",                          # instant: a stage's load window opens, a drop
)


# The lanes of a trace: the plan's streams, then those only a trace has. A CPU job's span
# (hand-over to outputs landed) holds its experts' and other jobs' work on the cpu lane, and
# lanes hold nested events only (Perfetto draws a lane's events as a stack).
TRACE_STREAMS = (*STREAMS, "cpu-jobs")

# A `cpu-job` event's phases, each an arg `<phase>_us`: waiting for the CPU (the worker busy
# with another job, or the simulator's CPU resource), for its inputs to be computed on the GPU,
# their copy to host memory, the experts computing, and their outputs' copy back until the
# waiter hears of it. The executor runs them in this order; the simulator copies down first.
CPU_JOB_PHASES = ("queue", "ready", "down", "compute", "up")


class TraceError(ValueError):
    pass


def run_trace(folder: str | Path, name: str) -> Path | None:
    """The measured trace of schedule `name` in a run's folder: `trace-NAME.json`, or the
    `.json.gz` or `.json.xz` a stored run keeps instead (aptmoe.stored); None where it has none."""
    return stored_file(Path(folder) / f"trace-{name}.json")


def run_traces(folder: str | Path, names) -> dict[str, "Trace"]:
    """The measured traces of the schedules `names` that a run's folder has (`run_trace`), read,
    by schedule; a trace that cannot be read is one ValueError naming the folder."""
    found = {name: p for name in names if (p := run_trace(folder, name)) is not None}
    try:
        return {name: Trace.load(p) for name, p in found.items()}
    except (OSError, ValueError, KeyError, *CORRUPT) as e:
        raise ValueError(f"{folder}: a trace that cannot be read ({e})") from None


PASS_CATEGORIES = ("forward", "backward", "recompute")     # a block call's pass
PASS_LETTERS = {"forward": "f", "backward": "b", "recompute": "r"}
CPU_EXPERT_CATEGORIES = ("cpu-expert", "recompute")     # a cpu lane's expert jobs (its "update" is Adam)
ACTION_CATEGORIES = ("forward", "backward")                 # an action's: its recompute runs inside its backward


def is_block_call(e: "TraceEvent") -> bool:
    """A call of one block on the compute stream (`0F3@12:e5`): the executor's, with its host
    time, or the simulator's."""
    return e.stream == "compute" and e.cat in PASS_CATEGORIES and block_kind(e.name) is not None


def is_load(e: "TraceEvent") -> bool:
    """A copy of a block's parameters to the device (`0LF@2:e5`, category load-<its phase>)."""
    return e.stream == "load" and e.cat.startswith("load-")


def is_cpu_job(e: "TraceEvent") -> bool:
    """An expert job on a rank's CPU lane (`0F3@12:e5`, a forward's or a backward's, or a
    recompute's); the lane's other work is Adam (category update)."""
    return e.stream == "cpu" and e.cat in CPU_EXPERT_CATEGORIES


def by_occurrence(events, key) -> dict[tuple, "TraceEvent"]:
    """Each event under `key(event)` plus its occurrence (how many events of that key started
    before it): how a run and its prediction name the same action or call."""
    seen: dict[tuple, int] = defaultdict(int)
    out = {}
    for e in sorted(events, key=lambda e: e.start_s):
        k = key(e)
        out[(*k, seen[k])] = e
        seen[k] += 1
    return out


def message_ends(trace: "Trace", cats: tuple[str, ...] = ("recv",)) -> dict[int, list[float]]:
    """When each rank's messages of these categories (`recv`, `send`) ended, sorted."""
    out: dict[int, list[float]] = defaultdict(list)
    for e in trace.events:
        if e.cat in cats:
            out[e.rank].append(e.end_s)
    for v in out.values():
        v.sort()
    return out


def is_action(e: "TraceEvent") -> bool:
    """A stage's forward or backward of one micro-batch on the compute stream (`0F3`): the span
    that holds its block calls."""
    return e.stream == "compute" and e.cat in ACTION_CATEGORIES and block_kind(e.name) is None


def action_runs(trace: "Trace"):
    """A function from an event of `trace` to (its action, e.g. `0F3` for `0F3@12:e5`, and which
    run of that action it belongs to, the step, counted from 0). An action runs once a step
    under one name on its rank, so the run is the last of the action's starts (its forward or
    backward span on the compute stream) at or before the event's: a block call, or a CPU job
    that the action handed over. -1 before the action's first start."""
    starts: dict[tuple[int, str], list[float]] = {}
    for e in trace.events:
        if is_action(e):
            starts.setdefault((e.rank, e.name), []).append(e.start_s)
    for v in starts.values():
        v.sort()

    def run_of(e: "TraceEvent") -> tuple[str, int]:
        action = e.name.split("@", 1)[0]
        return action, bisect.bisect_right(starts.get((e.rank, action), []), e.start_s + 1e-9) - 1
    return run_of


def call_kind(e: "TraceEvent") -> str:
    """A block call's pass and block kind: `fe` an expert's forward, `ra` attention's recompute."""
    return PASS_LETTERS[e.cat] + block_kind(e.name)


def block_kind(name: str) -> str | None:
    """The kind of the one block an event names, a, g or e (`0F0@3:e5` -> e), or None where it
    names no single block (a stage's span, `0F0`)."""
    if "@" not in name or ":" not in name:
        return None
    return name.rsplit(":", 1)[1][:1] or None


@dataclass
class TraceEvent:
    name: str
    rank: int
    stream: str
    start_s: float
    end_s: float
    cat: str
    args: dict = field(default_factory=dict)

    @property
    def dur_s(self) -> float:
        return self.end_s - self.start_s


@dataclass
class Trace:
    source: str                                    # "sim" or "real"
    events: list[TraceEvent] = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    def add(self, name: str, rank: int, stream: str, start_s: float, end_s: float, cat: str, **args) -> None:
        self.events.append(TraceEvent(name, rank, stream, start_s, end_s, cat, args))

    @property
    def num_ranks(self) -> int:
        return 1 + max((e.rank for e in self.events), default=-1)

    def span_s(self) -> float:
        if not self.events:
            return 0.0
        return max(e.end_s for e in self.events) - min(e.start_s for e in self.events)

    # -------------------------------------------------------------- Chrome trace JSON
    def to_chrome(self) -> dict:
        out = []
        for r in range(self.num_ranks):
            out.append({"ph": "M", "name": "process_name", "pid": r, "tid": 0, "args": {"name": f"rank {r}"}})
            for i, s in enumerate(TRACE_STREAMS):
                out.append({"ph": "M", "name": "thread_name", "pid": r, "tid": i, "args": {"name": s}})
        for e in self.events:
            out.append({"name": e.name, "cat": e.cat, "ph": "X", "pid": e.rank, "tid": TRACE_STREAMS.index(e.stream),
                        "ts": round(e.start_s * US_PER_S, 3), "dur": round(e.dur_s * US_PER_S, 3),
                        "args": {"source": self.source, **e.args}})
        return {"traceEvents": out, "displayTimeUnit": "ms",
                "otherData": {"schema": "aptmoe-trace/1", "source": self.source, "time_unit": "us", **self.meta}}

    def save(self, path: str | Path) -> None:
        write_json_atomic(path, self.to_chrome())

    @classmethod
    def from_chrome(cls, d: dict) -> "Trace":
        if not isinstance(d, dict) or "traceEvents" not in d:
            raise TraceError("not a Chrome trace: no traceEvents")
        other = dict(d.get("otherData", {}))
        if other.get("time_unit", "us") != "us":
            raise TraceError(f"trace time unit {other.get('time_unit')!r}; aptmoe traces are in us")
        source = other.pop("source", "sim")
        other.pop("schema", None)
        other.pop("time_unit", None)
        tr = cls(source=source, meta=other)
        for ev in d["traceEvents"]:
            if ev.get("ph") != "X":
                continue
            try:
                args = dict(ev.get("args", {}))
                args.pop("source", None)
                tid = ev["tid"]
                stream = TRACE_STREAMS[tid] if isinstance(tid, int) else str(tid)
                start = ev["ts"] / US_PER_S
                tr.events.append(TraceEvent(ev["name"], int(ev["pid"]), stream, start,
                                            start + ev["dur"] / US_PER_S, ev.get("cat", ""), args))
            except (KeyError, TypeError, IndexError) as e:
                raise TraceError(f"malformed trace event {ev!r}: {e}") from None
        return tr

    @classmethod
    def load(cls, path: str | Path) -> "Trace":
        """A trace file, plain or compressed (``.json.gz``, ``.json.xz``: aptmoe.stored). A plain
        name that is not there reads the compressed file a stored run keeps in its place."""
        source = kept(path)
        try:
            with open_text(source) as f:
                d = json.load(f)
        except FileNotFoundError:
            raise TraceError(f"trace file {path} does not exist") from None
        except (json.JSONDecodeError, UnicodeDecodeError, *CORRUPT) as e:
            raise TraceError(f"trace file {source} is not JSON: {e}") from None
        return cls.from_chrome(d)
