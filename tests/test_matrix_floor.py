"""`aptmoe-sim floor`: the same cells measured in several matrices, the least error one
prediction must make on them, and the rankings no prediction can get right in all."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aptmoe.sim import matrix_floor as mf
from aptmoe.sim.cli import main as sim_main

COMMAND = ["aptmoe-sim", "validate", "--calibration", "h200-1gpu", "--model_config=S", "--gini", "0.55"]


def _matrix(folder, runs: dict[str, dict[str, float]], command=COMMAND, plans: dict[str, str] | None = None) -> None:
    """A matrix folder: `runs` cell -> schedule -> measured s (each predicted at 0.3 s), each cell's
    cell.json with `command` and each schedule's plan (its own text unless `plans` gives one)."""
    lines = ["cell,set,pipeline,model,measured_s,predicted_s,error"]
    for cell, by in runs.items():
        real = folder / "cells" / cell / "real"
        real.mkdir(parents=True)
        (folder / "cells" / cell / "cell.json").write_text(json.dumps({"name": cell, "command": command}))
        for p, m in by.items():
            lines.append(f"{cell},held-back,{p},{cell[0]},{m},0.3,{0.3 / m - 1}")
            (real / f"plan-{p}.txt").write_text((plans or {}).get(p, f"plan: {p}\n{p}'s actions\n"))
    (folder / "matrix.csv").write_text("\n".join(lines) + "\n")


def test_the_floor_is_the_least_worst_error_of_one_figure() -> None:
    assert mf.floor([0.8, 1.0, 1.2]) == pytest.approx(0.4 / 2.0)
    assert mf.floor([0.5]) == 0.0
    lo, hi = 0.261, 0.314                      # a cell's GPipe measured on one lease minutes apart
    best = 2 * lo * hi / (lo + hi)
    assert abs(best / lo - 1) == pytest.approx(mf.floor([lo, hi])) == pytest.approx(1 - best / hi)
    with pytest.raises(ValueError, match="positive"):
        mf.floor([1.0, 0.0])


@given(st.lists(st.floats(0.01, 100.0), min_size=1, max_size=8), st.floats(0.01, 100.0))
def test_no_figure_beats_the_floor(measured: list[float], p: float) -> None:
    worst = max(abs(p / m - 1) for m in measured)
    assert worst >= mf.floor(measured) - 1e-9


def test_pairs_ordered_both_ways_past_the_tie() -> None:
    measured = {"GPipe": [0.30, 0.26], "Mobius": [0.466, 0.454], "APTMoE": [0.441, 0.478],
                "GPipeOffload": [0.470, 0.480]}
    # APTMoE 5.7% ahead of Mobius in the first, 5.3% behind in the second; GPipeOffload and
    # Mobius are 0.9% and 5.7% apart, the first a tie: one way only
    assert mf.opposite_pairs(measured, []) == [("Mobius", "APTMoE")]
    assert mf.opposite_pairs(measured, [["Mobius", "APTMoE"]]) == []          # one plan: the machine's order
    assert mf.opposite_pairs(measured, [], tie=0.06) == []


def test_floor_reports_the_same_cell_measured_three_times(tmp_path, capsys) -> None:
    _matrix(tmp_path / "a", {"S8": {"GPipe": 0.314, "Mobius": 0.466, "APTMoE": 0.441}, "M4": {"GPipe": 0.2}})
    _matrix(tmp_path / "b", {"S8": {"GPipe": 0.261, "Mobius": 0.454, "APTMoE": 0.478}})
    _matrix(tmp_path / "c", {"S8": {"GPipe": 0.284, "Mobius": 0.472, "APTMoE": 0.468}})
    out = tmp_path / "floor.md"
    assert sim_main(["floor", *(str(tmp_path / x) for x in "abc"), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert out.read_text() == text
    gpipe = next(line.split() for line in text.splitlines() if line.startswith("S8") and "GPipe" in line)
    assert gpipe == ["S8", "GPipe", "3", "0.314", "0.261", "0.284", "1.203", "9.2%", "4.5%-14.9%"]
    assert "Highest floor: 9.2% (S8 GPipe)" in text
    assert "1 of 1\n- S8: Mobius and APTMoE: no prediction ranks this cell right" in text
    assert "M4" not in text                                                 # measured once


def test_floor_leaves_out_a_cell_that_is_not_the_same_work(tmp_path, capsys) -> None:
    _matrix(tmp_path / "a", {"S8": {"GPipe": 0.30}})
    _matrix(tmp_path / "b", {"S8": {"GPipe": 0.28}},
            command=[*COMMAND[:3], "h200-other", "--replay-placements", *COMMAND[4:]])   # the prediction's flags
    _matrix(tmp_path / "c", {"S8": {"GPipe": 0.20}}, command=[*COMMAND, "--kernel-loading", "eager"])
    _matrix(tmp_path / "d", {"S8": {"GPipe": 0.10}}, plans={"GPipe": "plan: GPipe\nanother plan\n"})
    f = mf.cell_floors([tmp_path / x for x in "abcd"])
    assert len(f) == 1 and f[0].measured == {"GPipe": [0.30, 0.28]}                  # b: the same run
    assert f[0].left_out == [str(tmp_path / "c"), str(tmp_path / "d")]
    assert sim_main(["floor", *(str(tmp_path / x) for x in "abcd")]) == 0
    assert f"S8: left out, not the same run command or plans: {tmp_path / 'c'}, {tmp_path / 'd'}" \
        in capsys.readouterr().out


@pytest.mark.parametrize("args, says", [
    (lambda t: [str(t / "a")], "two or more folders"),
    (lambda t: [str(t / "a"), str(t / "missing")], "does not exist"),
    (lambda t: [str(t / "a"), str(t / "other")], "share no cell"),
    (lambda t: [str(t / "a"), str(t / "a"), "--tie", "1.5"], "--tie 1.5"),
])
def test_floor_refuses_what_it_cannot_judge_in_one_line(tmp_path, capsys, args, says) -> None:
    _matrix(tmp_path / "a", {"S8": {"GPipe": 0.30}})
    _matrix(tmp_path / "other", {"M4": {"GPipe": 0.30}})
    assert sim_main(["floor", *args(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert says in err and err.count("\n") == 1


def test_floor_keeps_the_work_most_folders_did(tmp_path, capsys) -> None:
    other = [*COMMAND, "--repeats", "4"]
    _matrix(tmp_path / "a", {"S8": {"GPipe": 0.20}, "M4": {"GPipe": 0.5}}, command=other)
    _matrix(tmp_path / "b", {"S8": {"GPipe": 0.30}, "M4": {"GPipe": 0.6}})
    _matrix(tmp_path / "c", {"S8": {"GPipe": 0.28}})
    s8, m4 = sorted(mf.cell_floors([tmp_path / x for x in "abc"]), key=lambda c: c.cell, reverse=True)
    assert s8.measured == {"GPipe": [0.30, 0.28]} and s8.left_out == [str(tmp_path / "a")]
    assert m4.measured == {} and m4.left_out == [str(tmp_path / "a"), str(tmp_path / "b")]
    assert sim_main(["floor", *(str(tmp_path / x) for x in "abc")]) == 0
    text = capsys.readouterr().out
    assert "of 1\n" in text and "M4: measured more than once, never twice as the same work" in text
    assert "\nM4 " not in text                                                  # no row of its own
