"""Which experts a run and its prediction computed on the CPU, compared.

APTMoE's policy (aptmoe/policy.py) places experts from the moment's state: what has loaded,
how much Adam is done, how fast CPU experts have run. Both back-ends run the same policy, each
on its own clock, so where the prediction's timing is off, its decisions differ from the run's
too. In v7-fresh's M6 capped APTMoE run (session 23) the run had 20 backward CPU jobs and its
prediction 8, and 12 recompute jobs the prediction did not have. The per-action errors compare
only the jobs both made; this says how many that is.
"""

from __future__ import annotations

from dataclasses import dataclass

from aptmoe.trace import Trace, action_runs, is_cpu_job


def cpu_jobs(trace: Trace) -> set[tuple[int, str, int, str]]:
    """(rank, job, step, category) of each CPU expert job of `trace`: `0F2@0:e3` in step 1, its
    category telling a backward's job from its recompute's (they share the action's name)."""
    run_of = action_runs(trace)
    return {(e.rank, e.name, run_of(e)[1], e.cat) for e in trace.events if is_cpu_job(e)}


@dataclass(frozen=True)
class CpuJobsAlike:
    """How many CPU expert jobs the run had, how many its prediction had, and how many of
    them both (the same rank, job, step and category)."""
    measured: int
    predicted: int
    shared: int

    @property
    def alike(self) -> float | None:
        """The shared jobs over the jobs either had (1: the same decisions; None: no CPU job)."""
        either = self.measured + self.predicted - self.shared
        return self.shared / either if either else None


def cpu_jobs_alike(real: Trace, predicted: Trace) -> CpuJobsAlike:
    ran, foreseen = cpu_jobs(real), cpu_jobs(predicted)
    return CpuJobsAlike(len(ran), len(foreseen), len(ran & foreseen))
