"""`aptmoe-sim`: the seed's command line, the files it writes, and one-line errors."""

from __future__ import annotations

import csv
import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from aptmoe.sim.cli import main
from aptmoe.trace import Trace

# The seed's demo line, shrunk to 8 layers on 4 stages so that it runs in about a second.
DEMO = ("--is_moe=True --model_config=S --num_experts=16 --gini=0.3 --topo=C1+G2 --pipeline all "
        "--num_layers 8 --num_stages 4")
SCHEDULES = ("GPipe", "GPipeOffload", "Mobius", "APTMoE")
REQUIRED = ("iteration_s", "throughput_seq_per_s", "oom", "peak_gpu_bytes", "config")


def run(line: str, out: Path, capsys) -> tuple[int, str, str]:
    rc = main(shlex.split(line) + ["--out", str(out)])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "demo"
    rc = main(shlex.split(DEMO) + ["--out", str(out)])
    return rc, out


def test_demo_line_writes_results(demo_run) -> None:
    rc, out = demo_run
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert list(res["schedules"]) == list(SCHEDULES)
    assert res["calibration"] == "a800-paper"
    assert res["config"]["model"]["num_layers"] == 8
    for name in SCHEDULES:
        r = res["schedules"][name]
        for key in REQUIRED:
            assert key in r, (name, key)
        assert r["oom"] is False and r["iteration_s"] > 0 and r["throughput_seq_per_s"] > 0
        assert r["config"]["schedule"]["pipeline"] == name
    assert res["schedules"]["Mobius"]["speedup_vs_mobius"] == pytest.approx(1.0)
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["pipeline"] for r in rows] == list(SCHEDULES)
    assert {"iteration_s", "throughput_seq_per_s", "oom", "peak_gpu_bytes", "busy/compute"} <= set(rows[0])
    for name in SCHEDULES:
        assert (out / f"plan-{name}.txt").read_text().startswith(name)
    assert (out / "fallbacks.txt").exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]     # no temp folder left


def test_traces_are_chrome_json_in_microseconds(demo_run) -> None:
    _, out = demo_run
    res = json.loads((out / "results.json").read_text())
    steps = res["measured_steps"]
    for name in SCHEDULES:
        path = out / f"trace-{name}.json"
        raw = json.loads(path.read_text())
        assert raw["otherData"]["time_unit"] == "us"
        xs = [e for e in raw["traceEvents"] if e["ph"] == "X"]
        end_us = max(e["ts"] + e["dur"] for e in xs)
        # the trace spans the measured steps back to back: seconds * 1e6 = microseconds
        assert end_us == pytest.approx(steps * res["schedules"][name]["iteration_s"] * 1e6, rel=1e-3)
        tr = Trace.load(path)
        assert tr.source == "sim" and len(tr.events) == len(xs)
        assert tr.span_s() == pytest.approx(end_us / 1e6, rel=1e-3)


def test_timelines_are_small_pngs(demo_run) -> None:
    _, out = demo_run
    for name in SCHEDULES:
        png = out / f"timeline-{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert png.stat().st_size < 1_000_000


def test_prints_parameters_and_table(tmp_path, capsys) -> None:
    rc, out, err = run(DEMO.replace("--pipeline all", "--pipeline APTMoE") + " --no-plot", tmp_path / "one", capsys)
    assert rc == 0 and err == ""
    assert "Number of parameters" in out and "APTMoE" in out and "s/step" in out
    assert not list((tmp_path / "one").glob("*.png"))
    assert list(json.loads((tmp_path / "one" / "results.json").read_text())["schedules"]) == ["APTMoE"]


@pytest.mark.parametrize("pipeline, host, noted", [("Mobius", "0", True), ("Mobius", "auto", False),
                                                   ("GPipe", "0", False)])
def test_shared_host_cores_are_noted_as_unmodelled(pipeline, host, noted, tmp_path, capsys) -> None:
    """--host-cores 0 leaves the host threads no core of their own: a wait the model lacks."""
    line = DEMO.replace("--pipeline all", f"--pipeline {pipeline}") + f" --host-cores {host} --no-plot --no-trace"
    rc, out, _ = run(line, tmp_path / "h", capsys)
    assert rc == 0 and ("note: --host-cores 0" in out) == noted


def test_quiet_prints_nothing(tmp_path, capsys) -> None:
    rc, out, err = run(DEMO.replace("--pipeline all", "--pipeline Mobius") + " -q --no-plot", tmp_path / "q", capsys)
    assert (rc, out, err) == (0, "", "")


def test_default_pipeline_is_gpipe(tmp_path, capsys) -> None:
    line = DEMO.replace(" --pipeline all", "") + " -q --no-plot --measured-steps 1"
    rc, _, _ = run(line, tmp_path / "g", capsys)
    assert rc == 0
    assert list(json.loads((tmp_path / "g" / "results.json").read_text())["schedules"]) == ["GPipe"]


def test_oom_is_a_result_not_an_error(tmp_path, capsys) -> None:
    rc, out, err = run("--is_moe=True --model_config=MoE-S-64 --gini=0.1 --pipeline GPipe --no-plot --measured-steps 1",
                       tmp_path / "oom", capsys)
    assert rc == 0, err
    r = json.loads((tmp_path / "oom" / "results.json").read_text())["schedules"]["GPipe"]
    assert r["oom"] is True and r["iteration_s"] is None and r["peak_gpu_bytes"] > 40e9
    assert "out of GPU memory" in r["oom_detail"] and "OOM" in out


def test_plot_subcommand_draws_a_trace_file(demo_run, tmp_path, capsys) -> None:
    _, out = demo_run
    png = tmp_path / "t.png"
    assert main(["plot", str(out / "trace-APTMoE.json"), "--out", str(png)]) == 0
    assert png.stat().st_size > 1000 and png.stat().st_size < 1_000_000


def test_refuses_a_non_empty_out_folder(tmp_path, capsys) -> None:
    out = tmp_path / "full"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    rc, _, err = run(DEMO, out, capsys)
    assert rc == 2 and err.count("\n") == 1 and "not empty" in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_refuses_an_out_folder_it_cannot_make_before_any_work(tmp_path, capsys, monkeypatch) -> None:
    """Under a file, or where the folder system takes no new folder: one line, exit 2, nothing
    simulated and nothing left behind."""
    import tempfile

    (tmp_path / "a-file").write_text("x")
    rc, out, err = run(DEMO, tmp_path / "a-file" / "out", capsys)
    assert rc == 2 and err.count("\n") == 1 and "is a file, not a folder" in err and out == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]

    def refuse(*a, **k):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    rc, out, err = run(DEMO, tmp_path / "new" / "out", capsys)
    assert rc == 2 and err.count("\n") == 1 and "cannot make a folder in" in err and "Permission denied" in err
    assert out == "" and sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def _corrupt(tmp_path: Path) -> str:
    p = tmp_path / "corrupt.json"
    p.write_text('{"schema": "aptmoe-calibration/1", "name": ')
    return str(p)


def _incomplete(tmp_path: Path) -> str:
    p = tmp_path / "incomplete.json"
    p.write_text('{"schema": "aptmoe-calibration/1", "name": "x"}')
    return str(p)


BAD = {
    "gini above 1": (lambda tp: "--gini 2", "gini"),
    "stages do not divide layers": (lambda tp: "--num_stages 3", "num_stages 3"),
    "missing calibration": (lambda tp: "--calibration /nonexistent.json", "/nonexistent.json"),
    "corrupt calibration": (lambda tp: f"--calibration {_corrupt(tp)}", "corrupt.json"),
    "incomplete calibration": (lambda tp: f"--calibration {_incomplete(tp)}", "incomplete.json"),
    "unknown pipeline": (lambda tp: "--pipeline Foo", "Foo"),
    "unknown built-in profile": (lambda tp: "--calibration nosuch", "nosuch"),
    "not a number": (lambda tp: "--gini abc", "--gini"),
    "unknown topology": (lambda tp: "--topo C2+G8", "C2+G8"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_and_no_folder(case, tmp_path, capsys) -> None:
    extra, needle = BAD[case]
    out = tmp_path / "runs" / "bad"
    rc, stdout, err = run(f"{DEMO} {extra(tmp_path)}", out, capsys)
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("aptmoe-sim: error: "), err
    assert needle in err and "Traceback" not in err
    assert not out.exists() and not (tmp_path / "runs").exists()


def test_entry_point_exits_2_without_traceback(tmp_path) -> None:
    out = tmp_path / "bad"
    proc = subprocess.run([sys.executable, "-c", "import sys; from aptmoe.sim.cli import main; sys.exit(main())",
                           *shlex.split(DEMO), "--pipeline", "Foo", "--out", str(out)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == ["aptmoe-sim: error: --pipeline 'Foo' is unknown; use one of GPipe, "
                                        "GPipeOffload, Mobius, APTMoE"]
    assert not out.exists()


def test_plot_of_a_missing_trace_is_one_line(tmp_path, capsys) -> None:
    assert main(["plot", str(tmp_path / "none.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("aptmoe-sim: error: ")


@pytest.mark.parametrize("argv", [["validate", "--pipeline", "APTMoE"], ["matrix", "--gpus", "2"], []])
def test_without_simpy_a_command_says_so_before_it_runs_anything(argv, tmp_path, monkeypatch, capsys) -> None:
    """validate and matrix run the executor first (minutes on a GPU): without the simulator's
    one dependency they stop before it, in one line, and write nothing."""
    import importlib.util

    from aptmoe.sim import validate

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "simpy" else real(name, *a))
    monkeypatch.setattr(validate, "run_executor", lambda *a, **k: pytest.fail("the executor ran"))
    out = tmp_path / "out"
    assert main([*argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install simpy" in err and not out.exists()


# MoE-S on one H200 as h200-1gpu calibrates it: GPipe's kernels are so short that its step is
# the issuing thread's (docs/measured/session32: 16-wide layers at S8's depth take as long).
HOST_BOUND = ("--calibration h200-1gpu --is_moe=True --model_config=S --num_layers 4 --num_experts 8 --gini 0.45 "
              "--gpus 1 --topo C1+G1 --batch_size 32 --seq_length 128 --num_chunks 4 --pipeline GPipe "
              "--measured-steps 2 --no-plot --no-trace")


def _step(tmp_path, capsys, extra: str = "") -> tuple[float, dict, str]:
    out = tmp_path / f"hf{extra.replace(' ', '')}"
    rc, printed, err = run(f"{HOST_BOUND} {extra}", out, capsys)
    assert rc == 0, err
    res = json.loads((out / "results.json").read_text())
    return res["schedules"]["GPipe"]["iteration_s"], res, printed


def test_host_factor_scales_the_issuing_thread_of_a_host_bound_step(tmp_path, capsys) -> None:
    """--host-factor 2: every block call's host cost doubled; a step made of them nearly doubles
    (the kernels and the update do not). 1 is the calibration itself."""
    alone, res, printed = _step(tmp_path, capsys)
    same, _, _ = _step(tmp_path, capsys, "--host-factor 1")
    slow, res2, printed2 = _step(tmp_path, capsys, "--host-factor 2")
    assert same == alone and res["host_factor"] is None and res2["host_factor"] == 2.0
    assert 1.9 < slow / alone <= 2.0, slow / alone
    assert "--host-factor" in printed2 and "--host-factor" not in printed


@pytest.mark.parametrize("line, says", [
    ("--host-factor 2 --pipeline GPipe", "a800-paper has no host cost per block call"),     # no dispatch
    ("--calibration h200-1gpu --host-factor 0 --pipeline GPipe", "must be above 0"),
    ("--calibration h200-1gpu --host-factor fast --pipeline GPipe", "is not a number"),
])
def test_a_host_factor_it_cannot_apply_is_one_line(line, says, tmp_path, capsys) -> None:
    rc, out, err = run(line, tmp_path / "bad", capsys)
    assert rc == 2 and says in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "bad").exists()
