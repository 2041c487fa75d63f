"""`aptmoe-sim sweep`: grid parsing, parallel points, error rows, plots."""

from __future__ import annotations

import csv
import shlex

import pytest

from aptmoe.sim.cli import UsageError, main
from aptmoe.sim.sweep import FIG11_MODELS, expand, make_sweep_parser, parse_grid, preset_points

BASE = "--is_moe=True --model_config=S --num_experts=16 --topo=C1+G2 --num_layers 8 --num_stages 4 --measured-steps 1"


def rows_of(path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_two_by_two_grid_in_two_processes(tmp_path, capsys) -> None:
    out = tmp_path / "sw"
    rc = main(["sweep", "--grid", "gini=0.2,0.3", "--grid", "pipeline=Mobius,APTMoE", "--jobs", "2", "-q",
               *shlex.split(BASE), "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    rows = rows_of(out / "sweep.csv")
    assert len(rows) == 4
    assert [(r["gini"], r["pipeline"]) for r in rows] == [("0.2", "Mobius"), ("0.2", "APTMoE"),
                                                          ("0.3", "Mobius"), ("0.3", "APTMoE")]
    for r in rows:
        assert float(r["throughput_seq_per_s"]) > 0 and r["oom"] == "False" and not r.get("error")
        assert float(r["iteration_s"]) > 0 and int(r["peak_gpu_bytes"]) > 0
        assert r["model"] == "MoE-S-16" and float(r["popularity/G"]) == pytest.approx(float(r["gini"]), abs=0.02)
    mob = {r["gini"]: float(r["throughput_seq_per_s"]) for r in rows if r["pipeline"] == "Mobius"}
    for r in rows:
        assert float(r["speedup_vs_mobius"]) == pytest.approx(float(r["throughput_seq_per_s"]) / mob[r["gini"]])
    for png in ("throughput_vs_gini.png", "speedup_vs_gini.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    assert (out / "sweep.json").exists()


def test_infeasible_point_is_an_error_row(tmp_path, capsys) -> None:
    out = tmp_path / "err"
    rc = main(["sweep", "--grid", "num_stages=3,4", "--grid", "gini=0.3", "--pipeline", "APTMoE", "--jobs", "1",
               *shlex.split(BASE.replace(" --num_stages 4", "")), "--out", str(out), "--no-plot"])
    assert rc == 0
    printed = capsys.readouterr().out
    rows = rows_of(out / "sweep.csv")
    assert [r["num_stages"] for r in rows] == ["3", "4"]
    assert "does not divide" in rows[0]["error"] and rows[0]["throughput_seq_per_s"] == ""
    assert rows[1]["error"] == "" and float(rows[1]["throughput_seq_per_s"]) > 0
    assert "error" in printed


def test_grid_parsing() -> None:
    p = make_sweep_parser()
    g = parse_grid(["gini=0.1,0.2", "link-bandwidth=8,25", "pipeline=all", "model_config=MoE-S-8"], p)
    assert g == {"gini": [0.1, 0.2], "link_bandwidth": [8.0, 25.0],
                 "pipeline": ["GPipe", "GPipeOffload", "Mobius", "APTMoE"], "model_config": ["MoE-S-8"]}
    assert len(expand(g)) == 16
    for bad in (["gini"], ["nosuch=1"], ["gini=x"], ["gini=0.1", "gini=0.2"], ["out=x"]):
        with pytest.raises(UsageError):
            parse_grid(bad, p)


def test_fig11_preset_points() -> None:
    ns = make_sweep_parser().parse_args(["--preset", "fig11"])
    pts = preset_points("fig11", ns)
    assert len(pts) == 6 * 4 * 4
    assert {p["model_config"] for p in pts} == set(FIG11_MODELS)
    assert sorted({p["gini"] for p in pts if p["model_config"] == "MoE-S-64"}) == [0.05, 0.1, 0.15, 0.2]
    assert sorted({p["gini"] for p in pts if p["model_config"] == "MoE-M-16"}) == [0.1, 0.2, 0.3, 0.4]
    assert sorted({p["gini"] for p in pts if p["model_config"] == "MoE-L-8"}) == [0.2, 0.4, 0.6, 0.8]
    assert (ns.is_moe, ns.gpus, ns.topo, ns.measured_steps) == (True, 4, "C1+G2", 1)
    with pytest.raises(UsageError):
        expand({"gini": [0.1]}, pts)


def test_bad_sweep_input_is_one_line(tmp_path, capsys) -> None:
    out = tmp_path / "bad"
    assert main(["sweep", "--grid", "gini=0.1", "--calibration", "/nonexistent.json", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("aptmoe-sim: error: ") and not out.exists()
    assert main(["sweep", "--out", str(out)]) == 2
    assert "nothing to sweep" in capsys.readouterr().err and not out.exists()


def test_host_factor_is_a_grid_field(tmp_path, capsys) -> None:
    """`--grid host_factor=...`: the same plan with the issuing thread slower or faster than
    calibrated; the host-bound GPipe step of MoE-S on one H200 follows it."""
    out = tmp_path / "hf"
    rc = main(["sweep", "--grid", "host_factor=0.5,1", "--jobs", "1", "-q", "--no-plot", *shlex.split(
        "--calibration h200-1gpu --is_moe=True --model_config=S --num_layers 4 --num_experts 8 --gini 0.45 --gpus 1 "
        "--topo C1+G1 --batch_size 32 --num_chunks 4 --pipeline GPipe --measured-steps 1"), "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    rows = rows_of(out / "sweep.csv")
    assert [r["host_factor"] for r in rows] == ["0.5", "1.0"] and not any(r.get("error") for r in rows)
    fast, calibrated = (float(r["iteration_s"]) for r in rows)
    assert 0.5 <= fast / calibrated < 0.6


def test_a_host_factor_grid_on_a_profile_without_dispatch_is_one_line(tmp_path, capsys) -> None:
    assert main(["sweep", "--grid", "host_factor=0.5,1", *shlex.split(BASE), "--out", str(tmp_path / "x")]) == 2
    assert "has no host cost per block call" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_gpipe_among_swept_schedules_takes_one_stage_per_gpu_as_pipeline_all_does(tmp_path, capsys) -> None:
    """`aptmoe-sim --pipeline all --num_stages 4` on two GPUs gives GPipe one stage per GPU and
    the others four; a sweep over the schedules does the same (it had refused GPipe's points)."""
    line = shlex.split(BASE) + ["--gpus", "2", "--grid", "gini=0.3", "--jobs", "1", "-q", "--no-plot"]
    out = tmp_path / "st"
    assert main(["sweep", "--grid", "pipeline=GPipe,Mobius", *line, "--out", str(out)]) == 0, capsys.readouterr().err
    rows = {r["pipeline"]: r for r in rows_of(out / "sweep.csv")}
    assert not any(r.get("error") for r in rows.values()), rows
    assert (rows["GPipe"]["num_stages"], rows["Mobius"]["num_stages"]) == ("2", "4")
    alone = tmp_path / "alone"                  # GPipe alone: --num_stages is its own, and 4 stages on 2 GPUs is not
    assert main(["sweep", "--grid", "pipeline=GPipe", *line, "--out", str(alone)]) == 0
    assert "one stage per GPU" in rows_of(alone / "sweep.csv")[0]["error"]
