"""sim/cell_time.py and `aptmoe-sim matrix --budget-s`: a cell starts only where the cells stored
like it say it will end in time."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("simpy")

from aptmoe.run_process import ExecutorFailed  # noqa: E402
from aptmoe.sim import matrix  # noqa: E402
from aptmoe.sim.cell_time import MARGIN, expected_s, stored_cell_times  # noqa: E402
from aptmoe.sim.cli import main as sim_main  # noqa: E402

FLAGS = ["--calibration", "a800-paper", "--models", "S:4:2", "--experts", "4", "--gini", "0.3", "--links", "native",
         "--device", "cpu", "--batch_size", "4", "--num_chunks", "2", "--seq_length", "8", "--warmup", "0",
         "--steps", "2", "--held-back-every", "1", "-q"]
RUN = ["--is_moe=True", "--model_config=S", "--num_layers", "4", "--num_stages", "2", "--num_experts", "4"]


def _stored(folder: Path, name: str, run: list[str], gini: str, wall_s: float | None) -> None:
    cell = folder / "cells" / name
    cell.mkdir(parents=True)
    doc = {"command": ["aptmoe-sim", "validate", "--calibration", "h200-1gpu", "--replay-placements", *run[:8],
                       "--gini", gini, *run[8:]]}
    if wall_s is not None:
        doc["wall_s"] = wall_s
    (cell / "cell.json").write_text(json.dumps(doc))


def test_a_cell_takes_as_long_as_the_longest_like_it_whatever_its_g_and_profile(tmp_path):
    _stored(tmp_path / "a", "x", RUN, "0.3", 100.0)
    _stored(tmp_path / "b", "y", RUN, "0.6", 120.0)
    _stored(tmp_path / "b", "z", [*RUN[:-1], "8"], "0.3", 999.0)          # other work: 8 experts
    _stored(tmp_path / "b", "old", RUN, "0.3", None)                     # no wall time: tells nothing
    (tmp_path / "b" / "cells" / "bad").mkdir()
    (tmp_path / "b" / "cells" / "bad" / "cell.json").write_text("{not json")
    times = stored_cell_times([tmp_path / "a", tmp_path / "b", tmp_path / "missing"])
    assert expected_s([*RUN[:8], "--gini", "0.45", *RUN[8:]], times) == pytest.approx(120.0 * MARGIN)
    assert expected_s([*RUN[:-1], "2"], times) is None


def _run_cmd(tmp_path, monkeypatch) -> list[str]:
    """The executor arguments the matrix gives FLAGS' one cell (read off a stand-in executor)."""
    got = []

    def run_executor(argv, out, calibration=None, **kw):
        got.append(list(argv))
        raise ExecutorFailed("stand-in")
    monkeypatch.setattr(matrix, "run_executor", run_executor)
    sim_main(["matrix", "--out", str(tmp_path / "probe"), *FLAGS])
    (argv,) = got
    return argv


@pytest.mark.parametrize("took, starts", [(1000.0, False), (1.0, True)])
def test_the_matrix_starts_a_cell_only_where_cells_like_it_ended_within_the_budget(tmp_path, monkeypatch, capsys,
                                                                                  took, starts):
    argv = _run_cmd(tmp_path, monkeypatch)
    gini = argv.index("--gini")
    # a cell stored before with the same run at another G, which took `took` seconds
    (tmp_path / "before" / "cells" / "S4x4-G0.6").mkdir(parents=True)
    (tmp_path / "before" / "cells" / "S4x4-G0.6" / "cell.json").write_text(json.dumps(
        {"command": ["aptmoe-sim", "validate", "--calibration", "a800-paper", *argv[:gini], "--gini", "0.6",
                     *argv[gini + 2:]], "wall_s": took}))
    ran = []

    def run_executor(argv, out, calibration=None, **kw):
        ran.append(argv)
        raise ExecutorFailed("stand-in")
    monkeypatch.setattr(matrix, "run_executor", run_executor)
    capsys.readouterr()
    code = sim_main(["matrix", "--out", str(tmp_path / "m"), *[f for f in FLAGS if f != "-q"], "--budget-s", "600",
                     "--expect-from", str(tmp_path / "before")])
    out = capsys.readouterr().out
    assert bool(ran) == starts
    if starts:
        assert code == 1                      # the stand-in failed the cell it was given
    else:
        assert code == 0 and not list((tmp_path / "m" / "cells").iterdir())
        assert "1 cells left for a later call, each expected to end past --budget-s 600: " \
               "S4x4-G0.3-native-1gpu (1100 s)" in out
