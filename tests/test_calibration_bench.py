"""python -m aptmoe.calibration.bench: runs recorded over several calls, one table of medians."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest

from aptmoe.calibration import bench

MACHINE = "Machine: Intel(R) Xeon(R) Processor, 32 cores, Python 3.12.3; commit abc1234. GPUs: 2 x NVIDIA H200."


def _run(case: str, secs: float, date: str = "2026-11-30", machine: str = MACHINE) -> bench.Run:
    return bench.Run(case, secs, "gpu", machine, date, "python -m aptmoe.calibration.bench --repeats 1 --full")


def _record(path, runs) -> None:
    path.write_text("".join(json.dumps(asdict(r)) + "\n" for r in runs))


def test_the_table_holds_every_recorded_run_of_a_case_and_their_median(tmp_path) -> None:
    record = tmp_path / "record.jsonl"
    _record(record, [_run("aptmoe-calibrate --threads 14,16 (full)", s, d)
                     for s, d in ((520.0, "2026-11-30"), (480.5, "2026-11-30"), (610.25, "2026-12-01"))])
    text, start, end = bench.section(bench.read_record(record), "gpu")
    assert text.startswith(start) and text.rstrip().endswith(end)
    row = next(line for line in text.splitlines() if line.startswith("| aptmoe-calibrate"))
    assert row == "| aptmoe-calibrate --threads 14,16 (full) | 520.00 | 520.00, 480.50, 610.25 |  |"
    assert MACHINE in text and "2026-11-30 to 2026-12-01" in text and "--repeats 1 --full" in text


def test_runs_of_two_machines_or_commits_are_not_mixed_in_one_median(tmp_path) -> None:
    runs = [_run("q (quick)", 60.0), _run("q (quick)", 70.0, machine=MACHINE.replace("abc1234", "def5678"))]
    with pytest.raises(ValueError, match="2 machines or commits"):
        bench.section(runs, "gpu")
    with pytest.raises(ValueError, match="no cpu runs"):
        bench.section(runs[:1], "cpu")


def test_a_corrupt_record_line_is_named(tmp_path) -> None:
    record = tmp_path / "record.jsonl"
    _record(record, [_run("q (quick)", 60.0)])
    record.write_text(record.read_text() + '{"case": "half a line"\n')
    with pytest.raises(ValueError, match=r"record.jsonl:2 is not a recorded run"):
        bench.read_record(record)
    assert bench.read_record(tmp_path / "absent.jsonl") == []


def test_writing_a_record_runs_nothing_and_replaces_only_its_section(tmp_path, capsys) -> None:
    record, marks = tmp_path / "record.jsonl", tmp_path / "BENCHMARKS.md"
    _record(record, [_run("full (full)", 500.0), _run("full (full)", 530.0)])
    marks.write_text("# Benchmarks\n\nbefore\n<!-- calibrate-bench-gpu:start -->\nold\n"
                     "<!-- calibrate-bench-gpu:end -->\nafter\n")
    assert bench.main(["--repeats", "0", "--record", str(record), "--write", str(marks)]) == 0
    text = marks.read_text()
    assert "old" not in text and "| full (full) | 515.00 | 500.00, 530.00 |  |" in text
    assert text.startswith("# Benchmarks\n\nbefore\n") and text.endswith("after\n")


@pytest.mark.parametrize("argv, says", [
    (["--repeats", "0"], "--repeats must be at least 1"),
    (["--repeats", "1", "--no-quick"], "--no-quick needs --full"),
])
def test_bad_flags_are_one_line_and_exit_2(argv, says, capsys) -> None:
    assert bench.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert says in err and "\n" not in err


def test_an_empty_record_says_so(tmp_path, capsys) -> None:
    assert bench.main(["--repeats", "0", "--record", str(tmp_path / "none.jsonl")]) == 2
    assert "holds no runs" in capsys.readouterr().err


def test_a_kept_log_gets_each_parts_time_and_an_unkept_run_stays_quiet(tmp_path, monkeypatch) -> None:
    """Without -q the calibration prints a line per part as it ends (no terminal: no bar), so a
    run stopped by a device call's limit still says how far it got."""
    called: list[tuple[list[str], object]] = []
    monkeypatch.setattr(bench, "time_command", lambda cmd, log: called.append((cmd, log)) or 1.0)
    bench.run(1, ["quick"], ["--threads", "2"], None, tmp_path, "bench")
    bench.run(1, ["quick"], ["--threads", "2"], None, None, "bench")
    (kept, log), (unkept, none) = called
    assert log == tmp_path / "quick0.log" and "-q" not in kept
    assert none is None and "-q" in unkept
