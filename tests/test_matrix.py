"""`aptmoe-sim matrix`: the simulator against the executor over a matrix of configs (issue 6):
the flag parsers, the held-back diagonal, the ranking check, the report over stored cells,
and one real cell end to end (resumed, then predicted again)."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import statistics
import time
from pathlib import Path

import pytest
from aptmoe.run_process import ExecutorFailed
from aptmoe.sim import matrix
from aptmoe.sim.cli import UsageError
from aptmoe.sim.cli import main as sim_main
from aptmoe.stored import read_json, read_text, stored_file
from aptmoe.trace import Trace
from aptmoe.sim.matrix import (
    TIE,
    Cell,
    collect,
    held_back,
    parse_links,
    parse_models,
    ranking_right,
    ranking_right_where_runs_apart,
    summarize,
    summary_table,
    write_report,
)
from hypothesis import given, settings
from hypothesis import strategies as st

# --------------------------------------------------------------------------- parsing


def test_models_parse_with_experts_defaulting_to_the_flag() -> None:
    assert parse_models("S:8:4,M:4:4:16", 8) == [("S", 8, 4, 8), ("M", 4, 4, 16)]
    assert parse_models(" L:2:2 ", 4) == [("L", 2, 2, 4)]


@pytest.mark.parametrize("item", [
    "X:8:4",          # no such size
    "S:5:2",          # 5 layers do not split into 2 stages
    "S:8:0",          # no stages
    "S:8",            # too few fields
    "S:8:4:8:1",      # too many
    "S:eight:4",      # not a number
    "S:0:1",
    "S:8:4:0",
])
def test_a_bad_models_item_is_named(item: str) -> None:
    with pytest.raises(UsageError, match=item):
        parse_models(f"S:8:4,{item}", 8)


def test_links_parse() -> None:
    assert parse_links("native,8") == [None, 8.0]
    assert parse_links("native, 0.5") == [None, 0.5]


@pytest.mark.parametrize("text", ["0", "abc", "native,-1"])
def test_bad_links_are_usage_errors(text: str) -> None:
    with pytest.raises(UsageError, match="--links"):
        parse_links(text)


# --------------------------------------------------------------------------- held-back cells


def test_held_back_is_the_diagonal_of_each_block() -> None:
    assert {i for i in range(12) if held_back(i, 4)} == {0, 5, 10}
    assert not any(held_back(i, 0) for i in range(12))
    assert all(held_back(i, 1) for i in range(12))            # a matrix of fresh configs


@settings(max_examples=200, deadline=None)
@given(n=st.integers(0, 300), every=st.integers(1, 40))
def test_each_full_block_holds_back_exactly_one_cell(n: int, every: int) -> None:
    for start in range(0, n - every + 1, every):
        assert sum(held_back(i, every) for i in range(start, start + every)) == 1


# --------------------------------------------------------------------------- the ranking


def test_identical_orders_are_right() -> None:
    t = {"GPipe": 1.0, "GPipeOffload": 3.0, "Mobius": 2.0, "APTMoE": 1.5}
    assert ranking_right(t, dict(t))
    assert ranking_right(t, {k: 10 * v for k, v in t.items()})      # the order, not the values


def test_a_swapped_pair_beyond_the_tie_is_wrong() -> None:
    assert 1.0 * (1 + TIE) < 1.5
    assert not ranking_right({"Mobius": 1.0, "APTMoE": 1.5}, {"Mobius": 2.0, "APTMoE": 1.0})


def test_a_swapped_pair_within_the_tie_is_right() -> None:
    assert 1.02 - 1.00 <= TIE * 1.00
    assert ranking_right({"Mobius": 1.00, "APTMoE": 1.02, "GPipe": 3.0},
                         {"Mobius": 1.10, "APTMoE": 1.05, "GPipe": 4.0})
    assert not ranking_right({"Mobius": 1.00, "APTMoE": 1.02}, {"Mobius": 1.10, "APTMoE": 1.05}, tie=0.01)


def test_schedules_not_predicted_are_ignored() -> None:
    measured = {"GPipe": 1.0, "Mobius": 2.0, "APTMoE": 3.0}
    assert ranking_right(measured, {"GPipe": 1.0, "APTMoE": 2.0})            # Mobius: not predicted
    assert not ranking_right(measured, {"GPipe": 3.0, "APTMoE": 2.0})


def test_where_runs_interleave_the_measurement_orders_nothing() -> None:
    """v14-fresh's S8 on two GPUs: Mobius and APTMoE's runs interleave (0.260-0.326 and
    0.281-0.343 s/step), so their medians 7% apart order nothing; GPipe's are apart from both."""
    repeats = {"GPipe": [0.191, 0.145, 0.213], "Mobius": [0.260, 0.326, 0.314], "APTMoE": [0.341, 0.281, 0.343]}
    measured = {"GPipe": 0.191, "Mobius": 0.314, "APTMoE": 0.341}
    predicted = {"GPipe": 0.154, "Mobius": 0.267, "APTMoE": 0.265}
    assert not ranking_right(measured, predicted)                       # 8.6% apart: beyond the tie
    assert ranking_right_where_runs_apart(measured, predicted, repeats)
    assert not ranking_right_where_runs_apart(measured, {**predicted, "GPipe": 0.3}, repeats)
    # runs that do not interleave order a pair however close their medians
    close = {"Mobius": [0.300, 0.301], "APTMoE": [0.302, 0.303]}
    assert not ranking_right_where_runs_apart({"Mobius": 0.3005, "APTMoE": 0.3025}, {"Mobius": 2.0, "APTMoE": 1.0},
                                              close)
    # one plan's runs are not judged; a schedule that ran once leaves the config unjudged
    assert ranking_right_where_runs_apart({"Mobius": 0.3005, "APTMoE": 0.3025}, {"Mobius": 2.0, "APTMoE": 1.0},
                                          close, same_plans=[["Mobius", "APTMoE"]])
    assert ranking_right_where_runs_apart(measured, predicted, {**repeats, "GPipe": [0.191]}) is None
    assert ranking_right_where_runs_apart(measured, predicted, {}) is None


@given(st.dictionaries(st.sampled_from(["GPipe", "GPipeOffload", "Mobius", "APTMoE"]),
                       st.lists(st.floats(0.1, 1.0), min_size=2, max_size=4), min_size=2),
       st.dictionaries(st.sampled_from(["GPipe", "GPipeOffload", "Mobius", "APTMoE"]), st.floats(0.1, 1.0)))
@settings(max_examples=200, deadline=None)
def test_a_prediction_in_the_runs_own_order_is_right_where_they_are_apart(repeats, noise) -> None:
    """Predicting each schedule at its median run is right, however the runs spread; and the
    judgement never fails a prediction the tie rule with no tie passes."""
    measured = {k: statistics.median(v) for k, v in repeats.items()}
    assert ranking_right_where_runs_apart(measured, dict(measured), repeats)
    predicted = {k: noise.get(k, 0.5) for k in measured}
    if ranking_right(measured, predicted, tie=0.0):
        assert ranking_right_where_runs_apart(measured, predicted, repeats)


# --------------------------------------------------------------------------- the report over stored cells

# held_back(i, 2): index 0 is held back, 1 and 2 are fit cells.
CELLS = [Cell("S", 8, 4, 8, 0.3, None, 1), Cell("S", 8, 4, 8, 0.3, 8.0, 1), Cell("M", 4, 4, 8, 0.6, None, 1)]


def _row(pipeline: str, measured, predicted, error, **kw) -> dict:
    return {"pipeline": pipeline, "measured_s": measured, "predicted_s": predicted, "error": error, **kw}


def _store(out, cell: Cell, rows: list[dict]) -> None:
    folder = out / "cells" / cell.name
    folder.mkdir(parents=True)
    (folder / "validation.json").write_text(json.dumps({"command": ["aptmoe-sim", "validate"], "calibration": "x",
                                                        "schedules": rows}))


@pytest.fixture
def stored(tmp_path):
    out = tmp_path / "m"
    # held back: both schedules in order (right and strict)
    _store(out, CELLS[0], [_row("GPipe", 1.0, 1.1, 0.1, actions={"forward": {"median_error": -0.5}}),
                           _row("Mobius", 2.0, 1.5, -0.25)])
    # fit: GPipeOffload and Mobius swapped beyond the tie (wrong); APTMoE ran out of memory
    _store(out, CELLS[1], [_row("GPipe", 1.0, 0.95, -0.05), _row("GPipeOffload", 1.2, 2.0, 2 / 3),
                           _row("Mobius", 1.5, 1.8, 0.2),
                           _row("APTMoE", None, None, None, note="out of memory")])
    # CELLS[2] has no folder: it was not run yet
    return out


def test_collect_splits_fit_and_held_back(stored) -> None:
    rep = collect(stored, CELLS, 2, "x", ["cmd"])
    assert rep["calibration"] == "x" and rep["command"] == ["cmd"] and rep["tie"] == TIE
    assert {r["cell"] for r in rep["runs"]} == {CELLS[0].name, CELLS[1].name}      # no folder: absent
    assert len(rep["runs"]) == 6
    assert [c["cell"] for c in rep["configs"]] == [CELLS[0].name, CELLS[1].name]
    assert {r["cell"]: r["set"] for r in rep["runs"]} == {CELLS[0].name: "held-back", CELLS[1].name: "fit"}
    assert {r["cell"]: r["link"] for r in rep["runs"]} == {CELLS[0].name: "native", CELLS[1].name: 8.0}
    assert rep["runs"][0]["err/forward"] == -0.5
    oom = next(r for r in rep["runs"] if r["pipeline"] == "APTMoE")
    assert oom["error"] is None and oom["note"] == "out of memory"

    held, fit = rep["configs"]
    assert held["ranking_right"] and held["ranking_strict"]
    assert held["order_measured"] == held["order_predicted"] == ["GPipe", "Mobius"]
    assert not fit["ranking_right"] and not fit["ranking_strict"]
    assert fit["order_measured"] == ["GPipe", "GPipeOffload", "Mobius"]    # APTMoE: nothing to rank
    assert fit["order_predicted"] == ["GPipe", "Mobius", "GPipeOffload"]

    s = rep["summary"]
    assert set(s) == {"fit", "held-back", "all"}
    assert s["held-back"]["runs"] == 2
    assert s["held-back"]["median_abs_error"] == pytest.approx(0.175)
    assert s["held-back"]["worst_abs_error"] == pytest.approx(0.25)
    assert s["held-back"]["worst_run"] == f"{CELLS[0].name} Mobius"
    assert (s["held-back"]["configs"], s["held-back"]["ranking_right"], s["held-back"]["ranking_strict"]) == (1, 1, 1)
    assert s["fit"]["runs"] == 3                                            # the OOM row has no error
    assert s["fit"]["median_abs_error"] == pytest.approx(0.2)
    assert s["fit"]["worst_abs_error"] == pytest.approx(2 / 3)
    assert s["fit"]["worst_run"] == f"{CELLS[1].name} GPipeOffload"
    assert (s["fit"]["configs"], s["fit"]["ranking_right"], s["fit"]["ranking_strict"]) == (1, 0, 0)
    assert s["all"]["runs"] == 5
    assert s["all"]["median_abs_error"] == pytest.approx(0.2)
    assert s["all"]["signed_median_error"] == pytest.approx(0.1)
    assert s["all"]["worst_run"] == f"{CELLS[1].name} GPipeOffload"
    assert (s["all"]["configs"], s["all"]["ranking_right"], s["all"]["ranking_strict"]) == (2, 1, 1)


def test_every_cell_is_fit_when_none_is_held_back(stored) -> None:
    s = collect(stored, CELLS, 0, "x", ["cmd"])["summary"]
    assert s["held-back"]["runs"] == 0 and s["held-back"]["configs"] == 0
    assert s["held-back"]["median_abs_error"] is None and s["held-back"]["worst_run"] is None
    assert s["fit"] == s["all"]


def test_summary_of_nothing() -> None:
    s = summarize([], [])
    assert s["runs"] == 0 and s["configs"] == 0 and s["ranking_right"] == 0
    assert s["median_abs_error"] is None and s["worst_abs_error"] is None and s["signed_median_error"] is None


def test_the_runs_table_names_each_runs_stalls_a_step_where_the_runs_have_them() -> None:
    """validate's `stall_s_per_step` (aptmoe/stalls.py) as a column of the runs, in ms; a run
    without a measured trace to compare has none ("-"), and runs that none has lack the column."""
    runs = [{"cell": "L2", "set": "fit", "pipeline": p, "measured_s": 0.209, "predicted_s": 0.181, "error": -0.133,
             "stall_s_per_step": s} for p, s in (("GPipe", 0.02398), ("Mobius", None))]
    rows = {line.split()[2]: line.split() for line in matrix.matrix_table(runs).splitlines()[2:]}
    assert "stalls ms/step" in matrix.matrix_table(runs)
    assert rows["GPipe"][6] == "24.0" and rows["Mobius"][6] == "-"
    assert "stalls" not in matrix.matrix_table([{**r, "stall_s_per_step": None} for r in runs])


def test_the_error_at_each_runs_host_speed_is_summarized_where_runs_have_it() -> None:
    runs = [{"cell": "c", "pipeline": p, "error": e, "error_host": h}
            for p, e, h in (("GPipe", 0.30, 0.02), ("Mobius", -0.10, -0.05), ("APTMoE", 0.04, None))]
    s = summarize(runs, [])
    assert s["host_runs"] == 2 and s["median_abs_error_host"] == pytest.approx(0.035)
    assert s["worst_abs_error_host"] == pytest.approx(0.05) and s["worst_abs_error"] == pytest.approx(0.30)
    table = matrix.summary_table({"all": s})
    assert "at run's host" in table and "3.5%" in table
    plain = summarize([{**r, "error_host": None} for r in runs], [])
    assert plain["host_runs"] == 0 and "at run's host" not in matrix.summary_table({"all": plain})


def test_the_report_is_written_whole(stored) -> None:
    rep = collect(stored, CELLS, 2, "x", ["aptmoe-sim", "matrix", "--out", "m"])
    write_report(stored, rep)
    assert json.loads((stored / "matrix.json").read_text()) == rep
    lines = (stored / "matrix.csv").read_text().splitlines()
    assert lines[0].startswith("cell,set,pipeline,model,gini,link,gpus,measured_s,predicted_s,error")
    assert "err/forward" in lines[0].split(",")
    assert len(lines) == 1 + 6
    md = (stored / "matrix.md").read_text()
    assert "## Summary" in md and "## Runs" in md and "aptmoe-sim matrix --out m" in md
    assert CELLS[0].name in md and CELLS[1].name in md and CELLS[2].name not in md
    assert not [p.name for p in stored.iterdir() if "partial" in p.name]
    assert sorted(p.name for p in stored.iterdir()) == ["cells", "matrix.csv", "matrix.json", "matrix.md"]


def test_an_empty_report_is_written(tmp_path) -> None:
    (tmp_path / "cells").mkdir()
    write_report(tmp_path, collect(tmp_path, CELLS, 4, "x", ["cmd"]))
    assert json.loads((tmp_path / "matrix.json").read_text())["runs"] == []
    assert (tmp_path / "matrix.md").exists() and (tmp_path / "matrix.csv").exists()


@pytest.mark.parametrize("text, want", [("3", {None: 3}), ("3,S=6", {None: 3, "S": 6}),
                                        ("s=6, M=3,L=3", {None: 2, "S": 6, "M": 3, "L": 3})])
def test_steps_by_model_size(text, want) -> None:
    assert matrix.steps_by_size(text) == want


@pytest.mark.parametrize("text, says", [("X=3", "no model size"), ("S=three", "not N or SIZE=N"), ("S=0", "at least 1")])
def test_steps_that_make_no_sense_are_refused(text, says) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=says):
        matrix.steps_by_size(text)


# --------------------------------------------------------------------------- the command, end to end

FLAGS = ["--calibration", "a800-paper", "--models", "S:4:2", "--experts", "4", "--gini", "0.3", "--links", "native",
         "--device", "cpu", "--batch_size", "4", "--num_chunks", "2", "--seq_length", "8", "--warmup", "0",
         "--steps", "1,S=2", "--repeats", "1,S=2", "--extra", "--embedding_dim 32 --hidden_dim 64 --num_heads 4",
         "-q"]
E2E_CELL = "S4x4-G0.3-native-1gpu"


@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    """One real cell (the executor on the CPU, ~15 s), run once for the module."""
    pytest.importorskip("torch")
    out = tmp_path_factory.mktemp("matrix") / "m"
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = sim_main(["matrix", "--out", str(out), *FLAGS])
    return {"out": out, "code": code, "stdout": stdout.getvalue(), "stderr": stderr.getvalue()}


def _forbid_executor(monkeypatch) -> None:
    def run_executor(argv, out, calibration=None, **kw):
        raise AssertionError("the executor ran")
    monkeypatch.setattr(matrix, "run_executor", run_executor)


def test_a_cell_runs_end_to_end(e2e) -> None:
    out = e2e["out"]
    assert e2e["code"] == 0, e2e["stderr"]
    assert [p.name for p in (out / "cells").iterdir()] == [E2E_CELL]
    folder = out / "cells" / E2E_CELL
    val = json.loads((folder / "validation.json").read_text())
    assert [r["pipeline"] for r in val["schedules"]] == ["GPipe", "GPipeOffload", "Mobius", "APTMoE"]
    cell = json.loads((folder / "cell.json").read_text())
    assert cell["name"] == E2E_CELL and cell["index"] == 0 and cell["held_back"] is True
    assert cell["wall_s"] > 0
    # the executor planned with the profile the cell is predicted with, and kept a copy (both
    # stored xz-compressed, as the repository keeps them)
    planned = json.loads(read_text(folder / "real" / "plan-profile.json.xz"))
    assert planned == json.loads(read_text(folder / "profile.json.xz")) and val["planned_with"] == planned["name"]
    assert not (folder / "profile.json").exists() and not (folder / "real" / "plan-profile.json").exists()
    assert cell["command"][:4] == ["aptmoe-sim", "validate", "--calibration", "a800-paper"]
    assert val["command"] == cell["command"]
    # --steps 1,S=2: an S cell times 2 steps
    command = cell["command"]
    assert command[command.index("--num_training_steps") + 1] == "2"
    sched = read_json(folder / "real" / "results.json")["schedules"]      # stored as results.json.xz
    assert {len(s["step_s"]) for s in sched.values()} == {2}
    # --repeats 1,S=2: every schedule of an S cell ran twice, the median run kept and measured
    assert command[command.index("--repeats") + 1] == "2"
    assert all(len(s["repeats"]["iteration_s"]) == 2 for s in sched.values())
    # eager kernel loading asked for (the default), and on CPU ranks nothing to load
    assert command[command.index("--kernel-loading") + 1] == "eager"
    assert all(s["kernel_loading"] is None and "gpu_bytes_outside_allocator" not in s for s in sched.values())
    assert json.loads(read_text(folder / "profile.json.xz"))["name"] == "a800-paper"      # what it was predicted with
    rep = json.loads((out / "matrix.json").read_text())
    assert len(rep["runs"]) == 4 and {r["cell"] for r in rep["runs"]} == {E2E_CELL}
    assert all(r["measured_s"] > 0 and r["predicted_s"] > 0 for r in rep["runs"])
    assert all(r["run_spread"] is not None for r in rep["runs"]) and rep["noise"]["S"]["repeated"] == 4
    assert "run spread median" in (out / "matrix.md").read_text()
    assert rep["summary"]["all"]["runs"] == 4 and rep["summary"]["all"]["configs"] == 1
    assert rep["command"][:2] == ["aptmoe-sim", "matrix"]
    assert (out / "matrix.csv").exists() and (out / "matrix.md").exists()
    assert (out / "matrix.png").read_bytes()[:4] == b"\x89PNG"
    assert not [p for p in out.rglob("*partial*")]


def test_a_cell_keeps_its_traces_compressed_and_the_folder_ignores_what_repredict_rewrites(e2e, monkeypatch) -> None:
    out = e2e["out"]
    real = out / "cells" / E2E_CELL / "real"
    names = ("GPipe", "GPipeOffload", "Mobius", "APTMoE")
    assert sorted(p.name for p in real.glob("trace-*")) == sorted(f"trace-{n}.json.xz" for n in names)
    assert Trace.load(real / "trace-APTMoE.json.xz").events        # what the comparison reads (Perfetto: xz -dk)
    ignored = (out / ".gitignore").read_text().split("\n")
    assert set(matrix.DERIVED) <= set(ignored)
    # --repredict still compares action by action from the compressed traces
    folder = out / "cells" / E2E_CELL
    for csv_path in folder.glob("actions-*.csv"):
        csv_path.unlink()
    _forbid_executor(monkeypatch)
    assert sim_main(["matrix", "--out", str(out), *FLAGS, "--repredict"]) == 0
    assert sorted(p.name for p in folder.glob("actions-*.csv")) == sorted(f"actions-{n}.csv" for n in names)
    assert all(r["actions"] for r in json.loads((folder / "validation.json").read_text())["schedules"])


def test_quiet_prints_nothing(e2e) -> None:
    assert e2e["code"] == 0
    assert e2e["stdout"] == ""


def test_a_second_call_skips_the_stored_cell(e2e, monkeypatch) -> None:
    out = e2e["out"]
    cell_json = out / "cells" / E2E_CELL / "cell.json"
    before = (cell_json.read_bytes(), cell_json.stat().st_mtime_ns)
    _forbid_executor(monkeypatch)
    t0 = time.monotonic()
    assert sim_main(["matrix", "--out", str(out), *FLAGS]) == 0
    assert time.monotonic() - t0 < 10
    assert (cell_json.read_bytes(), cell_json.stat().st_mtime_ns) == before
    assert len(json.loads((out / "matrix.json").read_text())["runs"]) == 4


def test_repredict_rewrites_the_prediction_without_the_executor(e2e, monkeypatch) -> None:
    out = e2e["out"]
    folder = out / "cells" / E2E_CELL
    val = folder / "validation.json"
    results = folder / "real" / "results.json.xz"      # the cell stores its run's results packed
    assert not (folder / "real" / "results.json").exists()
    os.utime(val, ns=(10**9, 10**9))                   # long ago: a rewrite moves it
    measured = results.read_bytes()
    _forbid_executor(monkeypatch)
    assert sim_main(["matrix", "--out", str(out), *FLAGS, "--repredict"]) == 0
    assert val.stat().st_mtime_ns > 10**9
    doc = json.loads(val.read_text())
    assert doc["calibration"] == "a800-paper" and len(doc["schedules"]) == 4
    assert doc["command"] == json.loads((folder / "cell.json").read_text())["command"]
    assert results.read_bytes() == measured
    assert len(json.loads((out / "matrix.json").read_text())["runs"]) == 4


def test_repredict_with_cell_profiles_uses_the_profile_each_cell_ran_with(e2e, tmp_path, monkeypatch) -> None:
    """A cell predicted with a800-paper when it ran, predicted again with h200-1gpu: plain
    --repredict takes the flag's profile, --cell-profiles the one stored beside the cell, and a
    cell without a stored profile falls back to the flag's."""
    out = tmp_path / "m"
    shutil.copytree(e2e["out"], out)
    _forbid_executor(monkeypatch)
    flags = [f for f in FLAGS if f != "a800-paper"]
    flags[flags.index("--calibration") + 1:flags.index("--calibration") + 1] = ["h200-1gpu"]
    val = out / "cells" / E2E_CELL / "validation.json"

    def repredict(*more: str) -> tuple[str, str]:
        assert sim_main(["matrix", "--out", str(out), *flags, "--repredict", *more]) == 0
        return json.loads(val.read_text())["calibration"], json.loads((out / "matrix.json").read_text())["calibration"]

    assert repredict() == ("h200-1gpu", "h200-1gpu")
    own, report = repredict("--cell-profiles")
    assert own == "a800-paper" and "1 of 1" in report
    stored_file(out / "cells" / E2E_CELL / "profile.json").unlink()
    own, report = repredict("--cell-profiles")
    assert own == "h200-1gpu" and "0 of 1" in report


def test_cell_profiles_without_repredict_is_refused(tmp_path, capsys) -> None:
    assert sim_main(["matrix", "--out", str(tmp_path / "m"), *FLAGS, "--cell-profiles"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--repredict" in err[0]
    assert not (tmp_path / "m").exists()


def test_repredict_runs_nothing_for_a_missing_cell(tmp_path, monkeypatch) -> None:
    _forbid_executor(monkeypatch)
    out = tmp_path / "m"
    assert sim_main(["matrix", "--out", str(out), *FLAGS, "--repredict"]) == 0
    assert list((out / "cells").iterdir()) == []
    assert json.loads((out / "matrix.json").read_text())["runs"] == []


def test_a_failed_cell_leaves_no_folder(tmp_path, monkeypatch, capsys) -> None:
    def run_executor(argv, out, calibration=None, **kw):
        raise ExecutorFailed("aptmoe-run failed (exit 1): boom")
    monkeypatch.setattr(matrix, "run_executor", run_executor)
    out = tmp_path / "m"
    assert sim_main(["matrix", "--out", str(out), *FLAGS]) == 1
    assert list((out / "cells").iterdir()) == []
    assert not [p for p in out.rglob("*partial*")]
    assert json.loads((out / "matrix.json").read_text())["runs"] == []
    cap = capsys.readouterr()
    assert "boom" in cap.out + cap.err and E2E_CELL in cap.out + cap.err


def _copying_executor(e2e, monkeypatch) -> list:
    """A stand-in executor that copies the e2e cell's real run; returns the argv of each call."""
    real = e2e["out"] / "cells" / E2E_CELL / "real"
    calls = []

    def run_executor(argv, out, calibration=None, *, kernel_loading):
        calls.append([*argv, f"kernel_loading={kernel_loading}"])
        shutil.copytree(real, out)
    monkeypatch.setattr(matrix, "run_executor", run_executor)
    return calls


def test_copied_runs_fill_a_larger_matrix(e2e, tmp_path, monkeypatch) -> None:
    """Four cells (2 G x 2 links) from a stand-in executor that copies the real run: held back
    every 2, cells 0 and 3 are held back; --only fit runs just the others."""
    calls = _copying_executor(e2e, monkeypatch)
    out = tmp_path / "m"
    flags = [*FLAGS, "--gini", "0.3,0.6", "--links", "native,8", "--held-back-every", "2"]
    assert sim_main(["matrix", "--out", str(out), *flags, "--only", "fit"]) == 0
    assert [a[a.index("--gini") + 1] for a in calls] == ["0.3", "0.6"]
    assert ["--link-bandwidth" in a for a in calls] == [True, False]                 # cap8, then native
    rep = json.loads((out / "matrix.json").read_text())
    assert {c["cell"] for c in rep["configs"]} == {"S4x4-G0.3-cap8-1gpu", "S4x4-G0.6-native-1gpu"}
    assert {c["set"] for c in rep["configs"]} == {"fit"}
    assert sim_main(["matrix", "--out", str(out), *flags]) == 0                  # the rest
    assert len(calls) == 4
    rep = json.loads((out / "matrix.json").read_text())
    assert {c["cell"]: c["set"] for c in rep["configs"]} == {
        "S4x4-G0.3-native-1gpu": "held-back", "S4x4-G0.3-cap8-1gpu": "fit",
        "S4x4-G0.6-native-1gpu": "fit", "S4x4-G0.6-cap8-1gpu": "held-back"}
    assert rep["summary"]["all"]["runs"] == 16 and rep["summary"]["held-back"]["configs"] == 2


def test_kernel_loading_reaches_the_executor_and_the_recorded_command(e2e, tmp_path, monkeypatch) -> None:
    calls = _copying_executor(e2e, monkeypatch)
    for mode in ("lazy", "eager"):
        out = tmp_path / mode
        assert sim_main(["matrix", "--out", str(out), *FLAGS, "--kernel-loading", mode]) == 0
        assert calls[-1][-1] == f"kernel_loading={mode}"
        command = json.loads((out / "cells" / E2E_CELL / "cell.json").read_text())["command"]
        assert command[command.index("--kernel-loading") + 1] == mode


def test_a_cells_recorded_command_is_one_validate_runs() -> None:
    """cell.json's command is `aptmoe-sim validate` with the cell's flags: validate must take
    every one of them (before session 23 it refused the --no-plot the matrix passes on)."""
    from aptmoe.sim.validate import make_validate_parser

    ns = matrix.make_matrix_parser().parse_args(["--calibration", "a800-paper", "--out", "m", "--no-plot",
                                                 "--kernel-loading", "lazy",
                                                 "--extra", "--embedding_dim 32"])
    cell = matrix.cells_of(ns)[0]
    vns = make_validate_parser("aptmoe-sim").parse_args(["--calibration", "a800-paper",
                                                         *cell.argv(matrix.common_argv(ns, cell.model))])
    assert vns.no_plot and vns.kernel_loading == "lazy" and vns.embedding_dim == 32


def test_an_incomplete_cell_folder_is_run_again(e2e, tmp_path, monkeypatch) -> None:
    """A cell folder without its validation.json (here: the derived files alone, as the device's
    copy of the tree leaves them) is not a stored cell: it is replaced by a fresh run."""
    calls = _copying_executor(e2e, monkeypatch)
    out = tmp_path / "m"
    left = out / "cells" / E2E_CELL
    left.mkdir(parents=True)
    (left / "actions-GPipe.csv").write_text("stale\n")
    assert sim_main(["matrix", "--out", str(out), *FLAGS]) == 0
    assert len(calls) == 1
    assert (left / "validation.json").exists() and (left / "actions-GPipe.csv").read_text() != "stale\n"


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("flags, named", [(["--models", "S:5:2"], "S:5:2"), (["--links", "native,-1"], "--links")])
def test_bad_input_is_one_line_and_no_folder(tmp_path, capsys, flags, named) -> None:
    out = tmp_path / "m"
    assert sim_main(["matrix", "--calibration", "a800-paper", "--out", str(out), *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("aptmoe-sim: error: ") and named in err[0]
    assert not out.exists()


def test_matrix_needs_a_calibration_and_an_out(capsys) -> None:
    assert sim_main(["matrix", "--out", "nowhere"]) == 2
    assert "--calibration" in capsys.readouterr().err
    assert sim_main(["matrix", "--calibration", "a800-paper"]) == 2
    assert "--out" in capsys.readouterr().err


@pytest.mark.parametrize("flags", [["--gini", "0.3,0.3"], ["--links", "native,8,native"], ["--gpus", "1.5"],
                                   ["--gpus", "0"], ["--models", "S:8:4,S:8:4"], ["--experts", "0"]])
def test_a_matrix_that_would_run_a_cell_twice_or_not_at_all_is_refused(flags) -> None:
    ns = matrix.make_matrix_parser().parse_args(["--calibration", "a800-paper", "--out", "x", *flags])
    with pytest.raises(UsageError):
        matrix.cells_of(ns)


@pytest.mark.parametrize("flags, says", [
    (["--gini", "0.3,1.5"], "S4x4-G1.5-native-1gpu"),                  # outside (0, 1]
    (["--gini", "0.2"], "[1/E, 1/k]"),                                  # under 1/E for 4 experts
    (["--extra", "--embedding_dim 32 --hidden_dim 64 --num_heads 4 --top_k 8"], "top_k"),
])
def test_a_matrix_with_an_impossible_cell_runs_nothing(tmp_path, capsys, flags, says) -> None:
    """Every cell's config is built before the first runs: one line naming the cell, exit 2,
    no matrix folder."""
    out = tmp_path / "m"
    argv = [*FLAGS, "--out", str(out)]
    for flag, value in zip(flags[::2], flags[1::2]):
        argv[argv.index(flag) + 1] = value
    assert sim_main(["matrix", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and says in err[0] and "cell S4x4-G" in err[0]
    assert not out.exists()


def test_a_few_slow_actions_show_in_the_category_total_not_its_median(tmp_path) -> None:
    """Ten CPU expert calls of 1 ms predicted at 0.9 ms, and one of 100 ms: the median per
    action says -10%, the category's total (10 ms predicted of 110 measured) -91%."""
    out = tmp_path / "m"
    acts = {"cpu-expert": {"median_error": -0.1, "predicted_s": 11 * 0.0009, "measured_s": 0.110}}
    _store(out, CELLS[1], [_row("APTMoE", 1.0, 0.9, -0.1, actions=acts)])
    rep = collect(out, CELLS, 2, "x", ["cmd"])
    run = rep["runs"][0]
    assert run["err/cpu-expert"] == -0.1 and run["total/cpu-expert"] == pytest.approx(0.0099 / 0.110 - 1)
    assert rep["totals"]["fit"] == {"cpu-expert": {CELLS[1].model: pytest.approx(-0.91)}}
    matrix.write_report(out, rep)
    md = (out / "matrix.md").read_text()
    assert "## Total time per category" in md and "-91%" in md


def test_categories_are_summarized_per_model_size() -> None:
    runs = [{"model": "S", "err/forward": -0.5, "err/update": -0.2}, {"model": "S", "err/forward": -0.3},
            {"model": "L", "err/forward": 0.1, "err/update": None}]
    assert matrix.by_category(runs) == {"forward": {"L": 0.1, "S": pytest.approx(-0.4)}, "update": {"S": -0.2}}
    table = matrix.category_table(matrix.by_category(runs))
    assert table.splitlines()[0].split() == ["category", "S", "L"] and "-40%" in table


def _gpipe(cell: str, measured: float, model: str = "S") -> dict:
    return {"cell": cell, "pipeline": "GPipe", "model": model, "gpus": 1, "measured_s": measured}


def test_same_work_pairs_are_gpipe_runs_differing_only_in_the_link() -> None:
    runs = [_gpipe("S8x8-G0.3-native-1gpu", 0.25), _gpipe("S8x8-G0.3-cap8-1gpu", 0.35),
            _gpipe("S8x8-G0.6-native-1gpu", 0.24),                        # its cap8 twin did not run
            {**_gpipe("S8x8-G0.6-cap8-1gpu", 0.30), "pipeline": "Mobius"},  # not GPipe: other work
            _gpipe("M4x8-G0.3-native-1gpu", 0.20, "M"), _gpipe("M4x8-G0.3-cap8-1gpu", 0.20, "M"),
            {**_gpipe("M4x8-G0.3-native-2gpu", 0.1, "M"), "gpus": 2}]         # 2 GPUs: other work
    pairs = matrix.replicate_pairs(runs)
    assert [(p["cells"], round(p["difference"], 6)) for p in pairs] == [
        (["S8x8-G0.3-native-1gpu", "S8x8-G0.3-cap8-1gpu"], 0.4), (["M4x8-G0.3-native-1gpu", "M4x8-G0.3-cap8-1gpu"], 0.0)]


def test_schedules_of_one_plan_are_found_by_their_plan_files(tmp_path) -> None:
    body = "  stage 0: rank 0, layers 0-0\nrank 0:\n  compute  0F0 0B0\n"
    for name, policy in (("GPipeOffload", "stage"), ("Mobius", "stage"), ("APTMoE", "affinity"), ("GPipe", "none")):
        (tmp_path / f"plan-{name}.txt").write_text(f"{name}: 1 stages on 1 ranks, policy={policy}\n{body}")
    names = ["GPipe", "GPipeOffload", "Mobius", "APTMoE", "Missing"]
    assert matrix.same_plans(tmp_path, names) == [["GPipeOffload", "Mobius"]]
    (tmp_path / "plan-Mobius.txt").write_text(f"Mobius: 1 stages on 1 ranks, policy=stage\n{body}  load 0LF\n")
    assert matrix.same_plans(tmp_path, names) == []


def test_the_ranking_does_not_judge_the_order_of_one_plans_runs() -> None:
    measured = {"GPipeOffload": 0.694, "Mobius": 0.875, "APTMoE": 0.60}
    predicted = {"GPipeOffload": 0.691, "Mobius": 0.690, "APTMoE": 0.65}
    assert not ranking_right(measured, predicted)
    assert ranking_right(measured, predicted, same_plans=[["GPipeOffload", "Mobius"]])
    assert not ranking_right(measured, {**predicted, "APTMoE": 0.70}, same_plans=[["GPipeOffload", "Mobius"]])


def test_same_work_pairs_include_one_cells_schedules_of_one_plan() -> None:
    cell = "L2x8-G0.5-native-2gpu"
    runs = [{"cell": cell, "pipeline": p, "model": "L", "gpus": 2, "measured_s": t, "same_plan": twin}
            for p, t, twin in (("GPipe", 0.2, ""), ("GPipeOffload", 0.7, "GPipeOffload=Mobius"),
                               ("Mobius", 0.875, "GPipeOffload=Mobius"), ("APTMoE", 0.72, ""))]
    pairs = matrix.replicate_pairs(runs)
    assert [(p["pipelines"], round(p["difference"], 6)) for p in pairs] == [(["GPipeOffload", "Mobius"], 0.25)]
    assert matrix.noise(runs)["L"]["pairs"] == 1


def test_noise_reports_step_spread_and_pair_difference_per_model(tmp_path) -> None:
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"schedules": {"GPipe": {"step_s": [1.0, 1.2, 1.1]}, "Mobius": {"step_s": [2.0]}}}))
    spreads = matrix.step_spreads(results)
    assert spreads == {"GPipe": pytest.approx(0.2 / 1.1)}                  # one step: no spread
    assert matrix.step_spreads(tmp_path / "missing.json") == {}
    runs = [{**_gpipe("S8x8-G0.3-native-1gpu", 1.0), "step_spread": 0.1},
            {**_gpipe("S8x8-G0.3-cap8-1gpu", 1.5), "step_spread": 0.3},
            {**_gpipe("L2x4-G0.3-native-1gpu", 1.0, "L"), "step_spread": None}]
    n = matrix.noise(runs)
    assert list(n) == ["S", "L"]
    assert n["S"] == {"runs": 2, "step_spread_median": pytest.approx(0.2), "step_spread_worst": 0.3, "pairs": 1,
                      "pair_difference_median": pytest.approx(0.5), "pair_difference_worst": pytest.approx(0.5)}
    assert n["L"]["runs"] == 0 and n["L"]["step_spread_median"] is None and n["L"]["pairs"] == 0
    table = matrix.noise_table(n)
    assert "50.0%" in table and table.splitlines()[-1].split()[:2] == ["L", "0"]


def _matrix_csv(folder, runs):
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["cell,set,pipeline,model,measured_s,predicted_s,error"]
    lines += [f"{cell},fit,{p},{cell[0]},{m},{m * (1 + e)},{e}" for cell, p, m, e in runs]
    (folder / "matrix.csv").write_text("\n".join(lines) + "\n")


def test_compare_puts_two_matrices_side_by_side(tmp_path, capsys) -> None:
    from aptmoe.sim.cli import main as sim_main

    _matrix_csv(tmp_path / "a", [("S8", "GPipe", 1.0, -0.2), ("S8", "APTMoE", 2.0, -0.4), ("M4", "GPipe", 4.0, 0.1),
                                 ("L2", "Mobius", 1.0, 0.0)])
    _matrix_csv(tmp_path / "b", [("S8", "GPipe", 0.5, -0.1), ("S8", "APTMoE", 3.0, -0.2), ("M4", "GPipe", 4.0, 0.3)])
    out = tmp_path / "cmp.md"
    assert sim_main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert out.read_text() == text
    assert "3 runs in both; all runs 1.000" in text                # median of 0.5, 1.5, 1.0
    gpipe = next(line.split() for line in text.splitlines() if line.startswith("GPipe "))
    assert gpipe == ["GPipe", "1.000", "0.500", "0.750"]            # MoE-M, MoE-S, all (L2 is in one only)
    assert "a 20.0%, " in text.replace(str(tmp_path) + "/", "") and "only in" in text and "L2 Mobius" in text
    assert "No cell has APTMoE and Mobius in both." in text                # S8 has no Mobius run


def test_compare_gives_a_schedule_ratio_per_cell(tmp_path, capsys) -> None:
    from aptmoe.sim.cli import main as sim_main

    _matrix_csv(tmp_path / "a", [("S8", "APTMoE", 2.0, -0.5), ("S8", "Mobius", 1.0, 0.0), ("M4", "APTMoE", 1.0, 0.0)])
    _matrix_csv(tmp_path / "b", [("S8", "APTMoE", 0.9, 0.0), ("S8", "Mobius", 1.0, 0.1), ("M4", "Mobius", 1.0, 0.0)])
    assert sim_main(["compare", str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    row = next(line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("S8 "))
    # measured a 2.0, b 0.9; predicted a 1.0 / 1.0, b 0.9 / 1.1
    assert row == ["S8", "2.000", "0.900", "1.000", "0.818"]
    assert sim_main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--ratio", "APTMoE/APTMoE"]) == 2
    err = capsys.readouterr().err
    assert "--ratio 'APTMoE/APTMoE' is not A/B of two schedules" in err and err.count("\n") == 1


@pytest.mark.parametrize("make, says", [
    (lambda t: None, "does not exist"),
    (lambda t: _matrix_csv(t / "b", [("X1", "GPipe", 1.0, 0.0)]), "share no run"),
])
def test_compare_refuses_what_it_cannot_compare_in_one_line(tmp_path, capsys, make, says) -> None:
    from aptmoe.sim.cli import main as sim_main

    _matrix_csv(tmp_path / "a", [("S8", "GPipe", 1.0, -0.2)])
    make(tmp_path)
    assert sim_main(["compare", str(tmp_path / "a"), str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert says in err and err.count("\n") == 1


# The latest one-GPU H200 matrix, predicted again from its stored runs with today's simulator
# and profile: its median errors as measured when the model last changed (session 7, the
# issuing thread's tolls: all 9.2%, held-back 13.1%; without them 11.1% and 13.2%), rounded up
# to the next half point. A model change that makes the stored runs worse fails here; one
# that makes them better should lower these.
# The one-GPU H200 grid of session 8 (docs/validation-h200-v5), each cell beside the profile of
# its own device call (the dispatch probe's host cost per block differed 1.8x between calls):
# with those profiles the model's error was 7.3% over all 48 runs, 8.2% over the 12 held
# back, the worst run 26.1% (docs/validation-h200-v5/README.md). Session 9's (v6, 10 cells on
# one lease, executor with the CPU-slack cap on the backward split): 8.0% over 40 runs, 10.4%
# over the 8 held back, the worst 31.7% (an S8 GPipe run; S8's same-work GPipe runs differ by
# up to 38%, docs/validation-h200-v6/README.md). The policy's per-micro-batch rule, made after
# these runs (an expert whose copy would land late runs on the CPU this micro-batch), moves the
# held-back median to 11.7%: its M4 G0.3 capped APTMoE run is now predicted with a policy that
# places experts differently from the executor that ran it; the bound follows, until v7.
# Session 10's (v7, 11 cells on one lease, executor at c23d28a, the profile of the same lease
# with expert curves every 32 tokens): 3.8% over 44 runs, 5.2% over the 12 held back, the worst
# 36.6% (S8 GPipe again: its same-work pair differed by 33%, docs/validation-h200-v7/README.md).
# Since session 11 a run is predicted with the decisions of the profile it planned with (the
# executor's default h200 for every stored grid): v5, v6 and v8 do not move; v7 goes from 3.8%
# to 4.8% (5.2 to 5.9% held back), most of it one run (S8 G0.6 capped APTMoE, +0.4% to +8.1%).
# Session 11's (v8, 11 cells on two leases, the first one's host slow: its three S8 cells
# 10-39% slower than v7's, docs/validation-h200-v8/README.md): 7.2%, worst 26.8%. Then an
# expert no micro-batch routes to gets no gradient, offload or update, as in the executor
# (v8's offload bytes and update counts now match the runs'): v5 7.3 -> 7.8%, v6 8.0 -> 8.3%,
# v7 4.8 -> 4.9%, v8 7.2 -> 8.8% (worst 28.5%). The predictions get faster in the G 0.6 cells,
# where the model was already short.
# Session 12: the capped link got a pacing thread of its own (exec/link.py), and the model's
# capped copies no longer idle the link for the pacer's lateness between them (they land that
# late; the next one starts on time). Every stored grid ran the link before it, whose copies
# idled the link about 0.5 ms each (S8 G0.6 capped: 494 us a 32 MiB load, start to start), so
# their capped cells are now predicted faster than they ran: v5 7.8 -> 7.8%, v6 8.3 -> 8.6%,
# v7 4.9 -> 5.0%, v8 8.8 -> 10.4% (held back 7.9%). Native cells do not move.
# Session 12's (v9, all 12 cells on one lease, the link with its pacing thread, the executor
# without torch.optim): 3.4% over 48 runs, 2.1% over the 12 held back, the worst 47.2% (S8
# GPipe: its same-work pairs differ by 33 and 40%, docs/validation-h200-v9/README.md).
DOCS = Path(__file__).resolve().parents[1] / "docs"
H200_FLAGS = ["--calibration", "h200-1gpu", "--steps", "3", "--no-plot", "-q", "--cell-profiles"]
H200_STORED = {
    "validation-h200-v5": (48, 12, {"all": (0.08, 0.27), "held-back": (0.085, 0.27)}),
    "validation-h200-v6": (40, 10, {"all": (0.09, 0.32), "held-back": (0.12, 0.32)}),
    "validation-h200-v7": (44, 11, {"all": (0.055, 0.37), "held-back": (0.06, 0.37)}),
    "validation-h200-v8": (44, 11, {"all": (0.105, 0.29), "held-back": (0.08, 0.24)}),
    "validation-h200-v9": (48, 12, {"all": (0.035, 0.48), "held-back": (0.025, 0.48)}),
}
# The same runs predicted with the committed h200-1gpu, the median of three calibrations
# (calibration/pool.py; session 11): v7 3.3% (held back 2.6%), v8 3.3% (5.7%); worst 28.3 and 29.3%.
# With session 12's link model (above): v7 3.7% (2.9%), v8 4.0% (6.0%); worst 28.3 and 29.3%.
# Since session 12 h200-1gpu is the median of four (session 12's lease added, its dispatch
# probe alone for the executor's host cost, which changed): v7 3.8% (4.5%), v8 4.1% (6.3%),
# v9 3.4% (2.1%); worst 36.5, 31.1 and 47.2%, all S8 GPipe runs. Since session 33 set each
# action's own host work apart from its layers' (Dispatch.action): v7 4.25% (4.7%), v8 3.7%
# (6.3%), v9 3.3% (1.9%); worst 28.5, 25.0 and 39.6%. Since session 35 pooled h200-1gpu's CPU
# Adam over all nine one-GPU calibrations of it (0.299 -> 0.262 ns/param at 14 threads): v7 3.5%
# (3.5%), v8 6.0% (6.4%), v9 3.9% (3.6%). These grids ran before 78e32c9 confined a rank's other
# threads off the CPU worker's cores; today's executor's sets improve (docs/measured/session35).
# Since session 37 (the issuing condition read per block; h200-1gpu's own-calls factors and its
# dispatch the median of 18 eager probe runs of today's executor): v7 3.9% (2.6%), v8 6.75%
# (5.9%), v9 6.2% (6.2%); worst 20.8, 27.5 and 20.7%. Predicted fast (the M cells' signed
# medians -2.7, -5.8 and -3.7%): the executor these grids ran issued its calls slower than today's.
H200_POOLED = {
    "validation-h200-v7": {"all": (0.045, 0.37), "held-back": (0.05, 0.33)},
    "validation-h200-v8": {"all": (0.068, 0.28), "held-back": (0.065, 0.24)},
    "validation-h200-v9": {"all": (0.063, 0.21), "held-back": (0.063, 0.21)},
}


@pytest.mark.parametrize("folder", sorted(H200_STORED))
def test_the_stored_h200_runs_are_predicted_as_well_as_when_the_model_last_changed(tmp_path, monkeypatch,
                                                                                    folder) -> None:
    runs, cells, bounds = H200_STORED[folder]
    report = _repredicted(folder, tmp_path, monkeypatch, H200_FLAGS)
    assert report["summary"]["all"]["runs"] == runs and f"{cells} of {cells} cells" in report["calibration"]
    _within(report, bounds)


@pytest.mark.parametrize("folder", sorted(H200_POOLED))
def test_the_stored_h200_runs_are_predicted_by_the_pooled_profile_as_when_it_was_made(tmp_path, monkeypatch,
                                                                                    folder) -> None:
    flags = [f for f in H200_FLAGS if f != "--cell-profiles"]
    _within(_repredicted(folder, tmp_path, monkeypatch, flags), H200_POOLED[folder])


def test_the_stored_2gpu_runs_name_the_figures_their_prediction_fell_back_on(tmp_path, monkeypatch) -> None:
    """Session 13's 2-GPU grid (docs/validation-h200-2gpu) ran planned with h200-1gpu's 16
    cores: each rank had 8, its CPU worker 6 threads, where h200-2gpu measured CPU work at 14
    and 16. Predicted with h200-2gpu: 18.9% over 48 runs (19.4% held back), the worst 44.0%;
    16.9% since its receive figures (session 14), 15.7% since Adam's figure for ranks at once
    applies only while they overlap; the bounds below leave room for both. Since session 22's
    recompute beside the gradient's wait: 16.8% (16.1% held back), the worst 43.6%.
    The report names the thread-scaled Adam every offload run leaned on, and labels the blocks
    that ran beside a posted receive."""
    flags = ["--calibration", "h200-2gpu", "--gpus", "2", "--steps", "3", "--no-plot", "-q"]
    report = _repredicted("validation-h200-2gpu", tmp_path, monkeypatch, flags)
    assert report["summary"]["all"]["runs"] == 48
    _within(report, {"all": (0.20, 0.45), "held-back": (0.205, 0.31)})
    assert report["fallbacks"]["adam cpu: 6 threads outside measured 14..16, scaled by measured/threads"] == 36
    assert {"recv", "cpu+recv", "load+recv"} <= set(report["beside"]["fit"])
    assert "## Cost figures not measured" in (tmp_path / "validation-h200-2gpu" / "matrix.md").read_text()


def test_the_second_2gpu_grid_is_predicted_as_when_it_ran(tmp_path, monkeypatch) -> None:
    """Session 14's 2-GPU grid (docs/validation-h200-2gpu-v2): planned with h200-2gpu (16
    cores a rank, CPU work at measured thread counts) and predicted with its receive figures
    (`recv_wait`, measured on the same lease): 3.8% over 48 runs (4.6% held back), the worst
    32.7% (S8 G0.3 capped APTMoE, whose CPU experts stalled on threads left loose: see the
    folder's README). Only L's gate (4 experts: no curve) fell back, on the roofline.
    Then an Adam chunk takes the figure for ranks at once only while another rank updates
    (sim/host_memory.py): the fit set 3.5 -> 3.2%, all 3.3%, held back 4.6 -> 6.3%, the
    worst 32.9% (S8 G0.6 native Mobius). Since session 22's recompute beside the gradient's
    wait (the executor's order on a GPU): 4.7% (9.7% held back), the worst 34.1% (the same
    run), ranking 7 of 12; 8 since session 23's ranking leaves the order of one plan's runs
    unjudged."""
    flags = ["--calibration", "h200-2gpu", "--gpus", "2", "--steps", "3", "--no-plot", "-q"]
    report = _repredicted("validation-h200-2gpu-v2", tmp_path, monkeypatch, flags)
    assert report["summary"]["all"]["runs"] == 48
    _within(report, {"all": (0.048, 0.345), "fit": (0.046, 0.345), "held-back": (0.098, 0.22)})
    # h200-2gpu has no gaps between Adam chunks (`cpu_job.adam_gap_s`): named, not a fallback of Adam's figures
    assert not [f for f in report["fallbacks"] if ("adam" in f and not f.startswith("adam gap")) or "recv" in f], \
        report["fallbacks"]


def test_the_third_2gpu_grid_ran_confined_and_is_predicted_as_when_it_ran(tmp_path, monkeypatch) -> None:
    """Session 15's 2-GPU grid (docs/validation-h200-2gpu-v3): the ranks' threads confined to
    their cores (no thread loose in any run), S8 with 6 timed steps. 3.8% over 48 runs, 8.6%
    held back, the worst 39.6% (S8 G0.3 capped GPipe: the same work ran 0.14-0.30 s/step on
    that lease, see the folder's README); the ranking right in 10 of 12 cells (9 before session
    16's CPU-expert factors of the issuing thread, 7 in v2). Since session 22's recompute
    beside the gradient's wait: 5.1% (11.0% held back), the worst 49.4% (the same run), ranking
    9 of 12: its S8 cells are predicted 10-20% fast, as in v4. 10 of 12 since session 23's
    ranking leaves the order of one plan's runs unjudged (Mobius and GPipeOffload on L2).
    Since session 34's dispatch with each action's own host work apart: 4.5% (9.6% held back),
    the worst 50.4% (the same run, 49.0% before). Since session 37 reads the issuing thread's
    condition as each block's call starts: the fit cells 4.8 -> 4.9%."""
    flags = ["--calibration", "h200-2gpu", "--gpus", "2", "--steps", "3,S=6", "--no-plot", "-q"]
    report = _repredicted("validation-h200-2gpu-v3", tmp_path, monkeypatch, flags)
    assert report["summary"]["all"]["runs"] == 48
    _within(report, {"all": (0.052, 0.51), "fit": (0.0495, 0.51), "held-back": (0.111, 0.42)})
    assert report["summary"]["all"]["ranking_right"] >= 10
    for results, doc in _stored_results("validation-h200-2gpu-v3"):
        for res in doc["schedules"].values():
            assert all(t["loose"] == 0 for t in res["threads"]), results


def test_the_fourth_2gpu_grid_measures_s8_as_the_median_of_three_runs(tmp_path, monkeypatch) -> None:
    """Session 18's grid (docs/validation-h200-2gpu-v4): v3's M4 and L2 cells, and its S8 row
    run again with three runs of each schedule in fresh processes, the median run compared
    (`--repeats 1,S=3`). 3.3% over 48 runs, 6.0% held back, the worst 19.9% (S8 G0.3 native
    APTMoE, the model's: APTMoE is under-predicted in every S8 cell); v3's S8 draws of 30-40%
    are gone. Ranking right in 10 of 12. Since session 19's `cpu_job` section and
    `adam_factor`: 3.2%, 5.9%, the worst 19.2% (the same run). Since session 20's factors read
    from the executor's own calls (`adam_factor` 1.33, `copy_adam_factor` 3.31): 3.2%, 4.8%
    held back, the worst 15.8% (S8 G0.6 capped GPipe, a draw; S8 G0.3 native APTMoE 14.4%).
    Since session 21's factors as the calls' time rather than their median (1.42 and 3.24) and
    its `cpu_job` from a probe off the grid: 3.2%, 4.5% held back, the worst 15.8% (the same;
    S8 G0.3 native APTMoE 13.8%). Since session 22's recompute beside the gradient's wait:
    4.3%, 9.1% held back, the worst 19.0% (S8 G0.3 native Mobius, -19%): every S8 run is now
    predicted fast (-3 to -19%), and L2 G0.6 GPipe -13.3%, where one expert call a run stalls
    24 ms a step that the model has no term for (docs/measured/offline-session22), which
    session 23 found to be lazy kernel loading (docs/measured/session23). Ranking 11 of 12
    since session 23's ranking leaves the order of one plan's runs unjudged. Since session 34's
    dispatch with each action's own host work apart: 3.8%, 6.0% held back, the worst 20.4% (S8
    G0.3 native GPipe, 18.2% before: one-layer stages now pay no share of the loss)."""
    flags = ["--calibration", "h200-2gpu", "--gpus", "2", "--steps", "3,S=6", "--repeats", "1,S=3", "--no-plot", "-q"]
    report = _repredicted("validation-h200-2gpu-v4", tmp_path, monkeypatch, flags)
    assert report["summary"]["all"]["runs"] == 48
    _within(report, {"all": (0.043, 0.205), "fit": (0.041, 0.203), "held-back": (0.091, 0.205)})
    assert report["summary"]["all"]["ranking_right"] >= 11
    for results, doc in _stored_results("validation-h200-2gpu-v4", "S8*"):
        for res in doc["schedules"].values():
            assert len(res["repeats"]["iteration_s"]) == 3, results
            assert res["iteration_s"] == sorted(res["repeats"]["iteration_s"])[1], results


def test_the_held_back_diagonal_measured_again_on_a_later_lease(tmp_path, monkeypatch) -> None:
    """Session 20 (docs/validation-h200-2gpu-v5-heldback): the held-back cells measured again on
    a fresh nvidia-h200-x2 lease, after `h200-2gpu` took its `adam_factor` and
    `copy_adam_factor` from the executor's own calls; no run in it informed the model. 3.9%,
    the worst 14.4% (S8 G0.3 native Mobius; with the profile before, 19.3%), ranking right in
    2 of 3 (S8 G0.3 native: measured APTMoE 3.6% faster than Mobius, predicted a tie the other
    way). Since session 21's profile (the factors as the calls' time): 3.9%, the worst 13.8%.
    Since session 22's recompute beside the gradient's wait: 5.3%, the worst 21.2% (the same
    run, -21%)."""
    flags = ["--calibration", "h200-2gpu", "--gpus", "2", "--steps", "3,S=6", "--repeats", "1,S=3", "--only",
             "held-back", "--no-plot", "-q"]
    report = _repredicted("validation-h200-2gpu-v5-heldback", tmp_path, monkeypatch, flags)
    assert report["summary"]["held-back"]["runs"] == 12
    _within(report, {"held-back": (0.054, 0.213)})
    assert report["summary"]["held-back"]["ranking_right"] >= 2


def _fresh_flags(models: str, links: str) -> list[str]:
    return ["--calibration", "h200-2gpu", "--gpus", "2", "--steps", "3,S=6", "--repeats", "1,S=3", "--models", models,
            "--gini", "0.45", "--links", links, "--no-plot", "-q"]


def test_fresh_configs_measured_after_the_model_was_fixed(tmp_path, monkeypatch) -> None:
    """Session 21 (docs/validation-h200-2gpu-v6-fresh): six configs no grid cell or probe has
    (S4, M8 and L4, G 0.45, native and capped), measured after the change on the lease whose
    calibration runs set the shipped factors; none of its runs informed anything, so all 24
    are held back whatever the diagonal calls them. 4.4%, the worst 30.3% (S4 G0.45 capped
    GPipe: predicted 0.089 s/step, and the same work, which uses no link, ran 0.068, 0.078
    and 0.089 s/step in three measurements of that lease); ranking right in 5 of 6. Since
    session 22's recompute beside the gradient's wait, found on this set's M8 GPipe (so no
    longer held back from the model): 3.6%, the worst 13.3% (S4 native Mobius, -13%), ranking
    4 of 6 (S4 native and M8 native). With session 24's CPU expert curves 3.8%: the S4 APTMoE
    runs went 0.2-0.4 points further under, the median run with them. Since session 34's
    dispatch with each action's own host work apart: 3.2%, the worst 13.7% (S4 capped GPipe,
    predicted fast; 10.5% before). Since session 39's GPU work between a layer's blocks: 3.3%,
    the worst 13.8%."""
    flags = _fresh_flags("S:4:4,M:8:4,L:4:2:4", "native,8")
    report = _repredicted("validation-h200-2gpu-v6-fresh", tmp_path, monkeypatch, flags)
    assert report["summary"]["all"]["runs"] == 24
    _within(report, {"all": (0.039, 0.139)})
    assert report["summary"]["all"]["ranking_right"] >= 4


def test_a_fresh_config_measured_again_on_the_same_lease(tmp_path, monkeypatch) -> None:
    """Session 21 (docs/validation-h200-2gpu-v6-again): the S4 G0.45 native cell measured again
    13 minutes after the first (each schedule the median of three runs): GPipe 0.078 then
    0.089 s/step, Mobius 0.143 then 0.132, APTMoE 0.135 then 0.152; predicted the same. 2.6%,
    the worst 10.8%; Mobius and APTMoE swapped places between the two measurements. Since
    session 22's recompute beside the gradient's wait: 10.3%, the worst 17.2% (GPipe, -17%)."""
    report = _repredicted("validation-h200-2gpu-v6-again", tmp_path, monkeypatch, _fresh_flags("S:4:4", "native"))
    assert report["summary"]["all"]["runs"] == 4
    _within(report, {"all": (0.104, 0.173)})


def test_fresh_configs_run_with_kernels_loaded_eagerly(tmp_path, monkeypatch) -> None:
    """Session 23 (docs/validation-h200-2gpu-v7-fresh): six configs no fix has seen (S6, M6 with
    4 experts, L2 with 8; G 0.5; native and capped), every run with eager kernel loading, all
    24 held back. 2.3%, the worst 43.3% (S6 native GPipe: the same work ran 0.127 s/step in
    the capped cell, predicted 0.107 in both); M and L 2.0%, 13 of their 16 runs within 2.5%;
    ranking right in 4 of 6 (M6 capped: APTMoE's CPU experts 18% over the model; L2 native:
    GPipeOffload's one run 0.694 s against APTMoE's 0.720, the same plan as Mobius's, which
    ran 0.875 s, and 0.720-0.797 s in three runs later). Since session 30's copy limits and message posts (aptmoe/profile.py CopyLimits, Dispatch.post): 2.4%.
    Since session 31's host memory figures pooled over eleven calibrations (h200-2gpu): 3.3%."""
    flags = ["--calibration", "h200-2gpu", "--gpus", "2", "--steps", "3,S=6", "--repeats", "1,S=3",
             "--models", "S:6:6,M:6:6:4,L:2:2:8", "--gini", "0.5", "--links", "native,8", "--held-back-every", "1",
             "--no-plot", "-q"]
    report = _repredicted("validation-h200-2gpu-v7-fresh", tmp_path, monkeypatch, flags)
    assert report["summary"]["held-back"]["runs"] == 24 and report["summary"]["fit"]["runs"] == 0
    _within(report, {"held-back": (0.034, 0.434)})
    assert report["summary"]["held-back"]["ranking_right"] >= 4
    assert {c["cell"]: c["same_plans"] for c in report["configs"] if c["same_plans"]} == {
        "L2x8-G0.5-native-2gpu": [["GPipeOffload", "Mobius"]], "L2x8-G0.5-cap8-2gpu": [["GPipeOffload", "Mobius"]]}
    assert "(held-back set; median of each run's median)" in (tmp_path / "validation-h200-2gpu-v7-fresh" / "matrix.md").read_text()
    for results, doc in _stored_results("validation-h200-2gpu-v7-fresh"):
        for res in doc["schedules"].values():
            assert res["kernel_loading"] == "eager" and len(res["gpu_bytes_outside_allocator"]) == 2, results
    # M6 capped APTMoE: the run and its prediction put other experts on the CPU (33 of 90 jobs alike
    # since session 24's CPU curves; 34 of 94 before)
    from aptmoe.cpu_jobs_alike import cpu_jobs_alike
    from aptmoe.trace import Trace, run_trace

    runs = {(r["cell"], r["pipeline"]): r for r in report["runs"]}
    cell = tmp_path / "validation-h200-2gpu-v7-fresh" / "cells" / "M6x4-G0.5-cap8-2gpu"
    jobs = cpu_jobs_alike(Trace.load(run_trace(cell / "real", "APTMoE")), Trace.load(cell / "trace-APTMoE-predicted.json"))
    assert (jobs.measured, jobs.predicted, jobs.shared) == (67, 56, 33)
    assert runs[("M6x4-G0.5-cap8-2gpu", "APTMoE")]["cpu_jobs_alike"] == jobs.alike
    assert runs[("M6x4-G0.5-cap8-2gpu", "Mobius")]["cpu_jobs_alike"] is None


def test_a_fresh_config_after_the_cpu_expert_recalibration(tmp_path, monkeypatch) -> None:
    """Session 24 (docs/validation-h200-2gpu-v8-fresh): M6 with 8 experts, G 0.4, native and
    capped, measured after h200-2gpu took CPU expert curves timed on both ranks' workers at
    once; all 8 runs held back. 1.3%, the worst 13.1% (native Mobius, whose issuing thread was
    held 2.4-5.9 ms in 16 calls beside the rank's Adam: 9.3 ms a step of stalls); ranking right
    in both with ties, in one strictly (capped: Mobius 2.7% ahead of APTMoE, predicted behind).
    Since session 30's copy limits and message posts (aptmoe/profile.py CopyLimits, Dispatch.post): the worst 13.5%.
    Since session 31's compounding of an Adam chunk's slowdowns (sim/host_memory.py): 1.2%, the
    worst 11.3%; the native cell's order wrong (APTMoE 11% ahead of Mobius, predicted 0.2% behind).
    Since its host memory figures pooled over eleven calibrations (h200-2gpu): 2.7%, the worst
    10.7%, both orders right. Since session 34's dispatch with each action's own host work
    apart: 2.7%, the worst 10.3%; the native Mobius run's stalls 8.4 ms a step over the prediction.
    Since session 39's GPU work between a layer's blocks: 3.0%, the worst 8.9%. Since session
    42's loss and embedding on the GPU (h200-2gpu's curves of kinds l and m): 3.2%, the worst 8.9%."""
    flags = ["--calibration", "h200-2gpu", "--gpus", "2", "--steps", "3", "--models", "M:6:6:8", "--gini", "0.4",
             "--links", "native,8", "--held-back-every", "1", "--no-plot", "-q"]
    report = _repredicted("validation-h200-2gpu-v8-fresh", tmp_path, monkeypatch, flags)
    assert report["summary"]["held-back"]["runs"] == 8 and report["summary"]["fit"]["runs"] == 0
    _within(report, {"held-back": (0.033, 0.108)})
    assert report["summary"]["held-back"]["ranking_right"] == 2
    runs = {(r["cell"], r["pipeline"]): r for r in report["runs"]}
    assert runs[("M6x8-G0.4-native-2gpu", "Mobius")]["stall_s_per_step"] > 0.008
    assert runs[("M6x8-G0.4-cap8-2gpu", "APTMoE")]["stall_s_per_step"] > 0.017
    for results, doc in _stored_results("validation-h200-2gpu-v8-fresh"):
        for res in doc["schedules"].values():
            assert res["kernel_loading"] == "eager", results


def test_v8_freshs_config_measured_again(tmp_path, monkeypatch) -> None:
    """Session 25 (docs/validation-h200-2gpu-v8-again): the same 8 runs on another lease, the
    model and profile unchanged. 1.7%, the worst 4.9% (native APTMoE): v8-fresh's two misses
    (native Mobius -13.1%, capped APTMoE -11.5%) were those runs' own, 17% and 9% slower than
    here with the same predictions. The native cell's order is wrong (Mobius 7% ahead, APTMoE
    predicted 0.4% ahead). Since session 30's copy limits and message posts (aptmoe/profile.py CopyLimits, Dispatch.post): the worst 5.6%.
    Since session 31's compounding of an Adam chunk's slowdowns (sim/host_memory.py): 1.3%, the
    worst 5.0%, both orders right (native: Mobius predicted 0.2% ahead, a tie). v8-fresh's native
    runs had APTMoE 11% ahead: the two leases ordered that config both ways. Since its host
    memory figures pooled over eleven calibrations (h200-2gpu): 1.3%, the worst 8.7% (native
    Mobius), the native order wrong again (APTMoE predicted 0.4% ahead): the prediction ties
    the two, and each lease ran them 7-11% apart, one way on one lease, the other on the next.
    Since session 34's dispatch with each action's own host work apart: 1.3%, the worst 8.8%.
    Since session 42's loss and embedding on the GPU: 1.35%, the worst 9.0%."""
    flags = ["--calibration", "h200-2gpu", "--gpus", "2", "--steps", "3", "--models", "M:6:6:8", "--gini", "0.4",
             "--links", "native,8", "--held-back-every", "1", "--no-plot", "-q"]
    report = _repredicted("validation-h200-2gpu-v8-again", tmp_path, monkeypatch, flags)
    assert report["summary"]["held-back"]["runs"] == 8
    _within(report, {"held-back": (0.014, 0.091)})
    assert report["summary"]["held-back"]["ranking_right"] == 1
    first = _repredicted("validation-h200-2gpu-v8-fresh", tmp_path / "first", monkeypatch, flags)
    again = {(r["cell"], r["pipeline"]): r for r in report["runs"]}
    for r in first["runs"]:
        twin = again[(r["cell"], r["pipeline"])]
        assert twin["predicted_s"] == pytest.approx(r["predicted_s"], rel=1e-6)
        moved = r["measured_s"] / twin["measured_s"] - 1
        assert (moved > 0.08) == ((r["cell"], r["pipeline"]) in {("M6x8-G0.4-native-2gpu", "Mobius"),
                                                                  ("M6x8-G0.4-cap8-2gpu", "APTMoE")}), r


def test_a_fresh_config_each_schedule_the_median_of_three_runs(tmp_path, monkeypatch) -> None:
    """Session 25 (docs/validation-h200-2gpu-v9-fresh): M6 with 8 experts at G 0.55, every
    schedule run three times and the median run kept; all held back. 4.6%, the worst 15.2%
    (native APTMoE, predicted fast: its backwards wait between recompute and backward longer
    than the model has them); ranking right in the capped cell only. Since session 30's copy limits and message posts (aptmoe/profile.py CopyLimits, Dispatch.post): 4.0%,
    the worst 15.6%."""
    flags = ["--calibration", "h200-2gpu", "--gpus", "2", "--steps", "3", "--repeats", "3", "--models", "M:6:6:8",
             "--gini", "0.55", "--links", "native,8", "--held-back-every", "1", "--no-plot", "-q"]
    report = _repredicted("validation-h200-2gpu-v9-fresh", tmp_path, monkeypatch, flags)
    assert report["summary"]["held-back"]["runs"] == 8
    _within(report, {"held-back": (0.047, 0.156)})
    assert report["summary"]["held-back"]["ranking_right"] == 1
    for results, doc in _stored_results("validation-h200-2gpu-v9-fresh"):
        for res in doc["schedules"].values():
            assert len(res["repeats"]["iteration_s"]) == 3, results


V10 = ["--gpus", "2", "--steps", "3", "--repeats", "3", "--models", "M:6:6:8", "--gini", "0.35",
       "--held-back-every", "1", "--no-plot", "-q"]


def test_a_fresh_config_at_g_0_35_ranks_aptmoe_behind_mobius_where_predicted_ahead(tmp_path, monkeypatch) -> None:
    """Session 26 (docs/validation-h200-2gpu-v10-fresh): M6 with 8 experts at G 0.35, each
    schedule the median of three runs, all held back: 6.9%, the worst 21.3% (capped APTMoE),
    ranking right in neither cell: APTMoE measured behind Mobius in both and predicted ahead."""
    report = _repredicted("validation-h200-2gpu-v10-fresh", tmp_path, monkeypatch,
                          ["--calibration", "h200-2gpu", "--links", "native,8", *V10])
    _held_back(report, (0.069, 0.214), runs=8, ranking_right=0)
    runs = {(r["cell"].split("-")[2], r["pipeline"]): r for r in report["runs"]}
    for link in ("native", "cap8"):
        aptmoe, mobius = runs[(link, "APTMoE")], runs[(link, "Mobius")]
        assert aptmoe["measured_s"] > 1.05 * mobius["measured_s"] and aptmoe["predicted_s"] < mobius["predicted_s"]


@pytest.mark.parametrize("link, cell", [("native", "M6x8-G0.35-native-2gpu"), ("8", "M6x8-G0.35-cap8-2gpu")])
def test_the_lease_s_own_dispatch_moves_no_prediction_of_v10_by_over_1_5_percent(link, cell, tmp_path,
                                                                                  monkeypatch) -> None:
    """Each v10-fresh cell predicted with the dispatch figures measured on its lease just
    before it (docs/measured/session26, 0.84x and 1.26x the profile's attention forward)
    against the profile's own: the block calls' host cost is not what these runs miss. Both
    are h200-2gpu as shipped now; the lease's takes its block calls' figures from the lease
    (not its message posts, which the lease did not time). The most it moved was 1.2% before
    session 30's copy limits and message posts, 1.3% since."""
    doc = json.loads((DOCS.parent / "aptmoe" / "profiles" / "h200-2gpu.json").read_text())
    measured = read_json(DOCS / "measured" / "session26" / f"h200-2gpu-lease-{cell.split('-')[2]}.json")
    doc["dispatch"] = {**measured["dispatch"], "post": doc["dispatch"]["post"]}
    lease = tmp_path / "lease.json"
    lease.write_text(json.dumps(doc))
    flags = ["--links", link, *V10]
    stock = _repredicted("validation-h200-2gpu-v10-fresh", tmp_path / "stock", monkeypatch,
                         ["--calibration", "h200-2gpu", *flags], only=cell)
    own = _repredicted("validation-h200-2gpu-v10-fresh", tmp_path / "lease", monkeypatch,
                       ["--calibration", str(lease), *flags], only=cell)
    assert len(stock["runs"]) == len(own["runs"]) == 4
    theirs = {r["pipeline"]: r["predicted_s"] for r in own["runs"]}
    moved = [theirs[r["pipeline"]] / r["predicted_s"] - 1 for r in stock["runs"]]
    assert max(abs(m) for m in moved) <= 0.015, moved
    assert any(abs(m) > 0.001 for m in moved)             # the lease's figures were used


V11 = ["--gpus", "2", "--steps", "3", "--repeats", "3", "--models", "M:6:6:8,L:2:2:8", "--gini", "0.45,0.4",
       "--links", "native,8", "--held-back-every", "1", "--no-plot", "-q"]


def test_fresh_configs_planned_with_the_lease_s_cpu_curves_meet_the_targets(tmp_path, monkeypatch) -> None:
    """Session 27 (docs/validation-h200-2gpu-v11-fresh): M6x8 at G 0.45 (native, capped) and
    L2x8 at G 0.4 (capped), each cell planned and predicted with h200-2gpu whose CPU expert
    curves were measured on the cell's lease just before it; every schedule the median of
    three runs, all held back: 1.7%, the worst 9.0% (capped M APTMoE), ranking right in all
    three cells (L's Mobius and GPipeOffload tie). Since session 31's compounding of an Adam
    chunk's slowdowns (sim/host_memory.py): 1.8%. Since session 37 reads the issuing thread's
    condition as each block's call starts: 1.6%, the worst 9.1%."""
    report = _repredicted("validation-h200-2gpu-v11-fresh", tmp_path, monkeypatch,
                          ["--calibration", "h200-2gpu", "--cell-profiles", *V11])
    _held_back(report, (0.017, 0.092), runs=12, configs=3, ranking_right=3)
    for cell in (DOCS / "validation-h200-2gpu-v11-fresh" / "cells").iterdir():
        # each cell's profile is h200-2gpu with the curves of its own model timed on its lease
        doc = json.loads(read_text(stored_file(cell / "profile.json")))
        size = {"M": 2048, "L": 4096}[cell.name[0]]
        assert doc["name"] == "h200-2gpu" and {c["d"] for c in doc["cpu_expert"]} == {size}, cell
        assert f"--models {cell.name[0]} " in doc["made_by"]["command"], cell


def test_v11_predicted_with_the_stored_cpu_curves_misses_only_by_capped_m_aptmoe(tmp_path, monkeypatch) -> None:
    """The same runs predicted with h200-2gpu's own CPU curves: the lease's curves moved one
    prediction by over 0.1%, capped M APTMoE's (1.4% slower), whose lease timed its CPU
    experts 1.3-1.5x the stored curves; its error is 10.3% with the stored curves, 9.0% with
    the lease's. Both arms are h200-2gpu as shipped now, the lease's with each cell's CPU curves:
    since session 30's copy limits and message posts, the lease's curves move it 0.7%, and its
    error with the stored curves is 9.5%; since session 31's host memory figures pooled over
    eleven calibrations, 10.3%; since session 39's GPU work between a layer's blocks, 8.4%."""
    stock = _repredicted("validation-h200-2gpu-v11-fresh", tmp_path / "stock", monkeypatch,
                         ["--calibration", "h200-2gpu", *V11])
    shipped = json.loads((DOCS.parent / "aptmoe" / "profiles" / "h200-2gpu.json").read_text())

    def with_its_curves(doc: dict) -> dict:
        return {**shipped, "cpu_expert": doc["cpu_expert"]}

    lease = _repredicted("validation-h200-2gpu-v11-fresh", tmp_path / "lease", monkeypatch,
                         ["--calibration", "h200-2gpu", "--cell-profiles", *V11], cell_profile=with_its_curves)
    theirs = {(r["cell"], r["pipeline"]): r["predicted_s"] for r in lease["runs"]}
    moved = {(r["cell"], r["pipeline"]): theirs[(r["cell"], r["pipeline"])] / r["predicted_s"] - 1
             for r in stock["runs"]}
    assert {k for k, m in moved.items() if abs(m) > 0.001} == {("M6x8-G0.45-cap8-2gpu", "APTMoE")}
    assert 0.005 < moved[("M6x8-G0.45-cap8-2gpu", "APTMoE")] < 0.02
    assert stock["summary"]["held-back"]["worst_run"] == "M6x8-G0.45-cap8-2gpu APTMoE"
    assert 0.079 < stock["summary"]["held-back"]["worst_abs_error"] < 0.089


V12 = ["--gpus", "2", "--steps", "3", "--repeats", "3", "--models", "M:6:6:8", "--gini", "0.3", "--links", "native",
       "--held-back-every", "1", "--no-plot", "-q"]


def test_a_fresh_cell_after_receives_posted_on_demand(tmp_path, monkeypatch) -> None:
    """Session 29 (docs/validation-h200-2gpu-v12-fresh): M6x8 at G 0.3, native, the executor
    posting receives on demand; three runs a schedule, held back: 2.7%, the worst 10.2%
    (Mobius, predicted too slow: this lease's Adam ran faster than h200-2gpu's), and the
    ranking wrong: APTMoE measured 5.8% slower than Mobius, and predicted 0.8% faster. Since
    session 31's compounding of an Adam chunk's slowdowns (sim/host_memory.py): 6.1%, the worst
    14.8%: this lease's two ranks updated at 0.31-0.32 ns/param where its profile says 0.42, and
    each slowdown beside copies now multiplies that miss."""
    report = _repredicted("validation-h200-2gpu-v12-fresh", tmp_path, monkeypatch,
                          ["--calibration", "h200-2gpu", "--cell-profiles", *V12])
    _held_back(report, (0.062, 0.149), runs=4, configs=1, ranking_right=0, worst_run="M6x8-G0.3-native-2gpu Mobius")
    assert all(r["error"] > 0 for r in report["runs"])          # every schedule predicted slower


V13 = ["--gpus", "2", "--steps", "3", "--repeats", "3", "--models", "M:6:6:8", "--gini", "0.5", "--links", "native",
       "--held-back-every", "1", "--no-plot", "-q"]


def test_a_fresh_cell_after_the_copy_limits(tmp_path, monkeypatch) -> None:
    """Session 30 (docs/validation-h200-2gpu-v13-fresh): M6x8 at G 0.5, native, three runs a
    schedule, held back, measured before the copy limits were in the profile and predicted
    with h200-2gpu as shipped after: 6.1%, the worst 15.0% (APTMoE, predicted fast) and the
    ranking wrong (APTMoE measured 6.8% behind Mobius, predicted 1.6% ahead). The offloads
    come 11-13% short of the runs' with the limits, 19-22% without; the ranks' Adam ran 0.453
    ns/param in Mobius against 0.424 predicted. Since session 34's dispatch with each action's
    own host work apart: 1.2%, the worst 8.5%, GPipeOffload within 0.1%."""
    report = _repredicted("validation-h200-2gpu-v13-fresh", tmp_path, monkeypatch,
                          ["--calibration", "h200-2gpu", *V13])
    _held_back(report, (0.062, 0.151), runs=4, configs=1, ranking_right=0, worst_run="M6x8-G0.5-native-2gpu APTMoE")
    runs = {r["pipeline"]: r for r in report["runs"]}
    assert all(runs[p]["error"] < 0 for p in ("Mobius", "APTMoE"))     # predicted fast
    assert abs(runs["GPipeOffload"]["error"]) < 0.005
    assert all(-0.14 < runs[p]["err/offload"] < -0.10 for p in ("Mobius", "APTMoE")), runs


V10_1GPU = ["--gpus", "1", "--steps", "3", "--repeats", "3", "--models", "M:4:4:8", "--gini", "0.5", "--links", "native",
            "--held-back-every", "1", "--no-plot", "-q"]


def test_a_fresh_one_gpu_cell_planned_with_its_lease_s_own_figures(tmp_path, monkeypatch) -> None:
    """Session 30 (docs/validation-h200-v10-fresh): M4x8 at G 0.5, native, one GPU, three runs a
    schedule, held back, planned and predicted with h200-1gpu carrying the lease's dispatch
    and Adam timed just before: 11.5%, the worst 15.6% (APTMoE), every offloading schedule
    predicted fast; with h200-1gpu as shipped 8.2%, the worst 9.6%, every one predicted slow.
    The lease's host was faster when calibrated than in the runs after. Since session 32 gave
    h200-1gpu its CPU jobs' waits (`cpu_job`, which it had lacked): 8.5% with it as shipped;
    since session 33 set each action's own host work apart (its one-layer stages' start and
    end, charged once each): 10.1%, the worst 11.3%; with the policy's answers charged to the
    issuing thread (session 35, `policy_host`), the worst 11.4%. With h200-1gpu's CPU Adam the
    median of all nine one-GPU calibrations (session 35): 1.7%, the worst 2.2%. With session 38's
    h200-1gpu (the CPU worker's gaps between Adam chunks): 2.0%, the worst 2.4% (Mobius and
    GPipeOffload, predicted slow; the lease's profile has no gaps and is as before). With session
    39's (the GPU's work between a layer's blocks): 2.0%, the worst 2.5% (GPipeOffload). With
    session 42's (the loss and the embedding on the GPU): 2.4%, the worst 2.6%, every run still
    predicted slow, and the ranking right strictly."""
    lease = _repredicted("validation-h200-v10-fresh", tmp_path / "lease", monkeypatch,
                         ["--calibration", "h200-1gpu", "--cell-profiles", *V10_1GPU])
    shipped = _repredicted("validation-h200-v10-fresh", tmp_path / "shipped", monkeypatch,
                           ["--calibration", "h200-1gpu", *V10_1GPU])
    _held_back(lease, (0.116, 0.157), runs=4, ranking_right=1, ranking_strict=0,
               worst_run="M4x8-G0.5-native-1gpu APTMoE")
    _held_back(shipped, (0.024, 0.026), runs=4, ranking_right=1, ranking_strict=1)
    offloading = ("GPipeOffload", "Mobius", "APTMoE")
    assert all(r["error"] < -0.09 for r in lease["runs"] if r["pipeline"] in offloading)
    assert all(abs(r["error"]) < 0.026 for r in shipped["runs"] if r["pipeline"] in offloading)
    doc = json.loads(read_text(stored_file(DOCS / "validation-h200-v10-fresh" / "cells" / "M4x8-G0.5-native-1gpu"
                                           / "profile.json")))
    assert doc["name"] == "h200-1gpu-lease" and "copies_beside_adam" in doc["host_memory"]


V11_1GPU = ["--gpus", "1", "--steps", "3,S=6", "--repeats", "3", "--models", "M:4:4:8,L:2:2:8,S:8:8:8",
            "--gini", "0.35,0.4,0.45", "--links", "native,8", "--held-back-every", "1", "--no-plot", "-q"]


def test_four_fresh_one_gpu_cells_planned_with_the_shipped_profile(tmp_path, monkeypatch) -> None:
    """Session 31 (docs/validation-h200-v11-fresh): M4x8 at G 0.35 native and capped, L2x8 at
    G 0.4 native, S8x8 at G 0.45 capped, one GPU, three runs a schedule, held back, planned and
    predicted with h200-1gpu: 1.9%, the worst 22.4% (S GPipe, whose three runs spread 39%); the
    ranking right in 4 of 4 with ties, 3 strictly; the M cells alone 1.1%, the worst 4.6%.
    Predicted with the lease's Adam, timed just before the native M cell, its offloading
    schedules come out 8.5-10.2% fast. Since session 33 set each action's own host work apart
    from its layers': 1.4%, the worst 15.9% (S GPipe); the M cells 1.2%, the worst 3.5%. With
    h200-1gpu's CPU Adam the median of all nine one-GPU calibrations (session 35): 1.9%, the M
    cells 3.0%, the worst 8.4% (the native cell's offloading schedules now predicted fast: this
    lease's runs put their Adam chunks at 0.279-0.288 ns/param, the profile at 0.262). With
    session 37's h200-1gpu (the own-calls factors, the dispatch of 18 eager probe runs): 2.0%,
    the worst 12.3% (S APTMoE; S GPipe +0.1%); the M cells 3.1%, the worst 8.3%; with the
    lease's Adam the native M cell's offloading schedules 6.3-9.8% fast. With session 38's
    h200-1gpu (the CPU worker's gaps between Adam chunks): 1.6%, the worst 12.5%, 2 ranked right
    strictly; the M cells 3.1%, the worst 8.0% (native GPipeOffload); with the lease's Adam the
    native M cell's offloading schedules 5.6-8.3% fast."""
    report = _repredicted("validation-h200-v11-fresh", tmp_path / "shipped", monkeypatch,
                          ["--calibration", "h200-1gpu", *V11_1GPU])
    _held_back(report, (0.017, 0.126), runs=16, configs=4, ranking_right=4, ranking_strict=2,
               worst_run="S8x8-G0.45-cap8-1gpu APTMoE")
    m = [abs(r["error"]) for r in report["runs"] if r["model"] == "M"]
    assert len(m) == 8 and statistics.median(m) <= 0.032 and max(m) <= 0.085, m
    # the lease's figures as `lease-adam` puts them onto h200-1gpu: its Adam, its copies beside Adam
    lease = read_json(DOCS / "measured" / "session31" / "lease-adam-before.json")     # kept as .json.xz
    profile = tmp_path / "lease.json"
    doc = json.loads((Path(__file__).resolve().parents[1] / "aptmoe" / "profiles" / "h200-1gpu.json").read_text())
    doc["adam"] = lease["adam"]
    doc["host_memory"]["copies_beside_adam"] = lease["host_memory"]["copies_beside_adam"]
    profile.write_text(json.dumps(doc))
    with_lease = _repredicted("validation-h200-v11-fresh", tmp_path / "lease", monkeypatch,
                              ["--calibration", str(profile), *V11_1GPU], only="M4x8-G0.35-native-1gpu")
    native = [r for r in with_lease["runs"] if r["pipeline"] != "GPipe"]
    assert len(native) == 3 and all(-0.09 < r["error"] < -0.05 for r in native), native


V12_1GPU = ["--gpus", "1", "--steps", "3,S=6", "--repeats", "3", "--models", "S:8:8:8,M:4:4:8", "--gini", "0.55,0.35,0.45",
            "--links", "native,8", "--held-back-every", "1", "--no-plot", "-q"]


def test_three_fresh_one_gpu_cells_with_the_cpu_jobs_waits(tmp_path, monkeypatch) -> None:
    """Session 32 (docs/validation-h200-v12-fresh): S8x8 at G 0.55 native (four runs a
    schedule) and G 0.35 capped, planned with h200-1gpu before it had `cpu_job`, and M4x8 at
    G 0.45 capped, planned and measured after; all held back, predicted with h200-1gpu as
    shipped: 2.8%, the worst 31.9% (S native GPipe); the ranking right in 2 of 3 (S native:
    Mobius measured 5% ahead of GPipeOffload and 12% ahead of APTMoE, predicted APTMoE and
    Mobius tied ahead). S's issue-bound GPipe is predicted slow in both S cells; the M cell
    is within 3.2%. Since session 33 set each action's own host work apart from its layers'
    (S8's one stage of eight layers no longer pays the loss twice): 3.6%, the worst 24.4%; S's
    GPipe +24.4% native, +2.8% capped; the M cell within 2.6%. With session 37's h200-1gpu
    (the own-calls factors, the dispatch of 18 eager probe runs): 2.6%, the worst 14.3% (S
    native Mobius); S's GPipe +7.3% native, -11.1% capped; the M cell within 2.8%. With session
    38's h200-1gpu (the CPU worker's gaps between Adam chunks): 2.9%, the worst 14.4%; the M cell
    within 2.6%."""
    report = _repredicted("validation-h200-v12-fresh", tmp_path, monkeypatch, ["--calibration", "h200-1gpu", *V12_1GPU])
    _held_back(report, (0.029, 0.145), runs=12, configs=3, ranking_right=2, ranking_strict=2,
               worst_run="S8x8-G0.55-native-1gpu Mobius")
    runs = {(r["cell"], r["pipeline"]): r["error"] for r in report["runs"]}
    assert 0.05 < runs[("S8x8-G0.55-native-1gpu", "GPipe")] < 0.09, runs
    assert -0.13 < runs[("S8x8-G0.35-cap8-1gpu", "GPipe")] < -0.09, runs
    m = [abs(e) for (c, _), e in runs.items() if c.startswith("M4")]
    assert len(m) == 4 and max(m) <= 0.028, m


V13_1GPU = ["--gpus", "1", "--steps", "3,S=6", "--repeats", "3", "--models", "S:8:8:8,M:4:4:8", "--gini", "0.45,0.3,0.6",
            "--links", "native,8", "--held-back-every", "1", "--no-plot", "-q"]


def test_three_fresh_one_gpu_cells_after_the_actions_own_host_work_was_set_apart(tmp_path, monkeypatch) -> None:
    """Session 33 (docs/validation-h200-v13-fresh): S8x8 at G 0.45 and 0.3 and M4x8 at G 0.6,
    native, and S8x8 at G 0.6 capped, one GPU, three runs a schedule, on three leases, held
    back, predicted with h200-1gpu as shipped: 8.7%, the worst 61.9% (S8 GPipe, 0.199 s a step
    against 0.323 predicted: that lease's probe issued its calls in 0.5-0.8x the profile's
    time); the ranking right in 2 of 4 (both native S cells: Mobius measured 11-16% ahead of
    APTMoE, predicted tied). The M cell within 6.7%. With the dispatch of before (its actions'
    own work spread over the probe's layers) every offloading schedule's time over GPipe's, in
    the three S cells, is further from the runs'. With APTMoE's policy answers charged to the
    issuing thread (session 35, `policy_host`) the S G0.45 cell is ranked right by the 3% rule
    too, by a hair: Mobius predicted 0.2% ahead of APTMoE (0.479 and 0.481 s), 16% in the runs.
    3 of 4. With h200-1gpu's CPU Adam the median of all nine one-GPU calibrations (session 35):
    9.2%, the M cell within 5.2%, predicted fast now. With session 37's h200-1gpu (the
    own-calls factors, the dispatch of 18 eager probe runs): 5.7%, the worst 42.9% (S G0.45
    Mobius; its GPipe +40.0%), 3 of 4 ranked right (2 strictly), the M cell within 6.3%; eight
    of the nine ratios to GPipe closer to the runs' than with the dispatch of before, the ninth
    (S G0.3's Mobius, 1.48x in the runs) now predicted 1.63x. With session 38's h200-1gpu (the
    CPU worker's gaps between Adam chunks): 4.7%, the worst 43.6%, the M cell within 4.0%. With
    session 39's (the GPU's work between a layer's blocks): 4.5%, the worst 42.6%, all 4 ranked
    right, strictly."""
    shipped = _repredicted("validation-h200-v13-fresh", tmp_path / "shipped", monkeypatch,
                           ["--calibration", "h200-1gpu", *V13_1GPU])
    _held_back(shipped, (0.048, 0.437), runs=16, configs=4, ranking_right=4, ranking_strict=4,
               worst_run="S8x8-G0.45-native-1gpu Mobius")
    m = [abs(r["error"]) for r in shipped["runs"] if r["model"] == "M"]
    assert len(m) == 4 and max(m) <= 0.068, m
    doc = json.loads((Path(__file__).resolve().parents[1] / "aptmoe" / "profiles" / "h200-1gpu.json").read_text())
    doc["dispatch"].pop("action")
    doc["dispatch"]["between"] = {"fwd": 0.0006985997500000025, "bwd": 0.0018087088749999848}
    (tmp_path / "before.json").write_text(json.dumps(doc))
    before = _repredicted("validation-h200-v13-fresh", tmp_path / "before", monkeypatch,
                          ["--calibration", str(tmp_path / "before.json"), *V13_1GPU])

    def ratios(report: dict) -> dict:
        """Each S run's measured and predicted step over its cell's GPipe's."""
        by = {(r["cell"], r["pipeline"]): r for r in report["runs"] if r["model"] == "S"}
        gpipe = {cell: r for (cell, p), r in by.items() if p == "GPipe"}
        return {(cell, p): (r["measured_s"] / gpipe[cell]["measured_s"], r["predicted_s"] / gpipe[cell]["predicted_s"])
                for (cell, p), r in by.items() if p != "GPipe"}

    now, then = ratios(shipped), ratios(before)
    assert len(now) == 9
    further = [k for k in now if abs(now[k][1] - now[k][0]) >= abs(then[k][1] - then[k][0])]
    assert further == [("S8x8-G0.3-native-1gpu", "Mobius")], (now, then)


V14 = ["--gpus", "2", "--steps", "6", "--repeats", "3", "--models", "S:8:8:8", "--gini", "0.45", "--links", "native",
       "--held-back-every", "1", "--no-plot", "-q"]
V11_AGAIN = ["--gpus", "2", "--steps", "3", "--repeats", "3", "--models", "M:6:6:8", "--gini", "0.45", "--links",
             "native", "--held-back-every", "1", "--no-plot", "-q"]
V14_1GPU = ["--gpus", "1", "--steps", "3", "--repeats", "3", "--models", "L:2:2:8", "--gini", "0.55", "--links", "8",
            "--held-back-every", "1", "--no-plot", "-q"]


def test_a_fresh_s_cell_on_two_gpus_whose_runs_interleave(tmp_path, monkeypatch) -> None:
    """Session 34 (docs/validation-h200-2gpu-v14-fresh): S8x8 at G 0.45, native, two GPUs, three
    runs a schedule, held back, predicted with h200-2gpu after its actions' own host work was
    set apart (the cell ran before; nothing was fitted to it): 17.1%, the worst 22.2% (APTMoE),
    every schedule predicted fast. GPipe's three runs took 0.145, 0.191 and 0.213 s a step, and
    it is predicted at 0.154; Mobius's and APTMoE's runs interleave, so the ranking is right
    where the runs order the schedules, and wrong by the 3% tie rule. With APTMoE's policy
    answers charged to the issuing thread (session 35, `policy_host`): the worst 21.5%, and the
    ranking right by the 3% rule too. Since session 37 reads the issuing thread's condition as
    each block's call starts (h200-2gpu's copy-and-Adam factor no longer goes to calls beside
    Adam alone): 18.2%, the worst 23.9%; APTMoE predicted 0.3% ahead of Mobius, 8.7% behind it
    in the runs: wrong by the 3% rule again, right where the runs order them. Since session
    42's loss and embedding on the GPU: 18.2%, the worst 23.7%; APTMoE predicted 0.1% behind
    Mobius (0.04% ahead before): a tie either way, which the 3% rule now counts right."""
    report = _repredicted("validation-h200-2gpu-v14-fresh", tmp_path, monkeypatch, ["--calibration", "h200-2gpu", *V14])
    _held_back(report, (0.183, 0.24), runs=4, configs=1, ranking_right=1, ranking_apart=1, configs_repeated=1,
               worst_run="S8x8-G0.45-native-2gpu APTMoE")
    assert all(r["error"] < -0.04 for r in report["runs"])
    gpipe = next(r for r in report["runs"] if r["pipeline"] == "GPipe")
    assert gpipe["run_spread"] > 0.35
    assert "ranking right where runs apart" in (tmp_path / "validation-h200-2gpu-v14-fresh" / "matrix.md").read_text()


def test_a_config_measured_on_two_leases_orders_aptmoe_and_mobius_both_ways(tmp_path, monkeypatch) -> None:
    """Session 34 (docs/validation-h200-2gpu-v11-again): v11-fresh's M6x8 G 0.45 native cell on
    another lease, planned with h200-2gpu's own CPU curves: 2.8%, the worst 8.7% (GPipeOffload,
    whose runs took 0.699-0.873 s). APTMoE measured 4.8% behind Mobius here and 1.2% ahead on
    v11-fresh's lease; predicted 0.9% ahead. Their runs interleave on both leases. Since
    session 37 reads the issuing thread's condition as each block's call starts: the worst 8.9%."""
    again = _repredicted("validation-h200-2gpu-v11-again", tmp_path / "again", monkeypatch,
                         ["--calibration", "h200-2gpu", *V11_AGAIN])
    _held_back(again, (0.029, 0.09), runs=4, configs=1, ranking_right=0, ranking_apart=1,
               worst_run="M6x8-G0.45-native-2gpu GPipeOffload")
    first = _repredicted("validation-h200-2gpu-v11-fresh", tmp_path / "first", monkeypatch,
                         ["--calibration", "h200-2gpu", "--cell-profiles", *V11], only="M6x8-G0.45-native-2gpu")
    for report, aptmoe_ahead in ((first, True), (again, False)):
        m = {r["pipeline"]: r["measured_s"] for r in report["runs"]}
        assert (m["APTMoE"] < m["Mobius"]) == aptmoe_ahead
        assert report["configs"][0]["ranking_apart"] is True


def test_a_fresh_l_cell_on_one_gpu_capped(tmp_path, monkeypatch) -> None:
    """Session 34 (docs/validation-h200-v14-fresh): L2x8 at G 0.55, 8 GB/s, one GPU, three runs a
    schedule (each within 1.2% of the others), held back, planned and predicted with h200-1gpu
    as shipped: 0.4%, the worst 1.8% (APTMoE, predicted slow), the ranking right strictly.
    This lease's own dispatch probe moves no prediction by 0.1%: the cell's calls are not bound
    by their issue. With h200-1gpu's CPU Adam the median of all nine one-GPU calibrations
    (session 35): 0.5%, the worst 0.6% (Mobius); with session 38's gaps between Adam chunks
    0.53% and 0.57%; with session 39's GPU work between a layer's blocks 0.48% and 0.66%
    (APTMoE); with session 42's loss and embedding on the GPU 0.55% and 0.77%."""
    report = _repredicted("validation-h200-v14-fresh", tmp_path, monkeypatch, ["--calibration", "h200-1gpu", *V14_1GPU])
    _held_back(report, (0.006, 0.008), runs=4, configs=1, ranking_right=1, ranking_strict=1, ranking_apart=1,
               worst_run="L2x8-G0.55-cap8-1gpu APTMoE")


def test_the_summary_shows_the_runs_apart_ranking_only_where_configs_ran_again() -> None:
    once = {"runs": 4, "median_abs_error": 0.01, "worst_abs_error": 0.02, "worst_run": "c GPipe",
            "signed_median_error": 0.0, "configs": 1, "ranking_right": 1, "ranking_strict": 1,
            "configs_repeated": 0, "ranking_apart": 0}
    assert "where runs apart" not in summary_table({"all": once})
    again = summary_table({"all": {**once, "configs_repeated": 1, "ranking_apart": 1}})
    assert "ranking right where runs apart" in again and "1/1" in again.splitlines()[-1]


V4GPU = ["--gpus", "4", "--steps", "3", "--repeats", "1", "--models", "S:8:8:8,M:8:8:8,L:4:4:8", "--gini", "0.45,0.3",
         "--links", "native,8", "--held-back-every", "1", "--no-plot", "-q"]


def test_the_first_four_gpu_cells_as_measured(tmp_path, monkeypatch) -> None:
    """Session 28 (docs/validation-h200-4gpu): the first 4-GPU cells, S8, M8 and L4 with 8
    experts at G 0.45 (native, capped) and M8 at G 0.3 (native), one run a schedule, each
    planned and predicted with the lease's calibration (h200-4gpu): 7.2%, the worst 39.3% (S8
    native Mobius), ranking right in 6 of 7. S is predicted 7-39% too fast (its issuing
    threads ran 1.47x slower than the one-GPU dispatch probe); M and L come to 4.3%. Since
    session 31's compounding of an Adam chunk's slowdowns (sim/host_memory.py): 5.2%, the worst 37.0%.
    Since session 37 reads the issuing thread's condition as each block's call starts: the worst 37.6%."""
    report = _repredicted("validation-h200-4gpu", tmp_path, monkeypatch,
                          ["--calibration", "h200-4gpu", "--cell-profiles", *V4GPU])
    _held_back(report, (0.053, 0.377), runs=28, configs=7, ranking_right=6, worst_run="S8x8-G0.45-native-4gpu Mobius")
    errors = {r["cell"][0]: [] for r in report["runs"]}
    for r in report["runs"]:
        errors[r["cell"][0]].append(r["error"])
    assert all(-0.40 < e < -0.07 for e in errors["S"])
    assert statistics.median(abs(e) for e in errors["M"] + errors["L"]) <= 0.044
    for cell in (DOCS / "validation-h200-4gpu" / "cells").iterdir():
        doc = json.loads(read_text(stored_file(cell / "profile.json")))
        assert doc["name"] == "h200-4gpu" and doc["hardware"]["gpu_count"] == 4, cell


ADAM_LEASES = ["aptmoe/profiles/h200-2gpu.json", "docs/measured/h200x2-session17/calibrations/pool.json",
               "docs/measured/h200x2-session21/dispatch.json", "docs/measured/session23/dispatch.json"]


def test_the_five_leases_adam_is_right_per_update_and_makes_steps_faster_than_they_ran(tmp_path, monkeypatch,
                                                                                          capsys) -> None:
    """Session 27 (docs/measured/session27): CPU Adam and host memory on five leases, pooled and
    put into h200-2gpu. On v8-fresh (M6x8 G 0.4, 8 runs) its update actions lose the shipped
    profile's +13% bias, and the steps are predicted faster than they ran: the shipped Adam
    covers for a compute phase the model has too short. Since session 31's compounding of an
    Adam chunk's slowdowns (sim/host_memory.py) the pooled profile gives 3.5% (every step 3.3%
    fast at the median), where it gave more than 4%; since h200-2gpu's host memory figures were
    pooled over eleven calibrations, 3.3% against the shipped profile's 2.7%; since session 34's
    dispatch with each action's own host work apart, every step 2.9% fast at the median; since
    session 42's loss and embedding on the GPU, 3.4% against the shipped profile's 3.2%."""
    from aptmoe.calibration import merge, pool

    root = DOCS.parent
    s27 = DOCS / "measured" / "session27"
    assert pool.main([*(str(s27 / f"am-{i}.json") for i in (1, 2, 3)), "--name", "h200-2gpu",
                      "--out", str(tmp_path / "s27.json")]) == 0
    leases = []
    for i, f in enumerate([*(str(root / f) for f in ADAM_LEASES), str(tmp_path / "s27.json")]):
        leases.append(str(tmp_path / f"lease{i}.json"))
        assert merge.main([str(root / "aptmoe/profiles/h200-2gpu.json"), "--take", f"adam={f}", "--take",
                           f"host_memory={f}", "--name", "h200-2gpu", "--out", leases[-1]]) == 0
    assert pool.main([*leases, "--name", "h200-2gpu", "--out", str(tmp_path / "five.json")]) == 0
    capsys.readouterr()
    five = json.loads((tmp_path / "five.json").read_text())
    assert five["adam"]["cpu_s_per_param"]["14"] == pytest.approx(0.2385e-9)     # the shipped: 0.306e-9
    assert five["host_memory"]["cpu_alone_GBps"]["14"] == pytest.approx(86.64)  # the shipped: 86.64 (62.22
    # until session 31 pooled its host memory figures, which put 83.39 here)
    flags = ["--gpus", "2", "--steps", "3", "--models", "M:6:6:8", "--gini", "0.4", "--links", "native,8",
             "--held-back-every", "1", "--no-plot", "-q"]
    shipped = _repredicted("validation-h200-2gpu-v8-fresh", tmp_path / "shipped", monkeypatch,
                           ["--calibration", "h200-2gpu", *flags])
    pooled = _repredicted("validation-h200-2gpu-v8-fresh", tmp_path / "pooled", monkeypatch,
                          ["--calibration", str(tmp_path / "five.json"), *flags])

    def update(report):             # each offloading run's median update action error
        return [r["err/update"] for r in report["runs"] if r["pipeline"] != "GPipe"]

    assert min(update(shipped)) > 0.05 and statistics.median(update(shipped)) > 0.15
    assert statistics.median(abs(u) for u in update(pooled)) < 0.03
    for part in (shipped, pooled):
        assert part["summary"]["held-back"]["runs"] == 8
    assert shipped["summary"]["held-back"]["median_abs_error"] < 0.033 < pooled["summary"]["held-back"][
        "median_abs_error"]
    assert pooled["summary"]["held-back"]["signed_median_error"] < -0.025


def _repredicted(folder: str, tmp_path: Path, monkeypatch, flags: list[str], only: str | None = None,
                 cell_profile=None) -> dict:
    """The stored matrix `folder` (its cell `only`, else all) predicted again into `tmp_path`
    (skipped where the tree lacks it). `cell_profile(stored profile document)`: the profile
    document each cell gets instead of its own (for --cell-profiles)."""
    stored, out = DOCS / folder, tmp_path / folder
    if not stored.is_dir():
        pytest.skip(f"the stored H200 matrix {folder} is not in this tree")
    for cell in sorted((stored / "cells").iterdir()):
        if only is not None and cell.name != only:
            continue
        shutil.copytree(cell / "real", out / "cells" / cell.name / "real")
        for name in ("cell.json", "profile.json"):          # the profile as stored: profile.json.xz
            kept = stored_file(cell / name) or cell / name
            if name == "profile.json" and cell_profile is not None:
                doc = cell_profile(json.loads(read_text(kept)))
                (out / "cells" / cell.name / name).write_text(json.dumps(doc))
            else:
                shutil.copy(kept, out / "cells" / cell.name / kept.name)
    _forbid_executor(monkeypatch)
    assert sim_main(["matrix", "--out", str(out), *flags, "--repredict"]) == 0
    return json.loads((out / "matrix.json").read_text())


def _stored_results(folder: str, cells: str = "*") -> list[tuple[Path, dict]]:
    """Each stored run's results.json (kept as results.json.xz) in the cells `cells` of the
    stored matrix `folder`, read; that there are some is asserted, so a check over them is not
    passed by finding none."""
    found = [(p, read_json(p)) for p in sorted((DOCS / folder / "cells").glob(f"{cells}/real/results.json*"))]
    assert found, f"no stored results.json in {folder}/cells/{cells}/real"
    return found


def _held_back(report: dict, bounds: tuple[float, float], **expected) -> None:
    """A repredicted set's held-back summary: each `expected` field (runs, configs, ranking_right,
    ranking_strict, worst_run) as given, and its median and worst |error| within `bounds`."""
    held = report["summary"]["held-back"]
    assert {k: held[k] for k in expected} == expected, held
    _within(report, {"held-back": bounds})


def _within(report: dict, bounds: dict) -> None:
    for part, (median, worst) in bounds.items():
        s = report["summary"][part]
        assert s["median_abs_error"] <= median and s["worst_abs_error"] <= worst, (part, s)


def test_block_staircase_script_finds_the_tiles_the_blocks_were_timed_in(tmp_path, capsys) -> None:
    """scripts/block-staircase on blocks whose times follow an L curve measured at powers of two
    (the profiles before session 10), rounded up to 64-token tiles: the line misses them,
    tiles of 64 fit them exactly."""
    import importlib.machinery
    import importlib.util

    from aptmoe.profile import interp_monotone, load_profile

    path = Path(__file__).resolve().parents[1] / "scripts" / "block-staircase"
    loader = importlib.machinery.SourceFileLoader("block_staircase", str(path))
    spec = importlib.util.spec_from_loader("block_staircase", loader)
    script = importlib.util.module_from_spec(spec)
    loader.exec_module(script)
    doc = json.loads((Path(__file__).resolve().parents[1] / "aptmoe" / "profiles" / "h200-1gpu.json").read_text())
    for c in doc["gpu"]:                    # the powers of two alone, a line between them
        if c["kind"] == "e":
            keep = [i for i, t in enumerate(c["tokens"]) if t & (t - 1) == 0]
            c["tokens"], c["seconds"], c["step_to"] = [c["tokens"][i] for i in keep], [c["seconds"][i] for i in keep], None
    powers = tmp_path / "powers.json"
    powers.write_text(json.dumps(doc))
    curve = next(c for c in load_profile(powers).gpu
                 if c.kind == "e" and c.d == 4096 and c.direction == "fwd" and c.dtype == "fp32")
    events = []
    for i, t in enumerate(range(100, 500, 7)):
        dur = interp_monotone(curve.tokens, curve.seconds, -(-t // 64) * 64)
        events.append({"name": f"0F0@0:e{i % 8}", "cat": "forward", "ph": "X", "pid": 0, "tid": 0, "ts": i * 1e4,
                       "dur": dur * 1e6, "args": {"experts": [i % 8], "tokens": t}})
    real = tmp_path / "cells" / "L2x4-G0.3-native-1gpu" / "real"
    real.mkdir(parents=True)
    (real / "trace-GPipe.json").write_text(json.dumps({"traceEvents": events}))
    assert script.main([str(tmp_path), "--quanta", "64,128", "--profile", str(powers)]) == 0
    # size, direction, curve, blocks, median error, median |error|
    rows = {" ".join(w[:-3]): (int(w[-3]), float(w[-1].rstrip("%")))
            for w in (line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("L "))}
    assert set(rows) == {"L fwd line", "L fwd tiles of 64", "L fwd tiles of 128"}
    assert rows["L fwd tiles of 64"] == (58, pytest.approx(0.0, abs=0.05))
    assert rows["L fwd line"][1] > 3 and rows["L fwd tiles of 128"][1] > 3
    assert script.main([str(tmp_path / "none")]) == 2


V15_1GPU = ["--gpus", "1", "--steps", "3,S=6", "--repeats", "3", "--models", "S:8:8:8,M:4:4:8", "--gini", "0.5,0.4",
            "--links", "native", "--held-back-every", "1", "--no-plot", "-q"]


def test_two_fresh_one_gpu_cells_after_the_policy_stopped_waking_the_copy_engine(tmp_path, monkeypatch) -> None:
    """Session 35 (docs/validation-h200-v15-fresh): S8x8 at G 0.5 and M4x8 at G 0.4, native, one
    GPU, three runs a schedule, run by the executor whose APTMoE policy wakes its copy engine
    only for a copy (c585eb8), held back, predicted with h200-1gpu as shipped, its policy's
    answers charged to the issuing thread (`policy_host`, timed on the lease before the cells):
    5.9%, the worst 31.3% (S8 GPipe: the lease's host ran its reference loop at 0.64x the
    profile's). The ranking right in both cells; without `policy_host` the S cell's APTMoE is
    predicted 0.3% ahead of Mobius, which ran 20% ahead of it at the medians. With session 37's
    h200-1gpu (the own-calls factors, the dispatch of 18 eager probe runs): 3.6%, the worst
    19.3% (S Mobius; S GPipe +13.4%), the M cell within 6.9% (APTMoE, predicted fast). With
    session 38's h200-1gpu (the CPU worker's gaps between Adam chunks): 3.0%, the worst 20.1%,
    the M cell within 4.6%."""
    report = _repredicted("validation-h200-v15-fresh", tmp_path, monkeypatch, ["--calibration", "h200-1gpu", *V15_1GPU])
    _held_back(report, (0.031, 0.202), runs=8, configs=2, ranking_right=2, ranking_apart=2, configs_repeated=2,
               worst_run="S8x8-G0.5-native-1gpu Mobius")
    m = [abs(r["error"]) for r in report["runs"] if r["model"] == "M"]
    assert len(m) == 4 and max(m) <= 0.07, m
    s = {r["pipeline"]: r for r in report["runs"] if r["model"] == "S"}
    assert s["Mobius"]["predicted_s"] < s["APTMoE"]["predicted_s"] and s["Mobius"]["measured_s"] < s["APTMoE"]["measured_s"]


V16_1GPU = ["--gpus", "1", "--steps", "6", "--repeats", "3", "--models", "S:8:8:8", "--gini", "0.4", "--links", "native",
            "--held-back-every", "1", "--no-plot", "-q"]


def test_a_fresh_s_cell_whose_lease_probe_ran_faster_than_its_runs(tmp_path, monkeypatch) -> None:
    """Session 35 (docs/validation-h200-v16-fresh): S8x8 at G 0.4, native, one GPU, three runs a
    schedule, the executor of c585eb8, held back, predicted with h200-1gpu as shipped: 5.4%,
    the worst 10.1% (GPipe); APTMoE predicted 0.5% ahead of Mobius, which ran 3.6% ahead at the
    medians, so wrong by the 3% rule and right where the runs (which interleave) order them.
    The lease's own probe, at its own level, predicts every schedule 25-33% fast (19-26% with
    session 37's own-calls factors in the profile it goes onto). With
    h200-1gpu's CPU Adam the median of all nine one-GPU calibrations (session 35): 6.0%, the
    worst 10.1%. With session 37's h200-1gpu (the own-calls factors, the dispatch of 18 eager
    probe runs): 7.3%, the worst 9.1% (APTMoE), every schedule 5-9% fast; the ranking right
    by the 3% rule too (APTMoE predicted 1.1% behind Mobius). With session 39's GPU work
    between a layer's blocks: 7.4%, the worst 9.7% (APTMoE), wrong by the 3% rule again; with
    session 42's loss and embedding on the GPU: 7.4%, the worst 9.71%."""
    report = _repredicted("validation-h200-v16-fresh", tmp_path / "shipped", monkeypatch,
                          ["--calibration", "h200-1gpu", *V16_1GPU])
    _held_back(report, (0.075, 0.098), runs=4, configs=1, ranking_right=0, ranking_apart=1, configs_repeated=1,
               worst_run="S8x8-G0.4-native-1gpu APTMoE")
    probes = sorted((DOCS / "measured" / "session35" / "probe-call3").iterdir())
    assert len(probes) == 4
    own = _at_lease_level("validation-h200-v16-fresh", probes, tmp_path, monkeypatch, V16_1GPU)
    assert all(-0.27 < r["error"] < -0.18 for r in own["runs"]), [r["error"] for r in own["runs"]]


def _own_level(base: Path, probes: list[Path], out: Path) -> Path:
    """`base` with its dispatch replaced by the probe runs' own, at their level
    (`dispatch_shape --own-level`), written to `out`."""
    from aptmoe.calibration import dispatch_shape

    assert dispatch_shape.main([str(base), *map(str, probes), "--own-level", "--out", str(out)]) == 0
    return out


def _at_lease_level(folder: str, probes: list[Path], tmp_path: Path, monkeypatch, flags: list[str]) -> dict:
    """The set repredicted with h200-1gpu's dispatch replaced by its lease's own probe runs at
    their own level."""
    lease = _own_level(DOCS.parent / "aptmoe" / "profiles" / "h200-1gpu.json", probes, tmp_path / "lease.json")
    return _repredicted(folder, tmp_path / "lease", monkeypatch, ["--calibration", str(lease), *flags])


V17_1GPU = ["--gpus", "1", "--steps", "3,S=6", "--repeats", "3", "--models", "S:8:8:8,M:4:4:8", "--gini", "0.35,0.55",
            "--links", "native", "--held-back-every", "1", "--no-plot", "-q"]


def test_two_fresh_one_gpu_cells_whose_offloading_schedules_the_model_puts_too_near_gpipe(tmp_path, monkeypatch) -> None:
    """Session 36 (docs/validation-h200-v17-fresh): S8x8 at G 0.35 and M4x8 at G 0.55, native,
    one GPU, three runs a schedule, the executor of 8ee2727, held back, predicted with h200-1gpu
    as shipped: 5.6%, the worst 10.4% (S8 GPipe, predicted slow); the ranking right in both cells.
    Against GPipe in the same cell, which the lease's host speed moves alike, S8's offloading
    schedules ran 1.71-1.74x its step and are predicted at 1.46-1.50x: `h200-1gpu` charges the
    issuing thread nothing for its calls beside Adam and copies (no adam_factor), which the
    one-GPU runs' own calls took 1.5x and 3.8x (docs/measured/session36). M's are within 3.4%.
    With session 37's h200-1gpu (those factors from a one-GPU lease's own-calls probe, read as
    each block's call starts, and the dispatch of 18 eager probe runs): 6.7%, the worst 9.8% (S
    GPipeOffload), every run predicted fast; S's offloading schedules over GPipe 2-6% short.
    With session 39's GPU work between a layer's blocks: 5.6%, the worst 9.9% (S Mobius)."""
    report = _repredicted("validation-h200-v17-fresh", tmp_path, monkeypatch, ["--calibration", "h200-1gpu", *V17_1GPU])
    _held_back(report, (0.068, 0.100), runs=8, configs=2, ranking_right=2, ranking_apart=2, configs_repeated=2,
               worst_run="S8x8-G0.35-native-1gpu Mobius")
    assert all(r["error"] < 0 for r in report["runs"])
    over = {(r["model"], r["pipeline"]): r["error"] for r in report["over_gpipe"]}
    assert len(over) == 6
    assert all(-0.06 < e < -0.02 for (m, _), e in over.items() if m == "S"), over
    assert all(abs(e) < 0.035 for (m, _), e in over.items() if m == "M"), over


V18_1GPU = ["--gpus", "1", "--steps", "6", "--repeats", "3", "--models", "S:8:8:8", "--gini", "0.6", "--links", "native",
            "--held-back-every", "1", "--no-plot", "-q"]


def test_a_fresh_s_cell_whose_lease_ran_its_eager_probe_faster_than_its_runs(tmp_path, monkeypatch) -> None:
    """Session 36 (docs/validation-h200-v18-fresh): S8x8 at G 0.6, native, one GPU, three runs a
    schedule, held back, predicted with h200-1gpu as shipped: 12.4%, the worst 16.6% (APTMoE);
    GPipe within 3.6% and the offloading schedules 12-17% fast, their steps over GPipe's 8-14%
    short. APTMoE, predicted 2.7% ahead of GPipeOffload, ran 3.1% behind it at the medians:
    wrong by the 3% rule, right where the runs (which interleave) order them. The lease's own
    dispatch probe, run after the cell with the matrix's eager kernel loading (calibration/
    dispatch.py's PROBE_KERNEL_LOADING), at its own level, predicts every schedule 11-22% fast:
    the cell's calls ran slower than the probe's on its own lease. With session 37's h200-1gpu
    (the own-calls factors, the dispatch of 18 eager probe runs, three of them this lease's):
    16.4%, the worst 20.0%: every schedule 16-20% fast, GPipe too (-16.9%), and their steps over
    GPipe's within 3.6%: what is left is the level of this lease's host, not the schedules'.
    With session 39's GPU work between a layer's blocks: 16.8%, the worst 19.8%."""
    report = _repredicted("validation-h200-v18-fresh", tmp_path / "shipped", monkeypatch,
                          ["--calibration", "h200-1gpu", *V18_1GPU])
    _held_back(report, (0.168, 0.201), runs=4, configs=1, ranking_right=0, ranking_apart=1, configs_repeated=1,
               worst_run="S8x8-G0.6-native-1gpu APTMoE")
    assert all(-0.21 < r["error"] < -0.15 for r in report["runs"]), report["runs"]
    assert all(abs(r["error"]) < 0.04 for r in report["over_gpipe"]), report["over_gpipe"]
    probes = sorted((DOCS / "measured" / "session36" / "probe-call4").iterdir())
    assert len(probes) == 3
    assert all(read_json(p / "results.json")["schedules"]["GPipe"]["kernel_loading"] == "eager"
               for p in probes)
    own = _at_lease_level("validation-h200-v18-fresh", probes, tmp_path, monkeypatch, V18_1GPU)
    assert all(-0.23 < r["error"] < -0.10 for r in own["runs"]), [r["error"] for r in own["runs"]]


V19_1GPU = ["--gpus", "1", "--steps", "6", "--repeats", "3", "--models", "S:8:8:8", "--gini", "0.5", "--links", "8",
            "--held-back-every", "1", "--no-plot", "-q"]
V20_1GPU = ["--gpus", "1", "--steps", "3,S=6", "--repeats", "3", "--models", "S:8:8:8,M:4:4:8", "--gini", "0.65,0.5",
            "--links", "native,8", "--held-back-every", "1", "--no-plot", "-q"]
V21_1GPU = ["--gpus", "1", "--steps", "3,S=6", "--repeats", "3", "--models", "S:8:8:8,M:4:4:8", "--gini", "0.4,0.35",
            "--links", "8,native", "--held-back-every", "1", "--no-plot", "-q"]
SESSION37 = DOCS / "measured" / "session37"
EAGER_PROBES = {
    "session36": [*sorted((DOCS / "measured" / "session36" / "kernel-loading" / "call1").glob("probe-*-eager")),
                  *sorted((DOCS / "measured" / "session36" / "kernel-loading" / "call2-probe").glob("B*"))],
    "v18's lease": sorted((DOCS / "measured" / "session36" / "probe-call4").iterdir()),
    "v19's lease": sorted((SESSION37 / "probe-call1").iterdir()),
}


def test_h200_1gpu_s_dispatch_is_the_median_of_every_eager_probe_run_kept(tmp_path) -> None:
    """Session 37: h200-1gpu's dispatch is what `dispatch_shape --own-level` makes of the 18 eager
    probe runs of four leases, onto call 1's profile (the one-GPU lease's own-calls factors)."""
    runs = [p for group in EAGER_PROBES.values() for p in group]
    assert len(runs) == 18
    assert all(read_json(p / "results.json")["schedules"]["GPipe"]["kernel_loading"] == "eager"
               for p in runs)
    made = json.loads(_own_level(SESSION37 / "call1" / "h200-1gpu.json", runs, tmp_path / "h200-1gpu.json").read_text())
    shipped = json.loads((DOCS.parent / "aptmoe" / "profiles" / "h200-1gpu.json").read_text())
    assert made["dispatch"] == shipped["dispatch"]
    assert made["issue_tolls"] == shipped["issue_tolls"]
    assert round(shipped["issue_tolls"]["adam_factor"], 2) == 1.59
    assert round(shipped["issue_tolls"]["copy_adam_factor"], 2) == 3.64


def test_a_fresh_s_cell_predicted_without_its_lease_s_probe_runs(tmp_path, monkeypatch) -> None:
    """Session 37 (docs/validation-h200-v19-fresh, predicted as shipped in the test below): five
    of the 18 probe runs h200-1gpu's dispatch is pooled from are this cell's lease's. With
    session 36's first ten alone (neither this lease nor v18-fresh's) the cell is within 4.3%,
    the worst 7.6%, ranked right."""
    other = _own_level(SESSION37 / "call1" / "h200-1gpu.json", EAGER_PROBES["session36"], tmp_path / "session36.json")
    apart = _repredicted("validation-h200-v19-fresh", tmp_path, monkeypatch, ["--calibration", str(other), *V19_1GPU])
    _held_back(apart, (0.044, 0.077), runs=4, configs=1, ranking_right=1)


def test_five_fresh_one_gpu_cells_after_the_fix_meet_the_targets(tmp_path, monkeypatch) -> None:
    """Session 37, held back, predicted with h200-1gpu as shipped (the own-calls factors and the
    dispatch pooled over 18 eager probe runs). docs/validation-h200-v19-fresh: S8x8 at G 0.5,
    capped, planned with h200-1gpu of before: 4.1%, the worst 5.6% (Mobius), the ranking right
    by both rules. docs/validation-h200-v20-fresh and -v21-fresh: S8x8 at G 0.65 native and 0.4
    capped, M4x8 at G 0.5 capped and 0.35 native, one lease, planned with the shipped profile:
    2.1% (the worst 8.3%, M capped APTMoE) and 2.5% (9.4%, S capped GPipe), every ranking
    right. Three runs a schedule. The 20 runs together: 2.8%, the worst 9.4%, the issue's
    targets. With session 39's GPU work between a layer's blocks: v19 3.1% (the worst 5.5%), v20
    1.9% (6.1%, now S native GPipe), v21 1.5% (9.4%)."""
    v19 = _repredicted("validation-h200-v19-fresh", tmp_path, monkeypatch, ["--calibration", "h200-1gpu", *V19_1GPU])
    _held_back(v19, (0.042, 0.057), runs=4, configs=1, ranking_right=1, ranking_strict=1, ranking_apart=1,
               worst_run="S8x8-G0.5-cap8-1gpu Mobius")
    v20 = _repredicted("validation-h200-v20-fresh", tmp_path, monkeypatch, ["--calibration", "h200-1gpu", *V20_1GPU])
    _held_back(v20, (0.022, 0.084), runs=8, configs=2, ranking_right=2, ranking_apart=2,
               worst_run="S8x8-G0.65-native-1gpu GPipe")
    v21 = _repredicted("validation-h200-v21-fresh", tmp_path, monkeypatch, ["--calibration", "h200-1gpu", *V21_1GPU])
    _held_back(v21, (0.026, 0.095), runs=8, configs=2, ranking_right=2, ranking_apart=2,
               worst_run="S8x8-G0.4-cap8-1gpu GPipe")
    m = [abs(r["error"]) for r in v20["runs"] + v21["runs"] if r["model"] == "M"]
    assert len(m) == 8 and max(m) < 0.085, m
    after = [abs(r["error"]) for report in (v19, v20, v21) for r in report["runs"]]
    assert len(after) == 20 and statistics.median(after) <= 0.029 and max(after) <= 0.095, sorted(after)
    assert sum(report["summary"]["held-back"]["ranking_right"] for report in (v19, v20, v21)) == 5


V22_1GPU = ["--gpus", "1", "--steps", "3,S=6", "--repeats", "3", "--models", "S:8:8:8,M:4:4:8", "--gini", "0.55,0.45",
            "--links", "native", "--held-back-every", "1", "--no-plot", "-q"]


def test_two_fresh_one_gpu_cells_on_a_lease_slower_than_the_profile(tmp_path, monkeypatch) -> None:
    """Session 38, held back, predicted with h200-1gpu as shipped (with the CPU worker's gaps
    between Adam chunks from the same lease's CPU-job probe, decided on the older runs before
    these were read). docs/validation-h200-v22-fresh: M4x8 native at G 0.45 and S8x8 native at
    G 0.55 (v12-fresh's config), three runs a schedule: 8.2%, the worst 11.3% (S Mobius), every
    run predicted fast; the S config ran 15-29% slower than on v12-fresh's lease. The ranking is
    right in the S cell by the 3% rule and in both where the runs are apart; M's APTMoE (-10.9%)
    is predicted a hair ahead of Mobius, which ran 7% ahead. With session 39's GPU work between
    a layer's blocks: 8.2%, the worst 11.7% (S Mobius), both cells ranked right by the 3% rule."""
    v22 = _repredicted("validation-h200-v22-fresh", tmp_path, monkeypatch, ["--calibration", "h200-1gpu", *V22_1GPU])
    _held_back(v22, (0.083, 0.118), runs=8, configs=2, ranking_right=2, ranking_apart=2,
               worst_run="S8x8-G0.55-native-1gpu Mobius")
    assert all(r["error"] < 0 for r in v22["runs"]), [r["error"] for r in v22["runs"]]
    v12 = {r["pipeline"]: r for r in _repredicted("validation-h200-v12-fresh", tmp_path, monkeypatch,
                                                   ["--calibration", "h200-1gpu", *V12_1GPU],
                                                   only="S8x8-G0.55-native-1gpu")["runs"]}
    for r in v22["runs"]:
        if r["cell"] == "S8x8-G0.55-native-1gpu":
            # one config, one prediction (APTMoE's within 0.1%: its policy decides with the profile
            # each run was planned with, and those differ), two leases: 15-29% apart
            assert r["predicted_s"] == pytest.approx(v12[r["pipeline"]]["predicted_s"], rel=1e-3)
            assert 1.14 < r["measured_s"] / v12[r["pipeline"]]["measured_s"] < 1.30


V23_1GPU = ["--gpus", "1", "--steps", "3,S=6", "--repeats", "3", "--models", "M:4:4:8,S:8:8:8", "--gini",
            "0.3,0.25,0.6", "--links", "native,8", "--held-back-every", "1", "--no-plot", "-q"]


def test_three_fresh_one_gpu_cells_on_two_slow_leases(tmp_path, monkeypatch) -> None:
    """Session 39, held back, predicted with h200-1gpu as shipped (its GPU work between a
    layer's blocks decided on the older runs first). docs/validation-h200-v23-fresh: M4x8 native
    at G 0.3 and S8x8 native at G 0.25 (one lease), M4x8 capped at G 0.6 (another), three runs a
    schedule: 7.2%, the worst 17.9% (S GPipeOffload), every run predicted fast; even M's GPipe,
    a step of GPU work that ran within 1.4-5.7% of the profile of before's prediction in all ten
    older M cells, ran 6.7% and 10.9% over it, its three runs 10% and 22% apart. The ranking is
    right in two cells of three by the 3% rule and where the runs are apart (M native: APTMoE ran
    4% ahead of Mobius and is predicted behind it). With the profile of before: 7.8%, the worst
    18.2%, 1 of 3 by the 3% rule."""
    v23 = _repredicted("validation-h200-v23-fresh", tmp_path, monkeypatch, ["--calibration", "h200-1gpu", *V23_1GPU])
    _held_back(v23, (0.073, 0.179), runs=12, configs=3, ranking_right=2, ranking_apart=2,
               worst_run="S8x8-G0.25-native-1gpu GPipeOffload")
    assert all(r["error"] < 0 for r in v23["runs"]), [r["error"] for r in v23["runs"]]
    gpipe_m = [r for r in v23["runs"] if r["model"] == "M" and r["pipeline"] == "GPipe"]
    assert len(gpipe_m) == 2 and all(-0.115 < r["error"] < -0.06 for r in gpipe_m)


V24_1GPU = ["--gpus", "1", "--steps", "3", "--repeats", "3", "--models", "L:2:2:8", "--gini", "0.5", "--links", "native",
            "--held-back-every", "1", "--no-plot", "-q"]


def test_a_fresh_l_cell_measured_after_the_glue_curves(tmp_path, monkeypatch) -> None:
    """Session 39, held back, planned and predicted with h200-1gpu as shipped (its layer glue
    curves). docs/validation-h200-v24-fresh: L2x8 native at G 0.5, three runs a schedule: 1.6%,
    the worst 10.4% (APTMoE, every one of whose runs was slower than every GPipeOffload and
    Mobius run; its CPU Adam, which ends an L step, ran 12% slower a parameter than Mobius's).
    The ranking is wrong by both rules."""
    v24 = _repredicted("validation-h200-v24-fresh", tmp_path, monkeypatch, ["--calibration", "h200-1gpu", *V24_1GPU])
    _held_back(v24, (0.017, 0.105), runs=4, configs=1, ranking_right=0, ranking_apart=0,
               worst_run="L2x8-G0.5-native-1gpu APTMoE")
    others = [abs(r["error"]) for r in v24["runs"] if r["pipeline"] != "APTMoE"]
    assert len(others) == 3 and max(others) < 0.025, others


V25_1GPU = ["--gpus", "1", "--steps", "3", "--repeats", "3", "--models", "M:4:4:8", "--gini", "0.4", "--links", "8",
            "--held-back-every", "1", "--no-plot", "-q"]


def test_a_fresh_m_capped_cell_on_a_lease_slow_on_the_gpu(tmp_path, monkeypatch) -> None:
    """Session 40, held back, planned and predicted with h200-1gpu as shipped (no model change
    in the session). docs/validation-h200-v25-fresh: M4x8 capped at G 0.4, three runs a
    schedule: 9.4%, the worst 13.1% (GPipe), every run predicted fast, ranked right. GPipe, a
    step of GPU work that ran 0.179-0.222 s in the twelve older M cells, ran 0.209-0.242 here:
    the lease was slow on the GPU's side, and APTMoE's three runs were 20% apart."""
    v25 = _repredicted("validation-h200-v25-fresh", tmp_path, monkeypatch, ["--calibration", "h200-1gpu", *V25_1GPU])
    _held_back(v25, (0.095, 0.132), runs=4, configs=1, ranking_right=1, ranking_apart=1,
               worst_run="M4x8-G0.4-cap8-1gpu GPipe")
    assert all(r["error"] < 0 for r in v25["runs"]), [r["error"] for r in v25["runs"]]


V26_1GPU = ["--gpus", "1", "--steps", "3,S=6", "--repeats", "3", "--models", "M:4:4:8,S:8:8:8", "--gini", "0.65,0.7",
            "--links", "native", "--held-back-every", "1", "--no-plot", "-q"]


def test_two_fresh_native_cells_on_a_lease_slow_on_the_cpu(tmp_path, monkeypatch) -> None:
    """Session 40, held back, planned and predicted with h200-1gpu as shipped (no model change
    in the session). docs/validation-h200-v26-fresh: S8x8 native at G 0.7 and M4x8 native at G
    0.65, one lease, three runs a schedule: 9.2%, the worst 16.7% (M APTMoE), every run predicted
    fast, ranked right in both by the 3% rule. M's GPipe, the GPU's work, within 1.4%; M's
    offloading steps end with the CPU's Adam, which ran 0.296-0.299 ns/param on this lease
    against the profile's 0.262."""
    v26 = _repredicted("validation-h200-v26-fresh", tmp_path, monkeypatch, ["--calibration", "h200-1gpu", *V26_1GPU])
    _held_back(v26, (0.093, 0.168), runs=8, configs=2, ranking_right=2, ranking_apart=2,
               worst_run="M4x8-G0.65-native-1gpu APTMoE")
    assert all(r["error"] < 0 for r in v26["runs"]), [r["error"] for r in v26["runs"]]
    gpipe_m = next(r for r in v26["runs"] if r["model"] == "M" and r["pipeline"] == "GPipe")
    assert abs(gpipe_m["error"]) < 0.02, gpipe_m["error"]


V27_1GPU = ["--gpus", "1", "--steps", "3,S=6", "--repeats", "3", "--models", "S:8:8:8", "--gini", "0.3", "--links", "8",
            "--held-back-every", "1", "--no-plot", "-q"]


def test_a_fresh_s_capped_cell_on_a_lease_fast_on_the_host(tmp_path, monkeypatch) -> None:
    """Session 42, held back, planned with h200-1gpu before its loss and embedding curves and
    predicted with it after (decided on v10- to v22-fresh first; S's steps are the host's, so
    the curves move nothing here). docs/validation-h200-v27-fresh: S8x8 capped at G 0.3, three
    runs a schedule: 5.3%, the worst 19.1% (GPipe, predicted slow: the runs' reference loop read
    0.69x the probe's). Mobius ran 3% ahead of APTMoE and is predicted 6.6% behind it: wrong by
    the 3% rule, but their runs interleave (0.716-0.751 and 0.679-0.776 s)."""
    v27 = _repredicted("validation-h200-v27-fresh", tmp_path, monkeypatch, ["--calibration", "h200-1gpu", *V27_1GPU])
    _held_back(v27, (0.054, 0.192), runs=4, configs=1, ranking_right=0, ranking_apart=1,
               worst_run="S8x8-G0.3-cap8-1gpu GPipe")
    gpipe = next(r for r in v27["runs"] if r["pipeline"] == "GPipe")
    assert gpipe["error"] > 0.15 and gpipe["host_speed"] < 0.75, gpipe


V28_1GPU = ["--gpus", "1", "--steps", "3,S=6", "--repeats", "3", "--models", "M:4:4:8,S:8:8:8,L:2:2:8", "--gini",
            "0.55,0.65,0.6", "--links", "8,native", "--held-back-every", "1", "--no-plot", "-q"]


def test_three_fresh_one_gpu_cells_with_the_loss_and_embedding_on_the_gpu(tmp_path, monkeypatch) -> None:
    """Session 42, held back, planned and predicted with h200-1gpu as shipped after its loss and
    embedding curves (kinds l and m: 104 runs of v10- to v22-fresh went 2.97 -> 2.94% median,
    42.6 -> 42.4% worst, before any cell here was read). docs/validation-h200-v28-fresh, one
    lease: M4x8 capped at G 0.55, S8x8 capped at G 0.65, L2x8 native at G 0.6, three runs a
    schedule: 3.1%, the worst 15.2% (S GPipe, predicted slow on a host faster than the profile),
    ranked right in all three by the 3% rule. M's four schedules within 3.5%, L's within 6.1%."""
    v28 = _repredicted("validation-h200-v28-fresh", tmp_path, monkeypatch, ["--calibration", "h200-1gpu", *V28_1GPU])
    _held_back(v28, (0.032, 0.153), runs=12, configs=3, ranking_right=3, ranking_apart=3,
               worst_run="S8x8-G0.65-cap8-1gpu GPipe")
    for model, bound in (("M", 0.036), ("L", 0.062)):
        errs = [abs(r["error"]) for r in v28["runs"] if r["model"] == model]
        assert len(errs) == 4 and max(errs) < bound, (model, errs)


V22_AGAIN_S = ["--gpus", "1", "--steps", "3,S=6", "--repeats", "3", "--models", "S:8:8:8", "--gini", "0.55", "--links",
               "native", "--held-back-every", "1", "--no-plot", "-q"]
V22_AGAIN_M = ["--gpus", "1", "--steps", "3", "--repeats", "3", "--models", "M:4:4:8", "--gini", "0.45", "--links",
               "native", "--held-back-every", "1", "--no-plot", "-q"]


def test_v22_fresh_s_cell_measured_again_four_times(tmp_path, monkeypatch) -> None:
    """Session 43, held back (no model or profile change before they were read): v22-fresh's
    S8x8 native G 0.55 cell, measured again as the matrix measures it, twice on one lease minutes
    apart (again-a, -b) and twice on another (-c, -d), with the executor code and plans of
    v22-fresh, and v22-fresh's M cell once (-m). All 20 runs predicted fast: 7.4% median, the
    worst 20.0% (M's APTMoE, whose three runs took 0.466-0.663 s). One prediction serves all five
    S measurements, and `aptmoe-sim floor` says what none could do better: GPipe's medians span
    0.261-0.314 s, so any one figure misses one of them by 9.3% or more, and again-a and -b order
    Mobius and APTMoE opposite ways (5.7% and 5.3% apart), so no prediction ranks both right by
    the 3% rule (v12-fresh, four runs a schedule, is not the same run command and is left out).
    Session 21's 2-GPU repeat of an S4 cell on one lease and tree (2gpu-v6-fresh, -again) did
    the same: APTMoE 5.9% ahead of Mobius, then Mobius 15% ahead."""
    from aptmoe.sim.matrix_floor import cell_floors

    folders = [DOCS / f for f in ("validation-h200-v22-fresh", *(f"validation-h200-v22-again-{x}" for x in "abcd"),
                                  "validation-h200-v12-fresh")]
    if not all(f.is_dir() for f in folders):
        pytest.skip("the stored H200 matrices of v22-fresh's S cell are not in this tree")
    (s,) = [c for c in cell_floors(folders) if c.cell == "S8x8-G0.55-native-1gpu"]
    assert len(s.folders) == 5 and s.left_out == [str(DOCS / "validation-h200-v12-fresh")]
    assert [round(x, 3) for x in s.measured["GPipe"]] == [0.279, 0.314, 0.261, 0.284, 0.272]
    assert 0.092 < s.floors()["GPipe"] < 0.094 and max(s.floors().values()) == s.floors()["GPipe"]
    assert s.opposite == [("Mobius", "APTMoE")]
    # and on two GPUs: 2gpu-v6-fresh's S4 cell measured again 13 minutes later, one lease, one tree
    (v6,) = cell_floors([DOCS / "validation-h200-2gpu-v6-fresh", DOCS / "validation-h200-2gpu-v6-again"])
    assert v6.opposite == [("Mobius", "APTMoE")] and not v6.left_out
    errors = []
    for x, flags, bounds, expected in (
            ("a", V22_AGAIN_S, (0.095, 0.182), dict(ranking_right=0, worst_run="S8x8-G0.55-native-1gpu GPipe")),
            ("b", V22_AGAIN_S, (0.080, 0.100), dict(ranking_right=1, worst_run="S8x8-G0.55-native-1gpu APTMoE")),
            ("c", V22_AGAIN_S, (0.097, 0.131), dict(ranking_right=1)),
            ("d", V22_AGAIN_S, (0.038, 0.054), dict(ranking_right=1)),
            ("m", V22_AGAIN_M, (0.064, 0.200), dict(ranking_right=0, worst_run="M4x8-G0.45-native-1gpu APTMoE"))):
        again = _repredicted(f"validation-h200-v22-again-{x}", tmp_path, monkeypatch,
                             ["--calibration", "h200-1gpu", *flags])
        _held_back(again, bounds, runs=4, configs=1, ranking_apart=1, **expected)
        errors += [r["error"] for r in again["runs"]]
    assert len(errors) == 20 and max(errors) < 0, errors
    assert statistics.median(abs(e) for e in errors) < 0.074
