"""calibration/cpu_expert_sweep.py: the calibration's and the executor's ways, in fresh processes."""

from __future__ import annotations

import json

import pytest

from aptmoe.calibration import cpu_expert_sweep as sweep


def test_a_sweep_times_every_sample_in_each_arrangement(tmp_path, capsys) -> None:
    out = tmp_path / "sweep.json"
    assert sweep.main(["--sizes", "S", "--tokens", "1,3", "--reps", "1", "--pool-mib", "1", "--ranks", "1",
                       "--host-cores", "1", "--arrangements", "main,worker", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["threads"] >= 1 and result["tokens"] == [1, 3]
    for arr in ("main", "worker"):
        (one,) = result[arr]
        assert set(one["S"]) == set(sweep.SAMPLES)
        assert all(one["S"][s][n] > 0 for s in sweep.SAMPLES for n in ("1", "3"))
    printed = capsys.readouterr().out.splitlines()
    assert printed[1] == "MoE-S" and "profile" in printed[2] and "worker bwd" in printed[2]
    assert [line.split()[0] for line in printed[3:]] == ["1", "3"]


@pytest.mark.parametrize("flags, says", [(["--arrangements", "main,twins"], "'twins' is not one of"),
                                         (["--sizes", "S,XL"], "each must be S, M or L"),
                                         (["--reps", "0"], "at least 1")])
def test_bad_flags_get_one_line_and_no_file(tmp_path, capsys, flags, says) -> None:
    with pytest.raises(SystemExit) as e:
        sweep.main([*flags, "--out", str(tmp_path / "x.json")])
    assert e.value.code == 2 and says in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()
