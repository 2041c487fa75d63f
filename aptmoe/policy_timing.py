"""What the loading policy's answers cost the thread that asks, timed on this host.

The compute side asks the policy something at every layer of every micro-batch (the stage
walks, aptmoe/stage_walk.py): a forward hands it the predictor's and the gate's counts and
takes back the layer's placement; a backward takes the stage's placement, which APTMoE's
policy decides once per stage when the stage's backward begins (a split per layer, paper
Eq. 1, in numpy). In the executor the issuing thread makes these calls between a layer's gate
and its experts, so on a model whose steps are the host's each one delays the next launch:
on one H200, MoE-S8's APTMoE forwards spent a median 134 us from the gate's call to their
first expert's, Mobius's 43 (docs/measured/session35). The simulator charges the issuing
thread these figures for the calls its walks make (`Profile.policy_host`).

`time_policy_calls` drives each policy through whole plans as both back-ends do (the shared
stage walks; a copy lands at once, one after each step, and a block compute needs is demanded
and copied before it is used), timing every call the walks make, and returns the median
seconds of each kind of call per policy:

* ``predicted_counts``, ``gate_counts``, ``forward_placement``: one call each;
* ``backward_decide``: a backward placement that decided its stage, per layer of the stage;
* ``backward_placement``: one that found its stage decided.
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from dataclasses import dataclass

from aptmoe.config import ClusterConfig, Pipeline, PopularityConfig, RunConfig, ScheduleConfig, TrainConfig, moe_model
from aptmoe.costs import CostSource
from aptmoe.host import python_loop_s
from aptmoe.plan.actions import Block, Kind
from aptmoe.plan.builders import build_plan
from aptmoe.plan.validate import dry_run
from aptmoe.policy import LoadingPolicy, make_policy
from aptmoe.popularity import popularity_from_config
from aptmoe.profile import POLICY_HOST_CALLS, POLICY_HOST_POLICIES, PolicyHost
from aptmoe.stage_walk import RunBlocks, RunExperts, backward_walk, forward_walk

CALLS = POLICY_HOST_CALLS
POLICIES = dict(zip(POLICY_HOST_POLICIES, ("APTMoE", "Mobius")))     # each policy, by a schedule that has it


@dataclass(frozen=True)
class Shape:
    """The plans the policies are driven through: the matrix's MoE of 8 experts, one stage a
    layer and two layers a stage (a decision per stage covers one layer or two)."""
    experts: int = 8
    layers: int = 8
    micro_batches: int = 4
    gini: float = 0.45
    steps: int = 6


class WalkCalls:
    """A rank's policy as the stage walks ask it: each call the walks make goes through
    `around(kind, per, fn, *args)`, which calls `fn(*args)` and returns its answer; `kind` is
    the call's kind (`CALLS`) and `per` what its figure is per (a deciding backward
    placement's: the stage's layers). This module times them with it, the simulator charges
    the issuing thread for them (sim/engine.py)."""

    def __init__(self, policy: LoadingPolicy, layers: dict[int, tuple[int, ...]], around) -> None:
        self._p, self._layers, self._around = policy, layers, around

    def predicted_counts(self, *args):
        return self._around("predicted_counts", 1, self._p.predicted_counts, *args)

    def gate_counts(self, *args):
        return self._around("gate_counts", 1, self._p.gate_counts, *args)

    def forward_placement(self, *args):
        return self._around("forward_placement", 1, self._p.forward_placement, *args)

    def backward_placement(self, stage: int, layer: int):
        if self._p.backward_decided(stage):
            return self._around("backward_placement", 1, self._p.backward_placement, stage, layer)
        return self._around("backward_decide", len(self._layers[stage]), self._p.backward_placement, stage, layer)


def _config(pipeline: str, stages: int, shape: Shape) -> RunConfig:
    model = moe_model("S", shape.experts, num_layers=shape.layers)
    return RunConfig(model=model, cluster=ClusterConfig(gpus_per_node=1, topo="C1+G1", cores_per_socket=16),
                     train=TrainConfig(batch_size=4 * shape.micro_batches, num_chunks=shape.micro_batches),
                     schedule=ScheduleConfig(pipeline=Pipeline.parse(pipeline), num_stages=stages),
                     popularity=PopularityConfig(gini=shape.gini))


def _drive(cfg: RunConfig, cost: CostSource, times: dict[str, list[float]], steps: int) -> None:
    plan = build_plan(cfg, cost)
    policy = make_policy(plan, 0, cfg.model, cost, threads=cfg.cluster.worker_cores)
    if policy is None:
        raise ValueError(f"{cfg.schedule.pipeline.value} loads nothing: it has no policy to time")
    layers = {st.index: st.layers for st in plan.stages}

    def timing(kind: str, per: int, fn, *args):
        t = time.perf_counter()
        out = fn(*args)
        times[kind].append((time.perf_counter() - t) / per)
        return out

    timed = WalkCalls(policy, layers, timing)
    start = dry_run(plan).start
    order = [a for *_, a in sorted((start[a], i, a) for i, (r, _, a) in enumerate(plan.actions()) if r == 0)]
    pop = popularity_from_config(cfg)
    passes = {}

    def land_one() -> None:
        if (c := policy.next_copy()) is not None:
            policy.copy_finished(c)

    def use(stage: int, block) -> None:
        if not policy.is_loaded(stage, block):
            policy.require(stage, passes[stage], block)
            while not policy.is_loaded(stage, block):
                c = policy.next_copy()
                if c is None:
                    raise RuntimeError(f"the policy left {block} of stage {stage} unloaded with nothing to copy")
                policy.copy_finished(c)

    for i in range(steps):
        if i > 0:
            policy.prime_history(pop.iteration(i - 1).layer_totals())
        it = pop.iteration(i)
        for a in order:
            if a.kind in (Kind.LOAD_F, Kind.LOAD_B):
                passes[a.stage] = "B" if a.kind is Kind.LOAD_B else "F"
                policy.stage_load_begins(a.stage, passes[a.stage])
            elif a.kind in (Kind.DROP_F, Kind.DROP_B):
                policy.stage_dropped(a.stage)
            elif a.kind in (Kind.FWD, Kind.BWD):
                walk = forward_walk(a.stage, a.mb, layers[a.stage], timed, it.counts, it.predicted, moe=True) \
                    if a.kind is Kind.FWD else \
                    backward_walk(a.stage, a.mb, layers[a.stage], timed, it.counts, moe=True,
                                  recompute=plan.recomputes(a.mb))
                for step in walk:
                    if isinstance(step, RunBlocks):
                        for b in step.blocks:
                            use(a.stage, b)
                    elif isinstance(step, RunExperts):
                        for e in step.gpu:
                            use(a.stage, Block.expert_of(step.layer, e))
                    land_one()
        policy.end_iteration()


def measure_policy_host(cost: CostSource, shape: Shape = Shape()) -> PolicyHost:
    """`time_policy_calls` with the reference loop timed before and after them (their mean):
    the profile's `policy_host` section."""
    before = python_loop_s()
    seconds = time_policy_calls(cost, shape)
    return PolicyHost(seconds, (before + python_loop_s()) / 2)


def time_policy_calls(cost: CostSource, shape: Shape = Shape()) -> dict[str, dict[str, float]]:
    """Policy ("aptmoe", "stage") -> call kind (`CALLS`) -> median seconds on this host,
    each policy driven through plans of one and of two layers a stage on one rank."""
    out = {}
    for name, pipeline in POLICIES.items():
        times: dict[str, list[float]] = defaultdict(list)
        for per_stage in (1, 2):
            _drive(_config(pipeline, shape.layers // per_stage, shape), cost, times, shape.steps)
        out[name] = {k: statistics.median(times[k]) for k in CALLS if times[k]}
    return out
