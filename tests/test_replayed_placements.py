"""aptmoe/replayed_placements.py: a prediction on a run's own CPU placements."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from aptmoe.cpu_jobs_alike import cpu_jobs_alike
from aptmoe.policy import Placement
from aptmoe.replayed_placements import ReplayedPolicy, RunPlacements, run_placements
from aptmoe.stored import read_json, stored_file
from aptmoe.trace import Trace, action_runs, is_cpu_job, run_trace

CELL = Path(__file__).resolve().parent.parent / "docs" / "validation-h200-2gpu-v7-fresh" / "cells" / "M6x4-G0.5-cap8-2gpu"


def _real() -> Trace:
    if not CELL.is_dir():
        pytest.skip("the stored v7-fresh matrix is not in this tree")
    return Trace.load(run_trace(CELL / "real", "APTMoE"))


def test_a_runs_placements_are_its_cpu_lanes_expert_jobs() -> None:
    trace = _real()
    p = run_placements(trace)
    assert p.steps == 3
    jobs = [e for e in trace.events if is_cpu_job(e)]
    run_of = action_runs(trace)
    fwd = [e for e in jobs if "F" in run_of(e)[0]]
    # every forward job, one expert each, is in its (rank, step, stage, mb, layer)'s set
    assert sum(len(v) for v in p.forward.values()) == len(fwd) == 35
    first = min(fwd, key=lambda e: e.start_s)
    stage, mb = int(first.name[0]), int(first.name.split("@")[0][2:])
    assert set(first.args["experts"]) <= p.forward[(first.rank, run_of(first)[1], stage, mb, first.args["layer"])]
    # a backward's set is its micro-batches' union; its recompute jobs add nothing
    bwd = [e for e in jobs if "B" in run_of(e)[0]]
    assert {(e.rank, run_of(e)[1], int(e.name[0]), e.args["layer"]) for e in bwd} == set(p.backward)
    assert all(set(e.args["experts"]) <= p.backward[(e.rank, run_of(e)[1], int(e.name[0]), e.args["layer"])]
               for e in bwd)


class _Inner:
    """A policy that puts every expert with tokens on the GPU."""

    def __init__(self) -> None:
        self.on_work = None
        self.asked: list[tuple] = []

    def gate_counts(self, stage, layer, mb, counts) -> Placement:
        self.asked.append(("gate", stage, layer, mb))
        return Placement(tuple(e for e, n in enumerate(counts) if n), ())

    def backward_placement(self, stage, layer) -> Placement:
        return Placement((0, 1, 3), ())

    def forward_placement(self, layer, mb):
        return "the inner's own"

    def next_copy(self):
        return "a copy"


def test_the_wrapped_policy_still_decides_and_the_compute_gets_the_runs_places() -> None:
    run = RunPlacements(forward={(1, 2, 0, 3, 5): frozenset({2, 7})}, backward={(1, 2, 0, 5): frozenset({3})})
    inner = _Inner()
    p = ReplayedPolicy(inner, run, rank=1, step=2)
    assert p.gate_counts(0, 5, 3, [4, 0, 9, 1]) == Placement((0, 3), (2,))     # 7 had no tokens here
    assert inner.asked == [("gate", 0, 5, 3)]                                  # the policy saw the counts
    assert p.forward_placement(5, 3) == Placement((0, 3), (2,))
    assert p.forward_placement(5, 2) is None                                   # not yet gated
    assert p.gate_counts(0, 6, 3, [1, 1]) == Placement((0, 1), ())             # the run had no CPU job there
    assert p.backward_placement(0, 5) == Placement((0, 1), (3,))
    assert ReplayedPolicy(inner, run, rank=1, step=1).backward_placement(0, 5) == Placement((0, 1, 3), ())
    p.on_work = "set by the back-end"
    assert inner.on_work == "set by the back-end" and p.next_copy() == "a copy"


def test_a_prediction_on_the_runs_placements_makes_the_runs_cpu_jobs(tmp_path) -> None:
    """v7-fresh's M6 capped APTMoE (session 24): on its own placements the prediction made all
    67 of the run's CPU jobs and no other, and its error went from -6.5% to -0.9%."""
    trace = _real()
    real_dir = tmp_path / "real"
    shutil.copytree(CELL / "real", real_dir)
    from aptmoe.profile import load_profile
    from aptmoe.sim.validate import compare_run

    rows = {r["pipeline"]: r for r in compare_run(real_dir, load_profile("h200-2gpu"), tmp_path, ["test"], plot=False,
                                                   replay=True)}
    apt = rows["APTMoE"]
    assert apt["replayed_placements"] and apt["cpu_jobs"] == {"measured": 67, "predicted": 67, "shared": 67}
    assert abs(apt["error"]) < 0.02
    assert cpu_jobs_alike(trace, Trace.load(tmp_path / "trace-APTMoE-predicted.json")).alike == 1.0
    # the schedules without CPU experts are predicted as without replaying
    (tmp_path / "plain").mkdir()
    before = {r["pipeline"]: r for r in compare_run(real_dir, load_profile("h200-2gpu"), tmp_path / "plain", ["test"],
                                                    plot=False)}
    assert rows["Mobius"]["predicted_s"] == pytest.approx(before["Mobius"]["predicted_s"], rel=1e-9)


def test_replaying_needs_the_runs_trace(tmp_path) -> None:
    if not CELL.is_dir():
        pytest.skip("the stored v7-fresh matrix is not in this tree")
    real_dir = tmp_path / "real"
    real_dir.mkdir()
    kept = stored_file(CELL / "real" / "results.json")          # results.json.xz, as stored
    shutil.copy(kept, real_dir / kept.name)
    from aptmoe.profile import load_profile
    from aptmoe.sim.validate import validate_schedule

    real = read_json(real_dir / "results.json")["schedules"]["APTMoE"]
    with pytest.raises(ValueError, match="--replay-placements needs the run's trace"):
        validate_schedule("APTMoE", real, real_dir, load_profile("h200-2gpu"), tmp_path, plot=False, replay=True)


def test_the_flag_is_validates_own_and_the_matrix_records_it() -> None:
    from aptmoe.sim.validate import executor_argv, make_validate_parser

    assert executor_argv(["--replay-placements", "--gini", "0.5", "-q"]) == ["--gini", "0.5"]
    assert make_validate_parser("aptmoe-sim").parse_args(["--calibration", "h200-2gpu",
                                                          "--replay-placements"]).replay_placements


def test_every_prediction_also_says_its_error_on_the_runs_placements(tmp_path) -> None:
    """Without the flag the prediction is the policy's own (-6.5% when this was written; -4.8%
    since h200-2gpu has the loss's and the embedding's GPU curves, session 42, against +0.9% on
    the run's placements), and the row also carries the error on the run's placements; the
    matrix shows it beside "CPU jobs alike"."""
    if not CELL.is_dir():
        pytest.skip("the stored v7-fresh matrix is not in this tree")
    real_dir = tmp_path / "real"
    shutil.copytree(CELL / "real", real_dir)
    from aptmoe.profile import load_profile
    from aptmoe.sim.matrix import matrix_table, placements_lines
    from aptmoe.sim.validate import compare_run, validation_table

    rows = {r["pipeline"]: r for r in compare_run(real_dir, load_profile("h200-2gpu"), tmp_path, ["test"], plot=False)}
    apt = rows["APTMoE"]
    assert not apt["replayed_placements"] and apt["cpu_jobs"]["shared"] < 67
    # the run's own placements take most of the error away
    assert apt["error"] < -0.04 and abs(apt["error_replayed"]) < 0.02 and apt["error_replayed"] - apt["error"] > 0.04
    assert "error_replayed" not in rows["Mobius"]                      # no CPU job: nothing to replay
    assert "error on run's placements" in validation_table(list(rows.values()))
    runs = [{"cell": "c", "set": "held-back", "pipeline": "APTMoE", "measured_s": 1.0, "predicted_s": 0.9,
             "error": -0.1, "cpu_jobs_alike": 0.5, "error_replayed": -0.02},
            {"cell": "c", "set": "held-back", "pipeline": "GPipe", "measured_s": 1.0, "predicted_s": 1.0,
             "error": 0.0, "cpu_jobs_alike": None, "error_replayed": None}]
    assert "on run's placements" in matrix_table(runs).splitlines()[0] and "-2.0%" in matrix_table(runs)
    (line, _) = placements_lines(runs)
    assert "the 1 runs with CPU expert jobs" in line and "10.0% as predicted and 2.0%" in line
    assert placements_lines(runs[1:]) == []
