"""aptmoe-run --repeats: every schedule run N times in fresh processes, the median run kept."""

from __future__ import annotations

import json

import pytest

from aptmoe.exec import repeats


def test_the_median_run_is_the_middle_one_and_the_lower_middle_of_an_even_count() -> None:
    assert repeats.median_index([0.3, 0.1, 0.2]) == 2
    assert repeats.median_index([0.4, 0.1, 0.3, 0.2]) == 3          # 0.2: the lower of 0.2 and 0.3
    assert repeats.median_index([0.5]) == 0
    assert repeats.median_index([0.2, 0.2, 0.2]) == 1               # ties keep their order


def test_the_kept_runs_files_come_back_and_the_others_go(tmp_path) -> None:
    for rep in range(3):
        (tmp_path / "trace-GPipe.json").write_text(f"gpipe {rep}")
        (tmp_path / "params-GPipe-rank0.pt").write_text(f"params {rep}")
        (tmp_path / "torch-GPipe-rank1.json.gz").write_text(f"torch {rep}")
        (tmp_path / "trace-GPipeOffload.json").write_text(f"offload {rep}")
        repeats.stash(tmp_path, "GPipe", rep)
        repeats.stash(tmp_path, "GPipeOffload", rep)
    runs = [{"iteration_s": t, "rep": i} for i, t in enumerate([0.30, 0.10, 0.20])]
    res = repeats.keep_median(tmp_path, "GPipe", runs)
    assert res["rep"] == 2 and res["repeats"] == {"iteration_s": [0.30, 0.10, 0.20], "kept": 2}
    assert (tmp_path / "trace-GPipe.json").read_text() == "gpipe 2"
    assert (tmp_path / "params-GPipe-rank0.pt").read_text() == "params 2"
    assert (tmp_path / "torch-GPipe-rank1.json.gz").read_text() == "torch 2"
    # GPipe's are settled; GPipeOffload's stashed files are not GPipe's to touch
    assert sorted(f.name for f in tmp_path.iterdir() if "GPipe." in f.name or "GPipe-" in f.name) == [
        "params-GPipe-rank0.pt", "torch-GPipe-rank1.json.gz", "trace-GPipe.json"]
    assert len(list(tmp_path.glob("trace-GPipeOffload.json.rep*"))) == 3


def test_repeats_under_torchrun_are_refused_in_one_line(tmp_path, monkeypatch, capsys) -> None:
    pytest.importorskip("torch")
    from aptmoe.exec.cli import main as run_main
    from exec_helpers import TINY

    for k, v in {"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "LOCAL_WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(k, v)
    out = tmp_path / "run"
    assert run_main([*TINY, "--device", "cpu", "--gpus", "1", "--pipeline", "Mobius", "--repeats", "2",
                     "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--repeats needs aptmoe-run's own launch" in err
    assert not out.exists()


@pytest.mark.parametrize("bad", ["0", "two"])
def test_a_bad_repeat_count_is_one_line_and_exit_2(bad, tmp_path, capsys) -> None:
    pytest.importorskip("torch")
    from aptmoe.exec.cli import main as run_main

    with pytest.raises(SystemExit) as e:
        run_main(["--repeats", bad, "--out", str(tmp_path / "x")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--repeats" in err


@pytest.mark.slow
def test_repeated_runs_keep_the_median_and_still_equal_the_reference(tmp_path) -> None:
    pytest.importorskip("torch")
    from exec_helpers import run_and_compare

    checked = run_and_compare(tmp_path, ["--device", "cpu", "--gpus", "2", "--pipeline", "GPipe,APTMoE",
                                         "--link-bandwidth", "0.02", "--repeats", "2"], cuda=False)
    out = tmp_path / "run"
    for name, c in checked.items():
        assert c["agreement"].within(1e-5), name
        res = c["result"]
        times = res["repeats"]["iteration_s"]
        assert len(times) == 2 and res["iteration_s"] == times[res["repeats"]["kept"]] == min(times)
    doc = json.loads((out / "results.json").read_text())
    assert list(doc["schedules"]) == ["GPipe", "APTMoE"]
    assert not list(out.glob("*.rep*")) and (out / "trace-APTMoE.json").exists()
