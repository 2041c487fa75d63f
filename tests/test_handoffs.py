"""python -m aptmoe.sim.handoffs: the loading chain's hand-offs between the executor's threads."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from aptmoe.sim import handoffs
from aptmoe.trace import Trace

STORED_RUN = Path(__file__).resolve().parents[1] / "docs/measured/session38/adam-gaps/run-1"


def _chain(t: Trace, rank: int, at: float, off_drop: float, drop_window: float, window_copy: float) -> None:
    """Stage 3's offload ending at `at`, its drop, stage 2's window and its first copy after the given delays."""
    t.add("3O", rank, "offload", at - 0.004, at, "offload", bytes=1 << 20)
    t.add("3DB", rank, "offload", at + off_drop, at + off_drop, "marker")
    w = at + off_drop + drop_window
    t.add("2LB", rank, "load", w, w, "marker")
    t.add("2LB@2:a", rank, "load", w + window_copy, w + window_copy + 0.002, "load-stage", bytes=1 << 20)


def test_each_hand_off_is_read_per_rank() -> None:
    t = Trace("real")
    _chain(t, 0, 1.0, 400e-6, 150e-6, 350e-6)
    _chain(t, 1, 1.0001, 800e-6, 250e-6, 650e-6)      # another rank's chain: its own times
    got = handoffs.handoffs(t)
    assert set(got) == set(handoffs.HANDOFFS)
    for name, want in zip(handoffs.HANDOFFS, ((400e-6, 800e-6), (150e-6, 250e-6), (350e-6, 650e-6))):
        assert sorted(got[name]) == pytest.approx(want), name


def test_what_comes_too_late_or_on_another_rank_is_not_a_hand_off() -> None:
    t = Trace("real")
    t.add("3O", 0, "offload", 0.9, 1.0, "offload")
    t.add("3DB", 0, "offload", 1.06, 1.06, "marker")           # 60 ms on: not this offload's drop
    t.add("2LB", 0, "load", 1.07, 1.07, "marker")              # 10 ms after the drop: did not wait for it
    t.add("1LB", 1, "load", 1.0601, 1.0601, "marker")          # right after it, but on rank 1
    t.add("2LB@2:a", 0, "load", 1.2, 1.21, "load-stage")       # 130 ms after its window
    got = handoffs.handoffs(t)
    assert got == {"offload -> drop": [], "drop -> window": [], "window -> copy": []}


def test_a_simulated_chain_and_the_table(tmp_path, capsys) -> None:
    """A run folder with a measured and a predicted trace: both read, the medians in us."""
    real, sim = Trace("real"), Trace("sim")
    for k in range(3):
        _chain(real, 0, 1.0 + k, 400e-6 + k * 100e-6, 100e-6, 300e-6)
        _chain(sim, 0, 1.0 + k, 0.0, 0.0, 0.0)
    real.save(tmp_path / "trace-GPipeOffload.json")
    sim.save(tmp_path / "trace-GPipeOffload-predicted.json")
    assert handoffs.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if "GPipeOffload" in line).split()
    assert row[2:] == ["500", "(3)", "0", "100", "(3)", "0", "300", "(3)", "0"], row


def test_a_stored_run_without_predictions_and_bad_paths(tmp_path, capsys) -> None:
    """The CPU-job probe's stored runs (xz traces, measured only): each hand-off took time on
    the H200, the predicted column is empty; a missing folder or one without traces: one line."""
    run = tmp_path / "run"
    shutil.copytree(STORED_RUN, run)
    assert handoffs.main([str(run)]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("run ")]
    assert {r[1] for r in rows} == {"APTMoE", "Mobius"}
    for r in rows:
        assert r[4] == r[7] == r[10] == "-" and all(int(r[i]) > 100 for i in (2, 5, 8)), r
    assert handoffs.main([str(tmp_path / "nowhere")]) == 2
    assert "no such folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert handoffs.main([str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no measured trace" in err
