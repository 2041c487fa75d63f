"""The metrics both back-ends report with the same meaning (docs/metrics.md), computed once.

The simulator and the executor gather different raw figures (modelled holds, measured
trace intervals), but a prediction and a measurement only compare key by key if the keys
are computed the same way from them: step times, throughput, busy fractions, the CPU's
share of expert tokens, bytes per loading phase and the popularity achieved.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence

from aptmoe.config import RunConfig
from aptmoe.popularity import IterationCounts, gini_coefficient

RESOURCES = ("compute", "cpu", "h2d", "d2h", "net")


def shared_metrics(cfg: RunConfig, step_s: Sequence[float], ranks: int, *,
                   busy_s: Sequence[Mapping[str, float]], expert_tokens: tuple[int, int],
                   phase_bytes: Sequence[Mapping[str, float]], phase_copies: Sequence[Mapping[str, float]],
                   measured: Sequence[IterationCounts]) -> dict[str, float]:
    """Per measured step j: `step_s[j]`, `busy_s[j]` (resource -> seconds summed over the
    ranks), `phase_bytes[j]` / `phase_copies[j]` (loading phase -> summed over the ranks);
    `expert_tokens` = (on the CPU, on the GPU) over all steps; `measured` the popularity of
    each measured step."""
    it = statistics.fmean(step_s)
    m: dict[str, float] = {
        "time/iteration_s": it,
        "time/iteration_s_min": min(step_s),
        "time/iteration_s_max": max(step_s),
        "throughput/seq_per_s": cfg.train.batch_size / it,
        "throughput/tok_per_s": cfg.train.batch_size * cfg.model.seq_length / it,
    }
    for res in RESOURCES:
        m[f"busy/{res}"] = statistics.fmean(b.get(res, 0.0) / (ranks * s) for b, s in zip(busy_s, step_s))
    cpu, gpu = expert_tokens
    m["cpu/expert_share"] = cpu / (cpu + gpu) if cpu + gpu else 0.0
    for phase in sorted({p for step in phase_bytes for p in step}):
        m[f"load/{phase}_bytes"] = statistics.fmean(step.get(phase, 0) for step in phase_bytes)
        m[f"load/{phase}_copies"] = statistics.fmean(step.get(phase, 0) for step in phase_copies)
    m["popularity/G"] = statistics.fmean(x.G for x in measured)
    m["popularity/gini_coefficient"] = statistics.fmean(gini_coefficient(x.counts) for x in measured)
    return m
