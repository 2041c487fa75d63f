"""Stored runs' files (aptmoe.stored) and scripts/pack-stored-runs: plain, gzip or xz, one reading."""

from __future__ import annotations

import gzip
import json
import lzma
import subprocess
import sys
from pathlib import Path

import pytest

from aptmoe.stored import (CORRUPT, is_measured_run, measured_traces, open_text, pack, plain_name, read_bytes, read_json,
                           read_text, run_source, stored_file, stored_run_files)

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "pack-stored-runs"
TEXT = '{"traceEvents": [], "note": "caf\u00e9"}\n'


def _forms(folder: Path, stem: str = "t.json") -> dict[str, Path]:
    """The same text kept plain, gzip- and xz-compressed."""
    data = TEXT.encode()
    paths = {"": folder / stem, ".gz": folder / f"{stem}.gz", ".xz": folder / f"{stem}.xz"}
    paths[""].write_bytes(data)
    paths[".gz"].write_bytes(gzip.compress(data))
    paths[".xz"].write_bytes(lzma.compress(data))
    return paths


def test_each_form_reads_as_the_same_text(tmp_path) -> None:
    for path in _forms(tmp_path).values():
        assert read_text(path) == TEXT and read_bytes(path) == TEXT.encode()
        with open_text(path) as f:
            assert json.load(f)["note"] == "caf\u00e9"
        assert plain_name(path) == "t.json"


@pytest.mark.parametrize("name, data", [("bad.json.xz", b"not xz"), ("bad.json.gz", b"not gzip"),
                                        ("cut.json.xz", lzma.compress(TEXT.encode())[:-10]),
                                        ("cut.json.gz", gzip.compress(TEXT.encode())[:-10])])
def test_a_corrupt_or_cut_compressed_file_raises_one_of_corrupt(tmp_path, name, data) -> None:
    (tmp_path / name).write_bytes(data)
    with pytest.raises(CORRUPT):
        read_text(tmp_path / name)
    with pytest.raises(CORRUPT):
        read_bytes(tmp_path / name)


def test_the_stored_file_is_plain_then_gz_then_xz_and_none_without_one(tmp_path) -> None:
    assert stored_file(tmp_path / "t.json") is None
    paths = _forms(tmp_path)
    for suffix in ("", ".gz", ".xz"):
        assert stored_file(tmp_path / "t.json") == paths[suffix]
        paths[suffix].unlink()
    assert stored_file(tmp_path / "t.json") is None
    (tmp_path / "d.json").mkdir()                       # a folder is no file
    assert stored_file(tmp_path / "d.json") is None


def test_pack_replaces_plain_and_gz_by_xz_of_the_same_bytes_and_leaves_xz(tmp_path) -> None:
    for suffix in ("", ".gz"):
        folder = tmp_path / (suffix or "plain")
        folder.mkdir()
        path = _forms(folder)[suffix]
        (folder / "t.json.xz").unlink()
        before = path.stat().st_size
        assert pack(path) == (before, (folder / "t.json.xz").stat().st_size)
        assert not path.exists() and read_bytes(folder / "t.json.xz") == TEXT.encode()
        assert sorted(p.name for p in folder.iterdir()) == sorted({"t.json", "t.json.gz", "t.json.xz"} - {path.name})
    xz = tmp_path / "plain" / "t.json.xz"
    mtime = xz.stat().st_mtime_ns
    assert pack(xz) == (xz.stat().st_size,) * 2 and xz.stat().st_mtime_ns == mtime


def test_pack_keeps_a_corrupt_original_and_leaves_no_partial(tmp_path) -> None:
    (tmp_path / "trace-X.json.gz").write_bytes(gzip.compress(TEXT.encode())[:-10])
    with pytest.raises(CORRUPT):
        pack(tmp_path / "trace-X.json.gz")
    assert [p.name for p in tmp_path.iterdir()] == ["trace-X.json.gz"]


def _store(root: Path) -> dict[str, Path]:
    """A small docs/ tree: a matrix cell, a measured run folder, a simulator's run folder."""
    cell = root / "validation-x" / "cells" / "S8x8-G0.3-native-1gpu"
    (cell / "real").mkdir(parents=True)
    (cell / "real" / "results.json").write_text('{"source": "real"}')
    (cell / "real" / "trace-GPipe.json.gz").write_bytes(gzip.compress(b'{"traceEvents": [1]}'))
    (cell / "real" / "trace-Mobius.json").write_text('{"traceEvents": [2]}')
    (cell / "real" / "plan-profile.json").write_text('{"name": "planned"}')
    (cell / "real" / "plan-Mobius.txt").write_text("plan")
    (cell / "profile.json").write_text('{"name": "predicted"}')
    (cell / "trace-Mobius-predicted.json").write_text('{"traceEvents": [3]}')     # git-ignored, rewritten
    (cell / "validation.json").write_text('{"schedules": []}')
    (cell / "cell.json").write_text('{"name": "S8x8-G0.3-native-1gpu"}')       # small: left plain
    (root / "validation-x" / "matrix.json").write_text('{"runs": []}')
    run = root / "measured" / "session9" / "regime2"
    run.mkdir(parents=True)
    (run / "results.json").write_text('{"source": "real", "schedules": {}}')
    (run / "trace-APTMoE.json.gz").write_bytes(gzip.compress(b'{"traceEvents": [4]}'))
    (run / "plan-profile.json").write_text('{"name": "run"}')
    sim = root / "measured" / "session9" / "sim"
    sim.mkdir()
    (sim / "results.json").write_text('{"schedules": {}}')
    (sim / "trace-APTMoE.json").write_text('{"traceEvents": [5]}')
    (root / "measured" / "session9" / "profile.json").write_text('{"name": "a lease"}')   # not a cell's
    (root / "measured" / "session9" / "lease.json").write_text('{\n  "schema": "aptmoe-calibration/1",\n  "name": "x"}')
    return {"cell": cell, "run": run, "sim": sim}


def _snapshot(root: Path) -> dict[str, bytes]:
    """Every file's name (as a tool expects it) and content, decompressed."""
    return {str(p.relative_to(root).with_name(plain_name(p))): read_bytes(p) for p in root.rglob("*") if p.is_file()}


def test_the_store_packs_runs_matrices_and_calibration_files_only(tmp_path) -> None:
    where = _store(tmp_path)
    cell, run = where["cell"], where["run"]
    assert sorted(stored_run_files(tmp_path)) == sorted([
        run / "plan-profile.json", run / "results.json", run / "trace-APTMoE.json.gz",
        cell / "real" / "plan-profile.json", cell / "real" / "results.json", cell / "real" / "trace-GPipe.json.gz",
        cell / "real" / "trace-Mobius.json", cell / "profile.json", cell / "validation.json",
        tmp_path / "validation-x" / "matrix.json", tmp_path / "measured" / "session9" / "lease.json"])
    assert measured_traces(cell / "real") == [cell / "real" / "trace-GPipe.json.gz", cell / "real" / "trace-Mobius.json"]
    assert measured_traces(cell) == []                  # the predicted trace beside real/ is not measured


def _script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120)


def test_the_pack_script_round_trips_is_idempotent_and_leaves_predicted_traces(tmp_path) -> None:
    where = _store(tmp_path)
    before = _snapshot(tmp_path)
    untouched = {p: p.read_bytes() for p in (where["cell"] / "trace-Mobius-predicted.json",
                                             where["sim"] / "trace-APTMoE.json", where["sim"] / "results.json",
                                             tmp_path / "measured" / "session9" / "profile.json",
                                             where["cell"] / "real" / "plan-Mobius.txt")}
    done = _script(str(tmp_path), "--jobs", "2")
    assert done.returncode == 0, done.stderr
    assert f"{tmp_path}: packed 11 files, " in done.stdout
    assert _snapshot(tmp_path) == before                # the same content under the same names
    assert all(p.read_bytes() == data for p, data in untouched.items())
    assert sorted(p.name for p in (where["cell"] / "real").iterdir()) == [
        "plan-Mobius.txt", "plan-profile.json.xz", "results.json.xz", "trace-GPipe.json.xz", "trace-Mobius.json.xz"]
    assert (where["cell"] / "profile.json.xz").exists() and (where["run"] / "trace-APTMoE.json.xz").exists()
    assert sorted(p.name for p in where["run"].iterdir()) == [
        "plan-profile.json.xz", "results.json.xz", "trace-APTMoE.json.xz"]
    assert (where["cell"] / "validation.json.xz").exists() and (where["cell"] / "cell.json").exists()
    # packed, the run folder is still a measured run (its results.json.xz says so): all 11 found
    assert sorted(stored_run_files(tmp_path)) == sorted(tmp_path.rglob("*.xz"))
    packed = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.xz")}
    again = _script(str(tmp_path))
    assert again.returncode == 0 and f"{tmp_path}: packed 0 files, 0.00 MiB -> 0.00 MiB" in again.stdout
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.xz")} == packed


def test_the_pack_script_s_dry_run_packs_nothing_and_a_missing_folder_is_refused(tmp_path) -> None:
    _store(tmp_path)
    before = sorted(tmp_path.rglob("*"))
    dry = _script(str(tmp_path), "--dry-run")
    assert dry.returncode == 0 and "11 files to pack" in dry.stdout and sorted(tmp_path.rglob("*")) == before
    missing = _script(str(tmp_path / "nowhere"))
    assert missing.returncode == 2 and "no such folder" in missing.stderr
    assert "xz -dk" in _script("--help").stdout


# --------------------------------------------------------------------------- a stored run's results.json.xz


def _packed_run(folder: Path, source: str = "real") -> Path:
    """A run folder as a store keeps it after packing: only its results.json.xz."""
    folder.mkdir(parents=True)
    doc = {"source": source, "schedules": {"GPipe": {"step_s": [1.0, 1.2, 1.1]}, "Mobius": {"oom": True}}}
    (folder / "results.json").write_text(json.dumps(doc))
    pack(folder / "results.json")
    assert [p.name for p in folder.iterdir()] == ["results.json.xz"]
    return folder


def test_a_run_keeping_only_results_json_xz_is_a_measured_run_and_packed_once(tmp_path) -> None:
    run = _packed_run(tmp_path / "measured" / "session9" / "regime2")
    sim = _packed_run(tmp_path / "measured" / "session9" / "sim", source="sim")
    (run / "trace-GPipe.json").write_text('{"traceEvents": []}')        # a trace kept plain beside it
    (sim / "trace-GPipe.json").write_text('{"traceEvents": []}')
    assert (run_source(run), run_source(sim), run_source(tmp_path)) == ("real", "sim", None)
    assert is_measured_run(run) and not is_measured_run(sim)
    assert read_json(run / "results.json")["source"] == "real"            # the name a tool expects
    assert sorted(stored_run_files(tmp_path)) == [run / "results.json.xz", run / "trace-GPipe.json"]
    done = _script(str(tmp_path))
    assert done.returncode == 0 and f"{tmp_path}: packed 1 files, " in done.stdout, done.stderr
    assert sorted(p.name for p in run.iterdir()) == ["results.json.xz", "trace-GPipe.json.xz"]
    assert (sim / "trace-GPipe.json").exists()                           # the simulator's: left as it is
    again = _script(str(tmp_path))
    assert again.returncode == 0 and f"{tmp_path}: packed 0 files, 0.00 MiB -> 0.00 MiB" in again.stdout
    assert "2 packed already" in _script(str(tmp_path), "--dry-run").stdout      # found still, both


def test_the_readers_of_a_run_take_its_results_json_xz(tmp_path) -> None:
    """cpu_vs_runs finds a run by its results.json.xz; phases, matrix and ab read it by the name
    results.json."""
    from aptmoe.calibration.cpu_vs_runs import run_folders
    from aptmoe.exec.ab import run_summary
    from aptmoe.sim import matrix, phases

    run = _packed_run(tmp_path / "a" / "regime2")
    sim = _packed_run(tmp_path / "b" / "sim", source="sim")
    (tmp_path / "a" / "results.json.partial").write_text("{}")            # not a run's results
    assert run_folders([tmp_path]) == [run] and run_folders([run]) == [run] and run_folders([sim]) == []
    assert phases.timed_steps(run, "GPipe") == 3 and phases.timed_steps(sim / "nowhere", "GPipe") is None
    assert matrix.step_spreads(run / "results.json") == {"GPipe": pytest.approx(0.2 / 1.1)}
    assert run_summary(run) == {"GPipe": {"step_s": [1.0, 1.2, 1.1], "cpu_expert_s": 0.0, "worst_job_s": 0.0,
                                          "loose": 0}}
    (run / "results.json.xz").write_bytes(b"not xz")                     # corrupt: unreadable, as a bad JSON is
    assert run_folders([tmp_path]) == [] and phases.timed_steps(run, "GPipe") is None
    assert matrix.step_spreads(run / "results.json") == {}


def test_validate_predicts_a_stored_run_that_keeps_results_json_xz(tmp_path) -> None:
    """compare_run (validate, and matrix --repredict) reads the run's results.json.xz: the measured
    step time it reports is the one the stored cell's validation.json has (GPipe alone: fast)."""
    from aptmoe.profile import load_profile
    from aptmoe.sim.validate import compare_run

    cell = ROOT / "docs" / "validation-h200-v19-fresh" / "cells" / "S8x8-G0.5-cap8-1gpu"
    if not cell.is_dir():
        pytest.skip("the stored v19-fresh matrix is not in this tree")
    real = tmp_path / "real"
    real.mkdir()
    for name in ("plan-profile.json", "trace-GPipe.json"):
        kept = stored_file(cell / "real" / name)
        (real / kept.name).write_bytes(kept.read_bytes())
    doc = read_json(cell / "real" / "results.json")
    doc["schedules"] = {"GPipe": doc["schedules"]["GPipe"]}
    (real / "results.json").write_text(json.dumps(doc))
    pack(real / "results.json")
    assert stored_file(real / "results.json") == real / "results.json.xz"
    rows = compare_run(real, load_profile("h200-1gpu"), tmp_path, ["validate"], plot=False)
    stored = {r["pipeline"]: r for r in read_json(cell / "validation.json")["schedules"]}
    assert [r["pipeline"] for r in rows] == ["GPipe"]
    assert rows[0]["measured_s"] == stored["GPipe"]["measured_s"]


def test_a_file_written_plain_again_drops_its_packed_copy_and_calibration_files_are_told_apart(tmp_path) -> None:
    """`drop_packed` after a repredict rewrote a stored cell's validation.json: its .xz and .gz go,
    so the fresh plain file is the only one; a file is a calibration by its schema, in any form."""
    from aptmoe.stored import drop_packed, is_calibration_file

    val = tmp_path / "validation.json"
    val.write_text('{"schedules": [1]}')
    pack(val)
    (tmp_path / "validation.json.gz").write_bytes(gzip.compress(b"{}"))
    val.write_text('{"schedules": [2]}')
    drop_packed(val)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["validation.json"]
    assert read_json(val) == {"schedules": [2]}
    drop_packed(tmp_path / "nothing.json")                      # nothing packed of it: nothing to do
    prof = tmp_path / "lease.json"
    prof.write_text('{\n  "schema": "aptmoe-calibration/1"}')
    pack(prof)
    assert is_calibration_file(tmp_path / "lease.json.xz")
    (tmp_path / "other.json").write_text('{"schema": "aptmoe-trace/1"}')
    (tmp_path / "bad.json.xz").write_bytes(b"not xz")
    assert not is_calibration_file(tmp_path / "other.json") and not is_calibration_file(tmp_path / "bad.json.xz")

