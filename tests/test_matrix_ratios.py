"""sim/matrix_ratios.py: each schedule's step over GPipe's in the same cell."""

from __future__ import annotations

import pytest

from aptmoe.sim import matrix_ratios as mr


def _config(cell: str, measured: dict, predicted: dict, s: str = "held-back") -> dict:
    return {"cell": cell, "set": s, "measured": measured, "predicted": predicted}


def test_a_host_twice_as_slow_leaves_the_ratios_alone() -> None:
    """Every step of a cell twice the prediction: all step errors -50%, the ratios right."""
    pred = {"GPipe": 0.2, "Mobius": 0.3, "APTMoE": 0.33}
    rows = mr.over_gpipe([_config("S8", {k: 2 * v for k, v in pred.items()}, pred)], {"S8": "S"})
    assert [r["pipeline"] for r in rows] == ["Mobius", "APTMoE"]
    assert all(r["error"] == pytest.approx(0.0) for r in rows)
    assert rows[0]["measured"] == pytest.approx(1.5) and rows[1]["predicted"] == pytest.approx(1.65)


def test_a_missing_cost_of_the_offloading_schedules_shows_whatever_the_level() -> None:
    # measured: Mobius 1.7x GPipe; predicted 1.5x, at a level 20% slow
    rows = mr.over_gpipe([_config("S8", {"GPipe": 0.25, "Mobius": 0.425}, {"GPipe": 0.3, "Mobius": 0.45})],
                         {"S8": "S"})
    assert rows == [{"cell": "S8", "set": "held-back", "model": "S", "pipeline": "Mobius",
                     "measured": pytest.approx(1.7), "predicted": pytest.approx(1.5),
                     "error": pytest.approx(1.5 / 1.7 - 1)}]


def test_cells_without_gpipe_on_both_sides_and_schedules_without_a_prediction_are_left_out() -> None:
    configs = [_config("a", {"Mobius": 0.4}, {"Mobius": 0.4}),
               _config("b", {"GPipe": 0.2, "Mobius": 0.4}, {"Mobius": 0.4}),
               _config("c", {"GPipe": 0.2, "Mobius": 0.4, "APTMoE": 0.5}, {"GPipe": 0.2, "Mobius": 0.44})]
    rows = mr.over_gpipe(configs, {"c": "M"})
    assert [(r["cell"], r["pipeline"], r["model"]) for r in rows] == [("c", "Mobius", "M")]
    assert mr.lines([]) == []


def test_the_medians_go_by_schedule_and_model_size() -> None:
    rows = [{"pipeline": "Mobius", "model": m, "error": e}
            for m, e in (("M", 0.1), ("S", -0.2), ("S", -0.1), ("S", 0.0))]
    rows.append({"pipeline": "APTMoE", "model": "S", "error": -0.3})
    assert mr.medians(rows) == {"APTMoE": {"S": -0.3}, "Mobius": {"S": pytest.approx(-0.1), "M": 0.1}}


def test_the_report_section_has_the_medians_then_every_row() -> None:
    rows = mr.over_gpipe([_config("S8x8", {"GPipe": 0.25, "Mobius": 0.425}, {"GPipe": 0.3, "Mobius": 0.45}),
                          _config("M4x8", {"GPipe": 0.2, "Mobius": 0.5}, {"GPipe": 0.2, "Mobius": 0.5}, "fit")],
                         {"S8x8": "S", "M4x8": "M"})
    text = "\n".join(mr.lines(rows))
    assert text.startswith("## Against GPipe in the same cell")
    assert "Mobius    -11.8%  +0.0%" in text               # S then M
    assert "S8x8  held-back    Mobius     1.700      1.500  -11.8%" in text


def test_the_terminal_gets_the_medians_in_one_line() -> None:
    rows = mr.over_gpipe([_config("S8x8", {"GPipe": 0.25, "Mobius": 0.425, "APTMoE": 0.4},
                                  {"GPipe": 0.3, "Mobius": 0.45, "APTMoE": 0.48})], {"S8x8": "S"})
    assert mr.summary_line(rows) == ("against GPipe in the same cell (predicted ratio over measured, median): "
                                     "APTMoE S +0.0%; Mobius S -11.8%")
    assert mr.summary_line([]) is None
