"""python -m aptmoe.sim.phases: per step and rank, the compute end and the tail after it, measured against predicted."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from aptmoe.sim import phases
from aptmoe.sim.phases import Phases
from aptmoe.stored import read_json
from aptmoe.trace import Trace, TraceError

CELL = Path(__file__).resolve().parents[1] / "docs/validation-h200-2gpu-v11-fresh/cells/M6x8-G0.45-cap8-2gpu"


def _trace(steps: int = 2, update_s: float = 0.25, source: str = "real") -> Trace:
    """`steps` steps of 2 s laid end to end, each starting 10 ms in with rank 0's forward.
    Rank 0: forward 10-100 ms, backward 300-500+10k ms (its recompute inside), Adam from 450 ms
    for `update_s` and a last chunk 950-1005 ms, after the step's last action and before the
    next step's first; a receive until 1200 ms. Rank 1: forward 100-200, backward 200-290, no
    update, its last event a receive ending at 330 ms; markers count for nothing."""
    t = Trace(source, meta={"pipeline": "Mobius"})
    for k in range(steps):
        t0 = 2.0 * k
        t.add("0F0", 0, "compute", t0 + 0.010, t0 + 0.100, "forward", stage=0, mb=0)
        t.add("0F0@0:a", 0, "compute", t0 + 0.011, t0 + 0.090, "forward", layer=0)
        t.add("wait 0:a", 0, "compute", t0 + 0.010, t0 + 0.011, "wait")
        t.add("0B0", 0, "compute", t0 + 0.300, t0 + 0.500 + 0.01 * k, "backward", stage=0, mb=0)
        t.add("0B0@0:a", 0, "compute", t0 + 0.300, t0 + 0.350, "recompute", layer=0)
        t.add("0B0@0:a", 0, "compute", t0 + 0.350, t0 + 0.490, "backward", layer=0)
        t.add("0U@0:a", 0, "cpu", t0 + 0.450, t0 + 0.450 + update_s, "update", chunk=0)
        t.add("0U@0:a", 0, "cpu", t0 + 0.950, t0 + 1.005, "update", chunk=1)
        t.add("0RB0", 0, "net", t0 + 0.400, t0 + 1.200, "recv")
        t.add("1DF", 1, "load", t0 + 0.900, t0 + 0.900, "marker")
        t.add("1F0", 1, "compute", t0 + 0.100, t0 + 0.200, "forward", stage=1, mb=0)
        t.add("1B0", 1, "compute", t0 + 0.200, t0 + 0.290, "backward", stage=1, mb=0)
        t.add("1RF0", 1, "net", t0 + 0.090, t0 + 0.330, "recv")
    return t


def test_compute_end_and_step_end_from_each_step_start() -> None:
    got = phases.phases(_trace())
    want = [Phases(0, 0, 0.490, 0.995), Phases(0, 1, 0.280, 0.320),
            Phases(1, 0, 0.500, 0.995), Phases(1, 1, 0.280, 0.320)]
    assert [(p.step, p.rank) for p in got] == [(p.step, p.rank) for p in want]
    for p, w in zip(got, want):
        assert p.compute_end_s == pytest.approx(w.compute_end_s) and p.step_end_s == pytest.approx(w.step_end_s)
    assert got[2].tail_s == pytest.approx(0.495)
    assert phases.step_starts(_trace(3)) == pytest.approx([0.010, 2.010, 4.010])


def test_only_the_timed_steps_count() -> None:
    got = phases.phases(_trace(3), timed=2)            # the first of three: warm-up
    assert [(p.step, p.rank) for p in got] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert got[0].compute_end_s == pytest.approx(0.500) and got[2].compute_end_s == pytest.approx(0.510)


def test_a_trace_against_itself_differs_by_nothing_and_a_longer_adam_only_in_the_tail() -> None:
    same = phases.compare(phases.phases(_trace()), phases.phases(_trace(source="sim")))
    assert len(same) == 4 and all(d.compute_s == d.tail_s == d.end_s == 0 for d in same)
    # Adam 1005 ms long: it, not the chunk at 950 ms, ends rank 0's step, 450 ms later
    late = phases.compare(phases.phases(_trace()), phases.phases(_trace(update_s=1.005)))
    assert [round(d.tail_s, 9) for d in late] == [0.45, 0.0, 0.45, 0.0]
    assert all(d.compute_s == 0 for d in late)


def test_the_compute_phase_splits_into_calls_between_them_and_outside_actions() -> None:
    slow = _trace(source="sim")
    for e in slow.events:
        if e.name == "0F0@0:a":                        # 5 ms longer, inside the same action
            e.end_s += 0.005
        if e.name == "1F0":                            # rank 1 starts its forward 20 ms later
            e.start_s += 0.020
    diffs = phases.compare(phases.phases(_trace()), phases.phases(slow))
    assert [(round(d.part_s("calls_s"), 9), round(d.part_s("between_s"), 9), round(d.part_s("outside_s"), 9))
            for d in diffs] == [(0.005, -0.005, 0.0), (0.0, -0.02, 0.02)] * 2
    assert all(d.compute_s == 0 for d in diffs)


def test_a_gap_inside_an_action_that_a_receive_ended_in_is_an_input_wait() -> None:
    t = _trace(1)
    for e in t.events:
        if e.name == "1RF0":                           # rank 1's activations come halfway through 1F0
            e.end_s = 0.150
        if e.name == "0RB0":                           # rank 0's gradient between its forward's calls...
            e.end_s = 0.095
    r0, r1 = phases.phases(t)
    assert r1.input_wait_s == pytest.approx(0.100) and r1.between_s == pytest.approx(0.090)   # 1F0 holds no calls
    assert r0.input_wait_s == pytest.approx(0.010) and r0.between_s == pytest.approx(0.011)   # 0F0@0:a ended at 90
    for e in t.events:
        if e.name == "0RB0":                           # ... or outside every action: not the action's wait
            e.end_s = 0.200
    assert phases.phases(t)[0].input_wait_s == 0


def test_a_gap_between_actions_that_a_message_ended_in_is_counted_apart() -> None:
    t = _trace(1)
    t.add("0SF0", 0, "net", 0.100, 0.150, "send")      # rank 0's send ends between 0F0 and 0B0
    r0, r1 = phases.phases(t)
    assert r0.message_gaps_s == pytest.approx(0.200) and r0.outside_s == pytest.approx(0.200)
    assert r1.message_gaps_s == 0                       # its actions are back to back


def test_actions_run_unequally_are_not_steps() -> None:
    t = _trace(2)
    t.events = [e for e in t.events if not (e.name == "1B0" and e.start_s > 2)]
    with pytest.raises(TraceError, match="1 to 2 times"):
        phases.step_starts(t)
    with pytest.raises(TraceError, match="no forward or backward action"):
        phases.step_starts(Trace("real"))


def _cell(root: Path, predicted: Trace | None) -> Path:
    real = root / "m" / "cells" / "S8-cap" / "real"
    real.mkdir(parents=True)
    _trace().save(real / "trace-Mobius.json")
    if predicted is not None:
        predicted.save(real.parent / "trace-Mobius-predicted.json")
    return root / "m"


def _rows(out: str, first: str) -> list[list[str]]:
    return [line.split() for line in out.splitlines() if line.startswith(first)]


def test_cli_prints_each_step_and_rank_and_the_medians(tmp_path, capsys) -> None:
    assert phases.main([str(_cell(tmp_path, _trace(update_s=1.005, source="sim")))]) == 0
    out = capsys.readouterr().out
    rows = _rows(out, "S8-cap")
    assert rows[0] == ["S8-cap", "Mobius", "0", "0", "490.0", "490.0", "505.0", "955.0", "995.0", "1445.0",
                       "+0.0", "+450.0", "+450.0"]
    assert rows[1][4:] == ["280.0", "280.0", "40.0", "40.0", "320.0", "320.0", "+0.0", "+0.0", "+0.0"]
    # the medians of 0 and 450; the compute phase's parts the same in both
    assert rows[-1] == ["S8-cap", "Mobius", "4", "+0.0", "+225.0", "+225.0", "+0.0", "+0.0", "+0.0", "+0.0", "+0.0"]


def test_cli_without_a_prediction_says_what_writes_it(tmp_path, capsys) -> None:
    matrix = _cell(tmp_path, None)
    assert phases.main([str(matrix)]) == 2
    err = capsys.readouterr().err
    assert "no predicted trace of Mobius" in err and f"--repredict --out {matrix}" in err
    assert phases.main([str(matrix / "cells" / "S8-cap"), "--measured-only"]) == 0
    out = capsys.readouterr().out
    # rank 0's calls 79 + 50 + 140 ms in actions of 90 and 200 (210 in step 1), from 10 ms to its compute end
    # (no receive ends inside an action here: no input wait)
    assert [r[2:] for r in _rows(out, "S8-cap")] == [
        ["0", "0", "490.0", "505.0", "995.0", "269.0", "21.0", "0.0", "200.0", "0.0"],
        ["0", "1", "280.0", "40.0", "320.0", "0.0", "190.0", "0.0", "90.0", "0.0"],
        ["1", "0", "500.0", "495.0", "995.0", "269.0", "31.0", "0.0", "200.0", "0.0"],
        ["1", "1", "280.0", "40.0", "320.0", "0.0", "190.0", "0.0", "90.0", "0.0"]]


@pytest.mark.parametrize("garble", ["missing", "json", "gzip", "empty"])
def test_cli_on_a_missing_or_garbled_path_is_one_line_and_exit_2(tmp_path, capsys, garble) -> None:
    if garble == "json":
        (tmp_path / "trace-Mobius.json").write_text("{not json")
    elif garble == "gzip":
        (tmp_path / "trace-Mobius.json.gz").write_bytes(b"\x1f\x8b\x08\x00garbled")
    elif garble == "empty":
        Trace("real").save(tmp_path / "trace-Mobius.json")
    path = tmp_path / "nowhere" if garble == "missing" else tmp_path
    assert phases.main([str(path), "--measured-only"]) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and captured.err.startswith("phases: error: ") and not captured.out


def test_cli_on_the_committed_measured_traces_gives_every_timed_step_and_rank(tmp_path, capsys) -> None:
    run = tmp_path / CELL.name / "real"                # the measured ones alone, as git has them
    shutil.copytree(CELL / "real", run)
    results = read_json(run / "results.json")["schedules"]
    assert phases.main([str(run), "--measured-only"]) == 0
    rows = _rows(capsys.readouterr().out, CELL.name)
    assert sorted({r[1] for r in rows}) == ["APTMoE", "GPipe", "GPipeOffload", "Mobius"]
    for name, res in results.items():
        mine = [r for r in rows if r[1] == name]
        ranks = len(res["peak_gpu_bytes_per_rank"])
        assert ranks == 2 and len(res["step_s"]) == 3
        assert [(int(r[2]), int(r[3])) for r in mine] == [(j, r) for j in range(3) for r in range(ranks)]
        for j, step_s in enumerate(res["step_s"]):
            ends = [float(r[6]) for r in mine if r[2] == str(j)]
            # a step's start (its first action) comes a little after the executor's clock starts
            assert 0 < step_s * 1e3 - max(ends) < 5, (name, j)
            assert all(float(r[4]) > 0 and float(r[5]) > 0 for r in mine)
