"""The executor's A/B runner (exec/ab.py): the order of the arms, and the table it reads from
the runs' results and traces."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from aptmoe.exec import ab
from aptmoe.trace import Trace


def test_each_arm_goes_first_in_half_of_the_rounds() -> None:
    assert ab.arm_order(1) == ["A", "B"]
    assert ab.arm_order(3) == ["A", "B", "B", "A", "A", "B"]


def _run(folder: Path, steps: dict[str, list[float]], cpu_jobs_us: list[float], loose: int) -> None:
    folder.mkdir(parents=True)
    doc = {"schedules": {name: {"step_s": s, "threads": [{"host": 9, "worker": 14, "loose": loose}] * 2}
                         for name, s in steps.items()}}
    doc["schedules"]["GPipe"] = {"oom": True}
    (folder / "results.json").write_text(json.dumps(doc))
    trace = Trace("real")                      # as the executor writes it, compressed as a matrix cell keeps it
    for i, us in enumerate(cpu_jobs_us):
        trace.add(f"e{i}", i % 2, "cpu", 0.0, us * 1e-6, "cpu-expert")
    trace.add("f", 0, "compute", 0.0, 1.0, "forward")
    with gzip.open(folder / "trace-APTMoE.json.gz", "wt") as f:
        json.dump(trace.to_chrome(), f)


def test_the_table_gives_each_arm_its_medians_and_b_over_a(tmp_path) -> None:
    _run(tmp_path / "A1", {"APTMoE": [1.0, 1.2, 1.1], "Mobius": [2.0, 2.0, 2.0]}, [1000, 3000], 0)
    _run(tmp_path / "B1", {"APTMoE": [1.3, 1.4, 1.5], "Mobius": [2.2, 2.2, 2.2]}, [1000, 60000], 93)
    runs = {label: ab.run_summary(tmp_path / label) for label in ("A1", "B1")}
    assert set(runs["A1"]) == {"APTMoE", "Mobius"}                      # the refused schedule is left out
    assert runs["B1"]["APTMoE"]["cpu_expert_s"] == pytest.approx(0.061 / 3)
    assert runs["B1"]["APTMoE"]["worst_job_s"] == pytest.approx(0.060)
    assert runs["B1"]["Mobius"]["loose"] == 186 and runs["A1"]["Mobius"]["cpu_expert_s"] == 0.0   # no trace
    text = ab.table(runs)
    assert "| APTMoE | A | 1 | 1.100 | 1.100 | 0.001 | 3.0 | 0 |" in text
    assert "| APTMoE | B | 1 | 1.400 | 1.400 | 0.020 | 60.0 | 186 |" in text
    assert "APTMoE: B/A 1.273 (rounds: 1.273); Mobius: B/A 1.100 (rounds: 1.100)" in text


def test_each_round_gives_its_own_ratio(tmp_path) -> None:
    for label, steps in (("A1", [1.0]), ("B1", [1.2]), ("B2", [1.1]), ("A2", [1.0]), ("A3", [2.0])):
        _run(tmp_path / label, {"APTMoE": steps}, [], 0)
    runs = {label: ab.run_summary(tmp_path / label) for label in ("A1", "B1", "B2", "A2", "A3")}
    # pooled: B's 1.15 over A's 1.0; the unpaired third A run has no round ratio
    assert "APTMoE: B/A 1.150 (rounds: 1.200, 1.100)" in ab.table(runs)


def test_a_used_output_folder_is_refused(tmp_path, capsys) -> None:
    (tmp_path / "A1").mkdir()
    with pytest.raises(SystemExit) as e:
        ab.main(["--b=--no-confine-threads", "--out", str(tmp_path), "--", "--gpus", "1"])
    assert e.value.code == 2 and "is not empty" in capsys.readouterr().err
