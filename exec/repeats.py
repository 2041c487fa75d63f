"""`aptmoe-run --repeats N`: each schedule run N times, each time in fresh processes, and the
run of median step time kept.

On nvidia-h200-x2 identical MoE-S8 GPipe work ran 0.14 to 0.30 s/step from one process to
the next, while one run's steps agreed within a few percent (docs/validation-h200-2gpu-v3).
More steps do not help there, but more runs do. The repeats go round the schedules (all
schedules once, then all again), so a slow period of the machine falls on every schedule
alike. The kept run's result, trace, parameters and torch profiles are the schedule's. Its
result also lists every run's step time in the order they ran (`repeats`).
"""

from __future__ import annotations

import os
from pathlib import Path


# What one launch of a schedule leaves in the staging folder besides its result.
_PATTERNS = ("trace-{name}.json", "params-{name}-rank*.pt", "torch-{name}-rank*.json.gz")


def _files(tmp: Path, name: str) -> list[Path]:
    return [f for pattern in _PATTERNS for f in sorted(tmp.glob(pattern.format(name=name)))]


def _stashed(path: Path, rep: int) -> Path:
    return path.with_name(f"{path.name}.rep{rep}")


def stash(tmp: Path, name: str, rep: int) -> None:
    """Set launch `rep`'s files aside, so the next launch of `name` cannot overwrite them."""
    for f in _files(tmp, name):
        if f.exists():
            os.replace(f, _stashed(f, rep))


def median_index(times: list[float]) -> int:
    """The run whose step time is the median (the lower of the middle two for an even count)."""
    order = sorted(range(len(times)), key=lambda i: (times[i], i))
    return order[(len(times) - 1) // 2]


def keep_median(tmp: Path, name: str, runs: list[dict]) -> dict:
    """The result of the median run of `name` with `repeats` added; its stashed files put back
    under their own names, the other runs' removed."""
    times = [r["iteration_s"] for r in runs]
    k = median_index(times)
    for f in [f for pattern in _PATTERNS for f in tmp.glob(pattern.format(name=name) + ".rep*")]:
        original, _, rep = f.name.rpartition(".rep")
        if int(rep) == k:
            os.replace(f, f.with_name(original))
        else:
            f.unlink()
    return {**runs[k], "repeats": {"iteration_s": times, "kept": k}}


__all__ = ["keep_median", "median_index", "stash"]
