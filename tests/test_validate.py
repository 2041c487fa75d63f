"""`aptmoe-sim validate`: the executor run, the prediction of the config it ran, and the
comparison (issue 6, §1)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from aptmoe.sim.cli import main as sim_main
from aptmoe.sim.validate import action_errors, executor_argv
from aptmoe.stored import read_json
from aptmoe.trace import Trace


def test_actions_are_matched_by_rank_stream_name_and_occurrence() -> None:
    pred, real = Trace("sim"), Trace("real")
    for step in range(2):                      # the same action once per step
        t = step * 10.0
        pred.add("0F0@1:a", 0, "compute", t, t + 2.0, "forward")
        real.add("0F0@1:a", 0, "compute", t, t + 1.0 + step, "forward")   # 1 s, then 2 s
        pred.add("0LF@1:e2", 0, "load", t, t + 3.0, "load-stage")
        real.add("0LF@1:e2", 1, "load", t, t + 3.0, "load-stage")        # another rank: no match
    pred.add("0F0", 0, "load", 0, 0, "marker")
    real.add("0F0", 0, "load", 0, 0, "marker")                          # markers are not compared
    pred.add("0SF0", 0, "net", 2.0, 2.5, "send")
    real.add("0SF0", 0, "net", 2.0, 2.0001, "send")                     # the run times only its enqueue
    # one expert of one slot on the GPU in the prediction and on the CPU in the run: two actions
    pred.add("0F0@1:e3", 0, "compute", 20.0, 20.1, "forward")
    real.add("0F0@1:e3", 0, "cpu", 20.0, 25.0, "cpu-expert")
    summary, rows = action_errors(pred, real)
    assert set(summary) == {"forward"}
    f = summary["forward"]
    assert f["actions"] == 2 and f["predicted_s"] == 4.0 and f["measured_s"] == 3.0
    assert f["median_error"] == pytest.approx((1.0 + 0.0) / 2)          # +100% then 0%
    assert [r["occurrence"] for r in rows] == [0, 1] and {r["stream"] for r in rows} == {"compute"}


def _jobs_trace(jobs) -> Trace:
    """Two steps of one rank's 0F0 and 0B0 (forward at 0 and 10 s, backward at 5 and 15 s),
    with CPU expert jobs (name, category, start s)."""
    t = Trace("x")
    for step in (0, 1):
        t.add("0F0", 0, "compute", 10.0 * step, 10.0 * step + 4, "forward")
        t.add("0B0", 0, "compute", 10.0 * step + 5, 10.0 * step + 9, "backward")
    for name, cat, start in jobs:
        t.add(name, 0, "cpu", start, start + 0.5, cat)
    t.add("0U@0:a", 0, "cpu", 9.5, 9.9, "update")                       # Adam: not an expert job
    return t


def test_cpu_jobs_alike_counts_the_jobs_both_made_by_rank_job_step_and_category() -> None:
    from aptmoe.cpu_jobs_alike import cpu_jobs_alike

    real = _jobs_trace([("0F0@0:e1", "cpu-expert", 1.0), ("0F0@0:e1", "cpu-expert", 11.0),
                        ("0B0@0:e1", "cpu-expert", 6.0), ("0B0@0:e1", "recompute", 5.5)])
    pred = _jobs_trace([("0F0@0:e1", "cpu-expert", 1.2),                   # step 0: shared
                        ("0F0@0:e2", "cpu-expert", 11.0),                  # step 1: another expert
                        ("0B0@0:e1", "cpu-expert", 16.0)])                 # the backward's, a step later
    got = cpu_jobs_alike(real, pred)
    assert (got.measured, got.predicted, got.shared) == (4, 3, 1)
    assert got.alike == pytest.approx(1 / 6)
    assert cpu_jobs_alike(real, real).alike == 1.0
    assert cpu_jobs_alike(Trace("a"), Trace("b")).alike is None


def test_our_flags_are_not_passed_to_the_executor() -> None:
    argv = ["--calibration", "h200", "--gini=0.3", "--out=x", "-q", "--pipeline", "all", "--out", "y",
            "--kernel-loading", "lazy", "--kernel-loading=lazy"]
    assert executor_argv(argv) == ["--gini=0.3", "--pipeline", "all"]


@pytest.mark.parametrize("asked, want", [((), "eager"), (("--kernel-loading", "lazy"), "lazy")])
def test_validate_loads_kernels_eagerly_unless_asked(tmp_path, monkeypatch, asked, want) -> None:
    """The simulator predicts steps without one-off kernel loads, so validate asks aptmoe-run
    for eager loading, once, whatever its own command line says."""
    import aptmoe.sim.validate as v

    seen = []

    def launch(args, out, ok=(0,)):
        seen.append(args)
        raise RuntimeError("stop")
    monkeypatch.setattr(v, "launch_executor", launch)
    with pytest.raises(RuntimeError, match="stop"):
        sim_main(["validate", "--calibration", "a800-paper", "--device", "cpu", *asked, "--out", str(tmp_path / "v")])
    args = seen[0]
    assert args.count("--kernel-loading") == 1 and args[args.index("--kernel-loading") + 1] == want


def test_validate_runs_the_executor_and_compares(tmp_path) -> None:
    pytest.importorskip("torch")
    out = tmp_path / "val"
    code = sim_main(["validate", "--calibration", "a800-paper", "--is_moe=True", "--model_config=S",
                     "--embedding_dim", "32", "--hidden_dim", "64", "--num_heads", "4", "--num_layers", "4",
                     "--num_stages", "4", "--num_experts", "4", "--batch_size", "4", "--num_chunks", "2",
                     "--seq_length", "8", "--topo", "C1+G1", "--num_warmup_steps", "0", "--num_training_steps", "2",
                     "--device", "cpu", "--gpus", "2", "--pipeline", "Mobius", "--out", str(out), "-q"])
    assert code == 0
    doc = json.loads((out / "validation.json").read_text())
    row = doc["schedules"][0]
    assert row["pipeline"] == "Mobius" and row["steps"] == 2
    assert row["measured_s"] > 0 and row["predicted_s"] > 0
    # a800-paper has no receive figure, and these two ranks receive: named, per run and in the folder
    assert any(f.startswith("recv wait: not measured") for f in row["fallbacks"])
    assert (out / "fallbacks.txt").read_text().splitlines() == row["fallbacks"]
    assert row["actions"]["forward"]["actions"] > 0 and "load-stage" in row["actions"]
    # the run's stalls against its prediction (aptmoe/stalls.py), a step's worth
    from aptmoe.stalls import stalls
    from aptmoe.trace import run_trace

    st = stalls(Trace.load(run_trace(out / "real", "Mobius")), Trace.load(out / "trace-Mobius-predicted.json"))
    assert row["stalls"] == st.calls and row["stall_s_per_step"] == pytest.approx(st.excess_s / 2)
    assert (out / "overlay-Mobius.png").stat().st_size > 0
    assert (out / "actions-Mobius.csv").read_text().startswith("rank,stream,action,occurrence")
    with open(out / "actions-Mobius.csv") as f:
        rows = list(csv.DictReader(f))
    blocks = [r for r in rows if r["stream"] == "compute" and ":" in r["action"]]
    assert blocks and all(float(r["measured_host_s"]) > 0 for r in blocks)        # each block's call, timed
    assert all(r["measured_host_s"] == "" for r in rows if r["stream"] == "load")
    assert (out / "real" / "results.json").exists()
    # the ranks timed the host's reference loop around their steps; a800-paper's probe did not
    loops = json.loads((out / "real" / "results.json").read_text())["schedules"]["Mobius"]["host_loop_s"]
    assert len(loops["before"]) == len(loops["after"]) == 2 and min(loops["before"] + loops["after"]) > 0
    assert "host_speed" not in row
    # and the host memory stream on each rank's CPU worker; a800-paper measured no stream
    stream = json.loads((out / "real" / "results.json").read_text())["schedules"]["Mobius"]["host_stream_GBps"]
    assert stream["threads"] >= 1 and len(stream["before"]) == len(stream["after"]) == 2
    assert min(stream["before"] + stream["after"]) > 0
    assert "memory_speed" not in row
    # the executor planned with the profile the prediction uses, and kept a copy of it
    assert json.loads((out / "real" / "results.json").read_text())["planned_with"] == "a800-paper"
    assert (out / "real" / "plan-profile.json").exists() and doc["planned_with"] == "a800-paper"


def test_memory_speed_is_the_profiles_stream_over_the_runs_at_the_nearest_thread_count() -> None:
    import dataclasses

    from aptmoe.profile import HostMemory, load_profile
    from aptmoe.sim.validate import memory_speed

    profile = dataclasses.replace(load_profile("a800-paper"),
                                  host_memory=HostMemory({8: 100.0, 16: 120.0}, {8: 60.0, 16: 80.0}))
    run = {"host_stream_GBps": {"threads": 14, "before": [30.0, 50.0], "after": [40.0, 40.0]}}
    assert memory_speed(run, profile) == pytest.approx(2.0)           # 16 threads is nearest: 80 / 40
    assert memory_speed({**run, "host_stream_GBps": {**run["host_stream_GBps"], "threads": 9}},
                        profile) == pytest.approx(1.5)
    assert memory_speed({}, profile) is None                          # a run from before the probe
    assert memory_speed(run, dataclasses.replace(profile, host_memory=None)) is None


def test_a_run_is_predicted_again_at_its_own_host_speed(tmp_path) -> None:
    """With the probe's loop equal to the run's, the second prediction is the first; with the
    probe's host twice as fast, every block call's host cost doubles and so does nothing else."""
    import dataclasses

    from aptmoe.host import run_loop_s
    from aptmoe.profile import Dispatch, load_profile
    from aptmoe.sim.validate import compare_run

    pytest.importorskip("torch")
    real = tmp_path / "real"
    from aptmoe.run_process import launch_executor
    launch_executor(["--is_moe=True", "--model_config=S", "--embedding_dim", "32", "--hidden_dim", "64",
                     "--num_heads", "4", "--num_layers", "2", "--num_experts", "4",
                     "--batch_size", "4", "--num_chunks", "2", "--seq_length", "8", "--topo", "C1+G1",
                     "--num_warmup_steps", "0", "--num_training_steps", "1", "--device", "cpu", "--gpus", "1",
                     "--pipeline", "GPipe", "--no-plot", "-q"], real)
    loop = run_loop_s(json.loads((real / "results.json").read_text())["schedules"]["GPipe"]["host_loop_s"])
    calls = Dispatch("cpu", {k: {"fwd": 2e-3, "bwd": 4e-3} for k in ("a", "g", "e")}, {"fwd": 1e-3, "bwd": 1e-3}, 10)
    base = load_profile("a800-paper")
    rows = {}
    for name, probe_loop in (("same", loop), ("twice", loop / 2)):
        profile = dataclasses.replace(base, dispatch=dataclasses.replace(calls, loop_s=probe_loop))
        (tmp_path / name).mkdir()
        rows[name] = compare_run(real, profile, tmp_path / name, ["test"], plot=False)[0]
    same, twice = rows["same"], rows["twice"]
    assert same["host_speed"] == pytest.approx(1.0) and same["predicted_host_s"] == pytest.approx(same["predicted_s"])
    assert same["error_host"] == pytest.approx(same["error"])
    assert twice["host_speed"] == pytest.approx(2.0) and twice["predicted_s"] == pytest.approx(same["predicted_s"])
    assert twice["predicted_host_s"] > 1.1 * twice["predicted_s"]        # CPU ranks: the calls are the step


def test_a_run_is_predicted_with_the_decisions_of_the_profile_it_planned_with(tmp_path) -> None:
    """The executor keeps the profile its policy planned with; a run from before it did is
    taken to have planned with aptmoe-run's default of its device."""
    from aptmoe.sim.validate import planning_profile

    real = tmp_path / "real"
    real.mkdir()
    gpu = {"command": ["aptmoe-run"], "schedules": {"Mobius": {"device": "NVIDIA H200"}}}
    assert planning_profile(real, gpu).name == "h200"
    assert planning_profile(real, {**gpu, "schedules": {"Mobius": {"device": "cpu"}}}).name == "a800-paper"
    assert planning_profile(real, {**gpu, "command": ["aptmoe-run", "--calibration", "h200-1gpu"]}).name == "h200-1gpu"
    from aptmoe.profile import load_profile
    load_profile("h200-1gpu").save(real / "plan-profile.json")
    assert planning_profile(real, gpu).name == "h200-1gpu"


def test_simulate_takes_its_decisions_from_plan_with_and_its_times_from_the_profile() -> None:
    """The same profile both ways is the plain prediction; APTMoE planned with another
    profile places other experts on the CPU and so predicts another step; GPipe has no
    decisions to take."""
    from aptmoe.config import RunConfig
    from aptmoe.sim.simulate import simulate

    runs = Path(__file__).resolve().parents[1] / "docs/validation-h200-v8/cells/S8x8-G0.6-cap8-1gpu/real/results.json"
    sched = read_json(runs)["schedules"]             # kept as results.json.xz
    cfg = RunConfig.from_dict(sched["APTMoE"]["config"])    # MoE-S8, capped
    plain = simulate(cfg, "h200-1gpu")
    assert simulate(cfg, "h200-1gpu", plan_with="h200-1gpu").iteration_s == plain.iteration_s
    other = simulate(cfg, "h200-1gpu", plan_with="a800-paper")
    assert other.iteration_s != plain.iteration_s
    assert other.metrics["cpu/expert_share"] != plain.metrics["cpu/expert_share"]
    gpipe = RunConfig.from_dict(sched["GPipe"]["config"])
    assert simulate(gpipe, "h200-1gpu", plan_with="a800-paper").iteration_s == simulate(gpipe, "h200-1gpu").iteration_s


def test_validate_needs_a_calibration(capsys) -> None:
    assert sim_main(["validate", "--pipeline", "Mobius"]) == 2
    assert "--calibration" in capsys.readouterr().err


CPU_MODEL = ["--is_moe=True", "--model_config=S", "--embedding_dim", "64", "--hidden_dim", "128", "--num_heads", "4",
             "--num_layers", "4", "--num_stages", "4", "--num_experts", "4", "--batch_size", "8", "--num_chunks", "2",
             "--seq_length", "16", "--topo", "C1+G1", "--num_warmup_steps", "2", "--num_training_steps", "3",
             "--device", "cpu", "--gpus", "2", "--link-bandwidth", "0.05"]


def test_cpu_prediction_error_stays_where_it_was_measured(tmp_path) -> None:
    """Issue 6, §4: the gloo executor against the simulator with a profile measured on this
    machine (blocks timed on the CPU, as the CPU ranks run them).

    Measured on the 2-core development machine (docs/validation-cpu.md): Mobius's block loads
    -1.1..+0.7% in 7 runs of session 7, each with its own profile; since session 12's link (a
    fluid whose copies land when their bytes have passed at the cap, the spans of both sides
    being the bytes') +0.7..+0.9% in 3 runs. Its step was 13-30% short (19-25% in session 6's
    3 runs, 27-34% before), 9-18% short since session 12's link. The link model is what the
    capped CPU run exercises faithfully, so its bound is tight: +-4%, which leaves another
    CPU three points of jitter. The step's bound, -50% to +15%, is the measured range widened
    by about twice its spread, and fails if the executor slows down or the model starts to
    overshoot. Session 32 saw -5.5..-7.2% in four runs and +22.7% in one, whose calibration
    this shared machine had run slowly. Session 41's CI machine saw loads at +4.2% once (the
    pacer's lateness as the calibration timed it against the run's: the bound's failure mode
    without the pacer is -5.3..-5.9% every time), and this machine that day, in five runs with
    nothing beside them, loads +0.9..+2.6% and steps -3..-55% (measured 0.061-0.131 s a step,
    predicted 0.054-0.064: two ranks' blocks on two shared cores; docs/validation-cpu.md). So a
    run outside either bound is measured once more, from a new calibration, and fails if it is
    outside one again: what the bounds catch is systematic and shows twice."""
    misses = []
    for attempt in range(2):
        row = _calibrate_and_validate_on_cpu(tmp_path / f"try{attempt}")
        load = row["actions"]["load-stage"]["median_error"]
        if abs(load) <= 0.04 and -0.50 <= row["error"] <= 0.15:
            return
        misses.append(f"step {row['error']:+.1%}, loads {load:+.1%}")
    pytest.fail(f"the CPU run was outside its bounds (step -50..+15%, loads +-4%) twice: {'; '.join(misses)}")


def _calibrate_and_validate_on_cpu(folder: Path) -> dict:
    """A quick calibration of this machine's CPU blocks, then `validate` of Mobius on the gloo
    executor with it: the schedule's row of validation.json."""
    from aptmoe.calibration.cli import main as calibrate
    from aptmoe.profile import load_profile

    folder.mkdir(parents=True)
    profile = folder / "cpu.json"
    assert calibrate(["--quick", "--out", str(profile), "--blocks-on", "cpu", "--block-threads", "1",
                      "--models", "64x128", "--dtypes", "fp32", "--threads", "1", "--seq-length", "16",
                      "--heads", "4", "--gate-experts", "4", "--skip", "links", "-q"]) == 0
    # two CPU ranks on this machine's cores: gloo p2p, and a GEMM beside a waiting receive
    assert load_profile(str(profile)).recv_wait is not None
    out = folder / "val"
    assert sim_main(["validate", "--calibration", str(profile), *CPU_MODEL, "--pipeline", "Mobius",
                     "--out", str(out), "-q"]) == 0
    return json.loads((out / "validation.json").read_text())["schedules"][0]


def test_compute_blocks_are_labelled_by_the_neighbours_busy_beside_them() -> None:
    """A block's label names the rank's load, offload and cpu streams with work overlapping it
    in the measurement, and a receive posted and not yet matched (other ranks' do not count);
    stage spans and other streams get none."""
    from aptmoe.sim.validate import beside_errors

    pred, real = Trace("sim"), Trace("real")
    blocks = {"0F0@1:a": (0.0, 1.0), "0F0@1:g": (1.0, 2.0), "0F0@1:e0": (2.0, 3.0), "0F0@1:e1": (3.0, 4.0)}
    for name, (a, b) in blocks.items():
        pred.add(name, 0, "compute", a, a + 0.5, "forward")
        real.add(name, 0, "compute", a, b, "forward")
    pred.add("0F0", 0, "compute", 0.0, 2.0, "forward")
    real.add("0F0", 0, "compute", 0.0, 4.0, "forward")
    real.add("0LF@1:e0", 0, "load", 0.5, 2.5, "load-stage")     # overlaps a, g and e0
    real.add("1U", 0, "cpu", 2.9, 3.5, "update")                 # overlaps e0 and e1
    real.add("0LF@1:e1", 1, "load", 3.0, 4.0, "load-stage")     # rank 1: not a neighbour of rank 0
    real.add("x", 0, "cpu", 1.2, 1.2, "marker")                  # markers are no work
    real.add("0RF1", 0, "net", 3.5, 5.0, "recv")                 # a receive posted: overlaps e1
    real.add("0SF0", 0, "net", 1.5, 1.6, "send")                 # sends are not neighbours
    _, rows = action_errors(pred, real)
    got = {r["action"]: r["beside"] for r in rows}
    assert got == {"0F0@1:a": "load", "0F0@1:g": "load", "0F0@1:e0": "load+cpu", "0F0@1:e1": "cpu+recv", "0F0": ""}
    by = beside_errors(rows)
    assert by["load"] == {"blocks": 2, "median_error": pytest.approx(-0.5)}
    assert set(by) == {"load", "load+cpu", "cpu+recv"}


def test_the_simulator_offloads_and_updates_what_the_executor_did() -> None:
    """MoE-S8 at G 0.6 leaves one expert per layer and step without tokens: the executor
    neither offloads nor updates it (no gradient), and neither does the simulator. Over a
    stored one-GPU run's three steps both move the same bytes and run the same Adam chunks."""
    from aptmoe.config import RunConfig
    from aptmoe.sim.simulate import simulate
    from aptmoe.trace import Trace

    real = Path(__file__).resolve().parents[1] / "docs/validation-h200-v8/cells/S8x8-G0.6-cap8-1gpu/real"
    res = read_json(real / "results.json")["schedules"]["Mobius"]
    measured = Trace.load(real / "trace-Mobius.json.xz")
    predicted = Trace("sim")
    simulate(RunConfig.from_dict(res["config"]), "h200-1gpu", trace=predicted, measured_steps=len(res["step_s"]),
             plan_with="h200")

    def moved(tr: Trace) -> tuple[int, int]:
        return (sum(e.args["bytes"] for e in tr.events if e.cat == "offload"),
                sum(1 for e in tr.events if e.cat == "update"))

    assert moved(predicted) == moved(measured) == (6_040_977_408, 408)


def test_a_profile_of_another_machine_is_named_before_any_run(tmp_path, monkeypatch, capsys) -> None:
    """A run takes its cores per rank from the profile it plans with: validate and matrix say
    so, on stderr and before running, where the profile was measured on other cores (session
    13's 2-GPU grid planned for 16 cores on a 32-core host without a word)."""
    import aptmoe.sim.validate as v
    from aptmoe.profile import load_profile

    h200 = load_profile("h200-1gpu")
    monkeypatch.setattr(v, "physical_cores", lambda: h200.hardware.cpu_cores)
    assert v.other_machine(h200, "aptmoe-sim matrix") is None
    monkeypatch.setattr(v, "physical_cores", lambda: 32)
    warning = v.other_machine(h200, "aptmoe-sim matrix")
    assert warning.startswith("aptmoe-sim matrix: warning: --calibration h200-1gpu was measured on 16 cores")
    assert "this machine has 32" in warning and "\n" not in warning
    # validate prints it before it runs anything: here the executor is stopped at its start
    monkeypatch.setattr(v, "run_executor", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("stop")))
    with pytest.raises(RuntimeError, match="stop"):
        sim_main(["validate", "--calibration", "h200-1gpu", "-q", "--out", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()
    assert "warning: --calibration h200-1gpu was measured on 16 cores" in capsys.readouterr().err
