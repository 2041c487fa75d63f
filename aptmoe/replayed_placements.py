"""A run's own CPU placements, for a prediction that takes them instead of deciding.

APTMoE's policy (aptmoe/policy.py) places each expert on the GPU or the CPU from the moment's
state, on each back-end's own clock. Where a prediction's timing is off, its placements differ
from the run's as well: in v7-fresh's M6 capped APTMoE run 33 of the 90 CPU expert jobs that
the run or its prediction made were the same (aptmoe/cpu_jobs_alike.py). The step-time error
then mixes two things, what the model charges for the work and which work it chose. Predicted
with the run's own placements (`aptmoe-sim validate --replay-placements`), only the first is
left.

`run_placements` reads them from a run's trace: the CPU experts of each forward (rank, step,
stage, micro-batch, layer) and of each stage's backward (rank, step, stage, layer; one
placement for all of a backward's micro-batches, as the policy makes it). `ReplayedPolicy`
wraps a rank's policy for one step: the policy still decides and loads as it would (its
queues, its prefetches), but the placements it hands the compute are the run's. An expert the
run computed on the GPU and the policy did not load is demanded when its compute comes
(`require`), as any missing block is.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from aptmoe.plan.actions import Action, Kind
from aptmoe.policy import LoadingPolicy, Placement
from aptmoe.trace import Trace, action_runs, is_cpu_job


@dataclass(frozen=True)
class RunPlacements:
    """The CPU experts of a run: forward[(rank, step, stage, mb, layer)] and
    backward[(rank, step, stage, layer)]; a key that is missing had none."""
    forward: dict[tuple[int, int, int, int, int], frozenset[int]] = field(default_factory=dict)
    backward: dict[tuple[int, int, int, int], frozenset[int]] = field(default_factory=dict)

    @property
    def steps(self) -> int:
        return 1 + max((k[1] for k in (*self.forward, *self.backward)), default=-1)


def run_placements(trace: Trace) -> RunPlacements:
    """The CPU experts each forward and backward of `trace` computed (its `cpu` lanes' expert
    jobs; a recompute's job repeats its backward's experts and adds nothing)."""
    run_of = action_runs(trace)
    fwd: dict[tuple, set[int]] = defaultdict(set)
    bwd: dict[tuple, set[int]] = defaultdict(set)
    for e in trace.events:
        if not is_cpu_job(e) or e.cat == "recompute":
            continue
        name, step = run_of(e)
        action = Action.parse(name)
        if action.kind not in (Kind.FWD, Kind.BWD) or step < 0:
            raise ValueError(f"CPU job {e.name!r} of rank {e.rank} belongs to no action of the trace: is it "
                             f"an executor's trace of APTMoE?")
        layer, experts = int(e.args["layer"]), e.args["experts"]
        if action.kind is Kind.FWD:
            fwd[(e.rank, step, action.stage, action.mb, layer)].update(experts)
        else:
            bwd[(e.rank, step, action.stage, layer)].update(experts)
    return RunPlacements({k: frozenset(v) for k, v in fwd.items()}, {k: frozenset(v) for k, v in bwd.items()})


class ReplayedPolicy:
    """`inner`, a rank's policy for one step, whose placements are the run's (`placements`)."""

    def __init__(self, inner: LoadingPolicy, placements: RunPlacements, rank: int, step: int) -> None:
        self._inner, self._p, self._rank, self._step = inner, placements, rank, step
        self._forward: dict[tuple[int, int], Placement] = {}

    @staticmethod
    def _as_run(decided: Placement, cpu: frozenset[int]) -> Placement:
        # the experts with tokens are those the policy placed at all; the run's CPU set says where
        experts = sorted(set(decided.gpu) | set(decided.cpu))
        return Placement(tuple(e for e in experts if e not in cpu), tuple(e for e in experts if e in cpu))

    def gate_counts(self, stage: int, layer: int, mb: int, counts) -> Placement:
        placement = self._as_run(self._inner.gate_counts(stage, layer, mb, counts),
                                 self._p.forward.get((self._rank, self._step, stage, mb, layer), frozenset()))
        self._forward[(layer, mb)] = placement
        return placement

    def forward_placement(self, layer: int, mb: int) -> Placement | None:
        return self._forward.get((layer, mb))

    def backward_placement(self, stage: int, layer: int) -> Placement:
        return self._as_run(self._inner.backward_placement(stage, layer),
                            self._p.backward.get((self._rank, self._step, stage, layer), frozenset()))

    def __getattr__(self, attr):
        return getattr(self._inner, attr)

    def __setattr__(self, attr, value):
        # `on_work` and the like are set on the policy by the back-end: they belong to the inner one
        if attr.startswith("_"):
            object.__setattr__(self, attr, value)
        else:
            setattr(self._inner, attr, value)
