"""Simulate a config: plan it, step it, and report the metrics both back-ends share.

Metric keys are namespaced (see docs/metrics.md): ``time/iteration_s``,
``throughput/seq_per_s``, ``mem/peak_gpu_bytes``, ``link/h2d_bytes``, ``busy/compute``,
``cpu/expert_share``, ... The four keys every results.json entry has at top level
(``iteration_s``, ``throughput_seq_per_s``, ``oom``, ``peak_gpu_bytes``) are the same for
the simulator and the executor.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

from aptmoe.sim.engine import OutOfMemory, StepModel

from aptmoe.config import RunConfig
from aptmoe.costs import CostSource
from aptmoe.metrics import shared_metrics
from aptmoe.plan.builders import build_plan
from aptmoe.plan.plan import Plan
from aptmoe.plan.validate import validate
from aptmoe.popularity import popularity_from_config
from aptmoe.profile import Profile, cost_for
from aptmoe.replayed_placements import RunPlacements
from aptmoe.trace import Trace


@dataclass
class SimResult:
    pipeline: str
    iteration_s: float | None
    throughput_seq_per_s: float | None
    oom: bool
    peak_gpu_bytes: int
    num_stages: int
    metrics: dict[str, float] = field(default_factory=dict)
    oom_detail: str | None = None
    peak_gpu_bytes_per_rank: list[int] = field(default_factory=list)
    fallbacks: list[str] = field(default_factory=list)
    config: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"pipeline": self.pipeline, "iteration_s": self.iteration_s,
                "throughput_seq_per_s": self.throughput_seq_per_s, "oom": self.oom,
                "peak_gpu_bytes": self.peak_gpu_bytes, "peak_gpu_bytes_per_rank": self.peak_gpu_bytes_per_rank,
                "num_stages": self.num_stages,
                "oom_detail": self.oom_detail, "metrics": self.metrics,
                "fallbacks": self.fallbacks, "config": self.config}


def _cost(cfg: RunConfig, source: Profile | str | CostSource) -> CostSource:
    return source if hasattr(source, "gpu_s") else cost_for(cfg, source)


def simulate(cfg: RunConfig, profile: Profile | str | CostSource = "a800-paper", *, trace: Trace | None = None,
             measured_steps: int | None = None, plan: Plan | None = None, check_plan: bool = True,
             plan_with: Profile | str | CostSource | None = None,
             placements: RunPlacements | None = None) -> SimResult:
    """Predict `cfg`'s step time; fills `trace` (if given) with every simulated action.

    `plan_with`: the costs the plan and the APTMoE policy's decisions are made with, where
    they are not the ones the step is timed with. A run planned with one profile and
    predicted with another (`aptmoe-sim validate`, a stored run predicted again) is then
    predicted with the run's own decisions: which experts go to the CPU, which loads are
    split, and the plan's layout are those the executor took.

    A given `plan` is validated first unless `check_plan` is false (the caller built it with
    `build_plan`, whose plans are property-tested to validate; at 256 GPUs the check costs
    a fifth of the run). A stalled simulation is reported either way.

    `placements`: a run's own CPU placements (aptmoe/replayed_placements.py), which APTMoE's
    policies then hand the compute instead of their own, step by step; a run and its
    prediction then differ only in what the work costs."""
    cost = _cost(cfg, profile)
    decide = cost if plan_with is None else _cost(cfg, plan_with)
    if plan is None:
        plan = build_plan(cfg, decide)
    elif check_plan:
        validate(plan)                  # ordering, matching, no deadlock
    pop = popularity_from_config(cfg)
    warm = cfg.train.num_warmup_steps
    steps = measured_steps if measured_steps is not None else cfg.train.num_training_steps
    times, stats = [], []
    t0 = 0.0
    base = dict(pipeline=plan.pipeline, num_stages=plan.num_stages, config=cfg.to_dict())
    for j in range(steps):
        i = warm + j
        history = pop.iteration(i - 1).layer_totals() if i > 0 else None
        model = None
        try:
            model = StepModel(cfg, plan, cost, pop.iteration(i), history, trace, t0, decide=decide,
                              replay=None if placements is None else (placements, j))
            st = model.run()
        except OutOfMemory as e:
            peak = max([e.need] + ([r.peak for r in model.ranks] if model is not None else []))
            return SimResult(iteration_s=None, throughput_seq_per_s=None, oom=True, peak_gpu_bytes=peak,
                             oom_detail=str(e), fallbacks=sorted(cost.fallbacks), **base)
        times.append(st.step_s)
        stats.append(st)
        t0 += st.step_s
    G = plan.num_ranks
    m = shared_metrics(cfg, times, G, busy_s=[{res: sum(v) for res, v in st.busy_s.items()} for st in stats],
                       expert_tokens=(sum(st.expert_tokens_cpu for st in stats),
                                      sum(st.expert_tokens_gpu for st in stats)),
                       phase_bytes=[st.bytes_by_phase for st in stats], phase_copies=[st.copies_by_phase for st in stats],
                       measured=[pop.iteration(warm + j) for j in range(steps)])
    step_s = m["time/iteration_s"]
    m["mem/peak_gpu_bytes"] = max(max(st.peak_gpu_bytes) for st in stats)
    for link in ("h2d", "d2h", "p2p"):
        m[f"link/{link}_bytes"] = statistics.fmean(st.bytes.get(link, 0.0) for st in stats)
    per_rank = [max(st.peak_gpu_bytes[r] for st in stats) for r in range(G)]
    return SimResult(iteration_s=step_s, throughput_seq_per_s=cfg.train.batch_size / step_s, oom=False,
                     peak_gpu_bytes=int(m["mem/peak_gpu_bytes"]), peak_gpu_bytes_per_rank=per_rank, metrics=m,
                     fallbacks=sorted(cost.fallbacks), **base)
