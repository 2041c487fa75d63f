"""python -m aptmoe.sim.host_calls: the issuing thread's time per block call, by schedule."""

from __future__ import annotations

import pytest

from aptmoe.sim import host_calls
from aptmoe.trace import Trace, block_kind, is_block_call


def _run(folder, name: str, fe_host_us: list[float]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    t = Trace("real", meta={"pipeline": name})
    for i, us in enumerate(fe_host_us):
        t.add(f"0F{i}@1:e{i}", 0, "compute", i * 1e-3, i * 1e-3 + 5e-4, "forward", host_us=us)
    t.add("0B0@1:a", 0, "compute", 0.1, 0.102, "backward", host_us=900.0)
    t.add("0F0", 0, "compute", 0.0, 0.2, "forward")                 # a stage's span: no block, no host time
    t.add("0F0@1:e0", 0, "cpu", 0.0, 0.01, "cpu-expert")            # on the CPU: not an issued call
    t.save(folder / f"trace-{name}.json")


def test_medians_per_pass_and_kind_for_each_schedule_of_a_matrix(tmp_path, capsys) -> None:
    _run(tmp_path / "m" / "cells" / "S8-cap" / "real", "APTMoE", [400, 420, 380])
    _run(tmp_path / "m" / "cells" / "S8-cap" / "real", "Mobius", [200, 180, 190])
    (tmp_path / "m" / "cells" / "S8-cap" / "real" / "trace-APTMoE-predicted.json").write_text("{}")   # not measured
    assert host_calls.main([str(tmp_path / "m")]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[1]: line.split() for line in out.splitlines() if line.startswith("S8-cap")}
    assert set(rows) == {"APTMoE", "Mobius"}
    header = next(line.split() for line in out.splitlines() if line.startswith("run"))
    assert header[2:] == ["fe", "ba"]
    assert rows["APTMoE"][2:5] == ["400", "/", "500"] and rows["Mobius"][2:5] == ["190", "/", "500"]
    assert rows["APTMoE"][5:8] == ["900", "/", "2000"]


def test_block_kind_reads_the_call_and_refuses_spans() -> None:
    assert block_kind("0F3@2:e15") == "e"
    assert block_kind("1B0@0:a") == "a"
    assert block_kind("0F3") is None


def test_a_folder_without_traces_is_one_line_and_exit_2(tmp_path, capsys) -> None:
    assert host_calls.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no measured trace" in err
    assert host_calls.main([str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nope: no such folder" in err
    (tmp_path / "trace-GPipe.json").write_text('{"traceEvents": [')          # cut short
    assert host_calls.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "trace-GPipe.json" in err


def test_calls_split_by_the_loads_that_landed_while_they_were_issued(tmp_path, capsys) -> None:
    t = Trace("real", meta={"pipeline": "APTMoE"})
    # three expert forwards of 1 ms each at t = 0, 2, 4 ms; loads land at 0.5 ms (inside the
    # first), at 4.2 and 4.4 ms (inside the third), and at 3 ms (inside none); another
    # rank's landing inside the second counts for nothing here
    for i, us in enumerate([800.0, 300.0, 1200.0]):
        t.add(f"0F0@1:e{i}", 0, "compute", i * 2e-3, i * 2e-3 + 1e-3, "forward", host_us=us)
    for end in (0.5e-3, 3e-3, 4.2e-3, 4.4e-3):
        t.add("0LF@1:e0", 0, "load", end - 1e-3, end, "load-inter-expert")
    t.add("1LF@1:e0", 1, "load", 1.5e-3, 2.1e-3, "load-inter-expert")
    assert host_calls.by_landings(t) == {"0": (1, 300.0), "1": (1, 800.0), "2+": (1, 1200.0)}
    t.save(tmp_path / "trace-APTMoE.json")
    assert host_calls.main([str(tmp_path), "--landings", "fe"]) == 0
    out = capsys.readouterr().out
    assert "of fe by the loads that landed" in out
    assert out.splitlines()[-1].split()[2:] == ["300", "(1)", "800", "(1)", "1200", "(1)"]


def test_calls_split_by_the_cpu_experts_computing_while_they_were_issued(tmp_path, capsys) -> None:
    t = Trace("real", meta={"pipeline": "APTMoE"})
    # four expert forwards of rank 0, 1 ms each at t = 0, 2, 4, 6 ms; rank 0's CPU expert
    # computes across the second and the fourth, rank 1's across the third and the fourth;
    # rank 0's Adam (an update) across the first counts for nothing
    for i, us in enumerate([200.0, 400.0, 300.0, 500.0]):
        t.add(f"0F0@1:e{i}", 0, "compute", i * 2e-3, i * 2e-3 + 1e-3, "forward", host_us=us)
    t.add("0F0@1:e5", 0, "cpu", 2.1e-3, 2.3e-3, "cpu-expert")
    t.add("0B0@1:e5", 0, "cpu", 6.0e-3, 6.9e-3, "recompute")
    t.add("0F0@5:e1", 1, "cpu", 3.9e-3, 7.0e-3, "cpu-expert")
    t.add("0U0@1:e0", 0, "cpu", 0.0, 1e-3, "update")
    assert host_calls.by_cpu_experts(t) == {"none": (1, 200.0), "own": (1, 400.0), "other": (1, 300.0),
                                            "both": (1, 500.0)}
    t.save(tmp_path / "trace-APTMoE.json")
    assert host_calls.main([str(tmp_path), "--beside", "fe"]) == 0
    out = capsys.readouterr().out
    assert "of fe by the CPU experts computing while it was issued" in out
    assert out.splitlines()[-1].split()[2:] == ["200", "(1)", "400", "(1)", "300", "(1)", "500", "(1)"]


def test_calls_split_by_the_innermost_loading_phase_in_flight_while_they_were_issued(tmp_path, capsys) -> None:
    t = Trace("real", meta={"pipeline": "APTMoE"})
    # five expert forwards of rank 0, 1 ms each at t = 0, 2, 4, 6, 8 ms (host time 0.5 ms, so a
    # call is issued over its first half): none in flight; an inter-stage copy; inter-stage and
    # inter-expert at once (the innermost counts); an inter-layer copy that ends as the fourth
    # begins (not in flight) beside a whole-stage one; an inter-layer copy. Rank 1's copy across
    # the first and an offload across the second count for nothing.
    for i, us in enumerate([100.0, 200.0, 400.0, 150.0, 300.0]):
        t.add(f"0F0@1:e{i}", 0, "compute", i * 2e-3, i * 2e-3 + 1e-3, "forward", host_us=us)
    t.add("1LF@1:e0", 1, "load", 0.0, 1e-3, "load-inter-expert")
    t.add("0O0@1:e0", 0, "offload", 2.0e-3, 3e-3, "offload")
    t.add("0LF@1:a", 0, "load", 1.9e-3, 4.3e-3, "load-inter-stage")
    t.add("0LF@1:e2", 0, "load", 4.1e-3, 4.2e-3, "load-inter-expert")
    t.add("0LF@1:e3", 0, "load", 5.0e-3, 6.0e-3, "load-inter-layer")
    t.add("0LF@1:e4", 0, "load", 5.0e-3, 6.1e-3, "load-stage")
    t.add("0LF@1:e5", 0, "load", 8.2e-3, 9.0e-3, "load-inter-layer")
    assert host_calls.by_loading(t) == {"none": (1, 100.0), "stage": (1, 150.0), "inter-stage": (1, 200.0),
                                        "inter-layer": (1, 300.0), "inter-expert": (1, 400.0)}
    t.save(tmp_path / "trace-APTMoE.json")
    assert host_calls.main([str(tmp_path), "--loading", "fe"]) == 0
    out = capsys.readouterr().out
    assert "of fe by the loading phase of the copies in flight" in out
    assert out.splitlines()[-1].split()[2:] == ["100", "(1)", "150", "(1)", "200", "(1)", "300", "(1)", "400", "(1)"]


def test_calls_split_by_their_layers_cpu_experts_and_another_ranks(tmp_path, capsys) -> None:
    t = Trace("real", meta={"pipeline": "APTMoE"})
    # rank 0's forward of stage 1 in 6 steps: layer 0 ran expert 7 on the CPU (a job layer),
    # layer 1 did not; rank 1's CPU expert computes across every third of rank 0's layer-1
    # calls. The backward's CPU expert makes its own layer a job layer, not the forward's;
    # an Adam chunk (an update) on rank 1 is no expert.
    for s in range(6):
        at = s * 1e-2
        t.add(f"{s}F0@1:e0", 0, "compute", at, at + 4e-4, "forward", host_us=300.0, layer=0)
        t.add(f"{s}F0@1:e7", 0, "cpu", at + 1e-3, at + 3e-3, "cpu-expert", layer=0)
        b, busy = at + 5e-3, s % 3 == 0
        t.add(f"{s}F0@1:e1", 0, "compute", b, b + 4e-4, "forward", host_us=180.0 if busy else 150.0, layer=1)
        if busy:
            t.add(f"{s}F0@5:e2", 1, "cpu", b - 1e-4, b + 1e-3, "cpu-expert", layer=9)
        else:
            t.add(f"{s}U@5:e2", 1, "cpu", b - 1e-4, b + 1e-3, "update", layer=9)
        t.add(f"{s}B0@1:e1", 0, "cpu", at + 8e-3, at + 9e-3, "cpu-expert", layer=1)
    assert host_calls.by_jobs(t) == {"alone": (4, 150.0), "other": (2, 180.0), "job": (6, 300.0)}
    t.save(tmp_path / "trace-APTMoE.json")
    assert host_calls.main([str(tmp_path), "--jobs", "fe"]) == 0
    out = capsys.readouterr().out
    assert "of fe by the CPU experts of its layer" in out
    assert out.splitlines()[-1].split()[2:] == ["150", "(4)", "180", "(2)", "300", "(6)"]


def test_a_job_layer_is_one_in_its_own_step_only(tmp_path) -> None:
    t = Trace("real", meta={"pipeline": "APTMoE"})
    # rank 0's forward of stage 0 micro-batch 0 runs under one name in each of three steps; its
    # layer 0 sends expert 7 to the CPU in steps 0 and 2, not in step 1, where its call is as
    # fast as layer 1's
    for s in range(3):
        at = s * 1e-1
        t.add("0F0", 0, "compute", at, at + 2e-2, "forward")
        t.add("0F0@0:e0", 0, "compute", at + 1e-3, at + 2e-3, "forward", host_us=100.0 if s == 1 else 300.0, layer=0)
        t.add("0F0@1:e0", 0, "compute", at + 5e-3, at + 6e-3, "forward", host_us=110.0, layer=1)
        if s != 1:
            t.add("0F0@0:e7", 0, "cpu", at + 1.5e-3, at + 4e-3, "cpu-expert", layer=0)
    assert host_calls.by_jobs(t) == {"alone": (4, 110.0), "job": (2, 300.0)}


def test_gaps_inside_an_action_by_where_they_fall(tmp_path, capsys) -> None:
    t = Trace("real", meta={"pipeline": "APTMoE"})
    ms = 1e-3
    t.add("0F0", 0, "compute", 0.0, 10 * ms, "forward")                         # the action
    for name, a, b in (("0F0@1:a", 1, 2), ("0F0@1:g", 2.5, 3), ("0F0@1:e0", 3.5, 4), ("0F0@2:a", 5, 6)):
        t.add(name, 0, "compute", a * ms, b * ms, "forward", host_us=100.0, layer=int(name[4]))
    t.add("0F1@1:a", 0, "compute", 20 * ms, 21 * ms, "forward", host_us=100.0, layer=1)   # another action's
    t.add("0B0", 0, "compute", 30 * ms, 40 * ms, "backward")
    t.add("0B0@1:e0", 0, "compute", 31 * ms, 32 * ms, "recompute", host_us=100.0, layer=1)
    t.add("0B0@1:e0", 0, "compute", 34 * ms, 35 * ms, "backward", host_us=100.0, layer=1)
    got = {k: (n, round(med), round(mean)) for k, (n, med, mean) in host_calls.gaps(t, "f").items()}
    assert got == {"start": (1, 1000, 1000), "fa>fg": (1, 500, 500), "fg>fe": (1, 500, 500),
                   "fe>fa+": (1, 1000, 1000), "end": (1, 4000, 4000)}
    got = {k: (n, round(med)) for k, (n, med, _) in host_calls.gaps(t, "b").items()}
    assert got == {"start": (1, 1000), "re>be": (1, 2000), "end": (1, 5000)}
    (tmp_path / "real").mkdir()
    t.save(tmp_path / "real" / "trace-APTMoE.json")
    t.save(tmp_path / "trace-APTMoE-predicted.json")
    assert host_calls.main([str(tmp_path / "real"), "--gaps", "f", "--predicted"]) == 0
    out = capsys.readouterr().out
    assert "outside its block calls" in out
    rows = [line.split() for line in out.split("outside its block calls")[1].splitlines()
            if line.startswith(tmp_path.name)]                # a run in real/ goes by its cell's name
    assert [r[1:3] for r in rows] == [["APTMoE", "1000"], ["APTMoE", "(predicted)"]]
    assert host_calls.main([str(tmp_path), "--gaps", "f", "--predicted"]) == 0    # the cell's folder: the same
    assert capsys.readouterr().out == out
    # a run without backward actions (forward only) has no backward gaps, and says so in a row of dashes
    fwd = Trace("real", meta={"pipeline": "APTMoE"})
    fwd.events = [e for e in t.events if e.cat == "forward"]
    assert host_calls.gaps(fwd, "b") == {}
    (tmp_path / "fwd").mkdir()
    fwd.save(tmp_path / "fwd" / "trace-APTMoE.json")
    assert host_calls.main([str(tmp_path / "fwd"), "--gaps", "b"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].split()[1:] == ["APTMoE", "-", "-"]


def test_budget_splits_each_ranks_step_into_calls_gaps_and_the_rest(tmp_path, capsys) -> None:
    t = Trace("real", meta={"pipeline": "Mobius"})
    ms = 1e-3
    for step in range(2):                                   # two steps of 20 ms on rank 0
        t0 = step * 20 * ms
        t.add("0F0", 0, "compute", t0, t0 + 10 * ms, "forward")
        t.add("0F0@1:a", 0, "compute", t0 + 1 * ms, t0 + 4 * ms, "forward", host_us=100.0, layer=1)
        t.add("0F0@1:e0", 0, "compute", t0 + 5 * ms, t0 + 7 * ms, "forward", host_us=100.0, layer=1)
        t.add("0U", 0, "compute", t0 + 12 * ms, t0 + 20 * ms, "update")       # outside every action
    t.add("0LF@1:e0", 0, "load", -2 * ms, 0.0, "load-stage")                  # the span starts here
    got = host_calls.budget(t)
    assert list(got) == [0]
    assert [round(x, 6) for x in got[0]] == [5.0, 5.0, 11.0]                 # ms a step: 5 calls, 5 gaps, 11 rest
    t.save(tmp_path / "trace-Mobius.json")
    assert host_calls.main([str(tmp_path), "--budget"]) == 0
    row = capsys.readouterr().out.split("compute stream")[1].splitlines()[-1].split()
    assert row[1:] == ["Mobius", "0", "5.0", "5.0", "11.0", "21.0"]


def test_cpu_jobs_by_pass_and_phase_and_the_wait_to_the_next_call(tmp_path, capsys) -> None:
    t = Trace("real", meta={"pipeline": "APTMoE"})
    phases = {"queue_us": 10.0, "ready_us": 20.0, "down_us": 30.0, "compute_us": 400.0, "up_us": 40.0}
    # two forward jobs of 500 us (the next call 100 and 300 us after), one recompute job and
    # one backward job in a backward action; a job with no call after it has no 'next'
    for i, at in enumerate((0.0, 0.01)):
        t.add(f"{i}F0@0:cpu", 0, "cpu-jobs", at, at + 5e-4, "cpu-job", layer=0, of="cpu-expert", **phases)
        t.add(f"{i}F0@1:a", 0, "compute", at + 5e-4 + (1e-4 if i == 0 else 3e-4), at + 8e-3, "forward",
              host_us=50.0, layer=1)
    t.add("0B0@0:cpu", 0, "cpu-jobs", 0.02, 0.0202, "cpu-job", layer=0, of="recompute",
          **{**phases, "compute_us": 100.0})
    t.add("0B0@0:cpu", 0, "cpu-jobs", 0.03, 0.0305, "cpu-job", layer=0, of="cpu-expert", **phases)
    got = host_calls.cpu_jobs(t)
    assert set(got) == {"f", "r", "b"}
    assert got["f"]["compute"] == (2, 400.0) and got["f"]["next"] == (2, 200.0)
    assert got["f"]["total"][1] == pytest.approx(500.0)
    assert got["r"]["compute"] == (1, 100.0) and "next" not in got["b"]
    t.save(tmp_path / "trace-APTMoE.json")
    assert host_calls.main([str(tmp_path), "--cpu-jobs"]) == 0
    out = capsys.readouterr().out.splitlines()
    f_row = next(line.split() for line in out if line.split()[2:3] == ["f"])
    assert f_row[3:] == ["2", "10", "20", "30", "400", "40", "500", "200"]


def test_own_work_prints_each_conditions_ratio_and_calls(tmp_path, capsys) -> None:
    from aptmoe.own_work import MIN_ALONE

    t = Trace("real", meta={"pipeline": "Mobius"})
    for i in range(MIN_ALONE + 4):                    # expert recomputes, 2 ms apart; the last four beside Adam
        a = i * 2e-3
        us = 100.0 if i < MIN_ALONE else 250.0
        t.add(f"0B0@1:e{i % 8}", 0, "compute", a, a + 1e-3, "recompute", host_us=us)
        if i >= MIN_ALONE:
            t.add("0U@1:e0", 0, "cpu", a, a + us * 1e-6, "update")
    t.save(tmp_path / "trace-Mobius.json")
    assert host_calls.main([str(tmp_path), "--own-work"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.split()[:2] == [tmp_path.name, "Mobius"]
               and "(" in line)
    assert row.split()[2:] == ["2.50", "2.50", "(4)", "-", "-"]


def test_the_simulators_calls_carry_their_host_time_and_read_as_the_model_has_them() -> None:
    """A predicted block call carries the host time the model gave it (`host_us`, as the
    executor's do), so the same readers compare them: alone, a call takes its kind's host
    cost; beside the rank's Adam and nothing else, that times the profile's `adam_factor`."""
    import shlex
    import statistics

    from aptmoe.flags import add_cluster_flags, add_seed_flags, config_from_args, make_parser
    from aptmoe.own_work import own_work_factors
    from aptmoe.profile import cost_for, load_profile
    from aptmoe.sim.simulate import simulate

    prof = load_profile("h200-2gpu")
    p = make_parser("t", "")
    add_seed_flags(p)
    add_cluster_flags(p)
    line = ("--is_moe=True --model_config=S --num_layers 8 --num_stages 4 --num_experts 8 --gini 0.3 "
            "--batch_size 32 --num_chunks 4 --seq_length 128 --gpus 2 --topo C1+G2 --num_training_steps 2 "
            "--num_warmup_steps 0 --pipeline Mobius")
    cfg = config_from_args(p.parse_args(shlex.split(line)), **prof.cluster_defaults())
    cost = cost_for(cfg, prof)
    trace = Trace("sim")
    simulate(cfg, cost, trace=trace)
    calls = [e for e in trace.events if is_block_call(e)]
    assert calls and all(e.args["host_us"] > 0 for e in calls if e.args.get("tokens", 1) > 0)
    f = own_work_factors(trace)
    assert f["adam"].median == pytest.approx(prof.issue_tolls.adam_factor, rel=1e-3)
    alone = [e for e in calls if e.name.endswith(":a") and e.cat == "forward"]
    assert statistics.median(e.args["host_us"] for e in alone) == pytest.approx(
        cost.host_s("a", "fwd") * 1e6, abs=0.1)


def test_first_use_prints_the_first_call_after_a_load_against_the_later_ones(tmp_path, capsys) -> None:
    t = Trace("real", meta={"pipeline": "Mobius"})
    t.add("0LF@1:e0", 0, "load", 0.0, 1e-3, "load-stage", layer=1)
    for i, us in enumerate([400.0, 100.0, 120.0, 110.0]):
        t.add(f"0F{i}@1:e0", 0, "compute", (2 + 3 * i) * 1e-3, (3 + 3 * i) * 1e-3, "forward", host_us=us, layer=1)
    t.save(tmp_path / "trace-Mobius.json")
    assert host_calls.main([str(tmp_path), "--first-use"]) == 0
    out = capsys.readouterr().out
    assert "first call after a block's load" in out
    row = out.splitlines()[-1]
    assert row.split()[:2] == [tmp_path.name, "Mobius"] and row.split()[2:] == ["400", "/", "110", "(1)"]


def _expert_calls(trace: Trace, calls: list[tuple[str, str, int, float]], ran: dict | None = None) -> None:
    """`ran`: {name: share of the host time run} for measured calls that carry their thread's
    CPU time, their host time the call's."""
    t = 0.0
    for name, cat, tokens, took in calls:
        host = {"host_us": 50.0}
        if ran is not None:
            host = {"host_us": took * 1e6, "run_us": ran.get(name, 1.0) * took * 1e6}
        trace.add(name, 0, "compute", t, t + took, cat, tokens=tokens, **host)
        t += took


def test_stalls_are_calls_far_over_their_prediction_and_name_the_first_of_a_shape(tmp_path, capsys) -> None:
    """A call 3x its prediction and 2 ms more stalled; 2.9x, or 3x but only 1 ms more, did not.
    Of the stalls, those that were the rank's first call with their token count in their
    direction (a recompute shares the forward's kernels) are counted apart, and the longest
    rank's time over the prediction is the run's."""
    run = tmp_path / "m" / "cells" / "L4-native" / "real"
    run.mkdir(parents=True)
    measured, predicted = Trace("real"), Trace("sim")
    calls = [("0F0@0:e0", "forward", 9, 1e-3), ("0F1@0:e0", "forward", 9, 1e-3),
             ("0B0@0:e0", "recompute", 9, 1e-3), ("0B0@0:e1", "backward", 9, 1e-3),
             ("0B1@0:e1", "backward", 31, 0.5e-3), ("0B1@0:e0", "backward", 9, 1e-3)]
    _expert_calls(predicted, calls)
    took = {("0F1@0:e0", "forward"): 5e-3,          # 5x, 4 ms over; not the first 9-token forward
            ("0B0@0:e0", "recompute"): 2.9e-3,      # 2.9x: no stall
            ("0B0@0:e1", "backward"): 30e-3,        # the first 9-token backward: a stall
            ("0B1@0:e1", "backward"): 1.5e-3,       # 3x, but 1 ms over: no stall
            ("0B1@0:e0", "backward"): 4e-3}         # 4x, 3 ms over; the second 9-token backward
    _expert_calls(measured, [(n, c, k, took.get((n, c), t)) for n, c, k, t in calls])
    measured.save(run / "trace-GPipe.json")
    predicted.save(run.parent / "trace-GPipe-predicted.json")
    st = host_calls.stalls(measured, predicted)
    assert (st.calls, st.first_shape, st.first_calls) == (3, 1, 3)
    assert st.excess_s == pytest.approx(4e-3 + 29e-3 + 3e-3)
    assert host_calls.main([str(tmp_path / "m"), "--predicted", "--stalls"]) == 0
    row = capsys.readouterr().out.splitlines()[-1].split()
    assert row == ["L4-native", "GPipe", "3", "1", "of", "3", "36.0", "-"]
    # with the issuing thread's CPU time (exec/thread_clock.py): the stalled calls' median
    # share of their host time run, the calls that did not stall left out
    measured = Trace("real")
    _expert_calls(measured, [(n, c, k, took.get((n, c), t)) for n, c, k, t in calls],
                  {"0F1@0:e0": 0.2, "0B0@0:e1": 0.4, "0B1@0:e0": 0.9})
    measured.save(run / "trace-GPipe.json")
    assert host_calls.stalls(measured, predicted).ran == pytest.approx(0.4)
    assert host_calls.main([str(tmp_path / "m"), "--predicted", "--stalls"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].split()[-1] == "0.40"
    with pytest.raises(SystemExit):
        host_calls.main([str(tmp_path / "m"), "--stalls"])


def test_load_stalls_are_copies_far_over_the_runs_rate_and_count_those_ending_with_a_receive(tmp_path,
                                                                                            capsys) -> None:
    """A 32 MiB load at 8 GB/s takes 4.2 ms; one 5x that and 20 ms or more stalled. Of the
    stalls, those ending within 3 ms of a receive of their own rank are counted apart (another
    rank's receive ending then counts for nothing)."""
    mib32, slot = 32 << 20, (32 << 20) / 8e9
    t = Trace("real", meta={"pipeline": "Mobius"})
    for i in range(20):                              # rank 0's loads back to back at the cap
        t.add(f"0LF@0:e{i}", 0, "load", i * slot, (i + 1) * slot, "load-stage", bytes=mib32)
    t.add("1LF@1:e0", 1, "load", 0.0, 0.300, "load-stage", bytes=mib32)     # stalled, its own recv ends with it
    t.add("1RF0", 1, "net", 0.010, 0.301, "recv")
    t.add("1LF@1:e1", 1, "load", 0.400, 0.700, "load-stage", bytes=mib32)   # stalled, rank 0's recv ends with it
    t.add("0RF1", 0, "net", 0.500, 0.700, "recv")
    t.add("1LF@1:e2", 1, "load", 0.800, 0.819, "load-stage", bytes=mib32)   # 4.5x: not stalled
    t.add("1LF@1:e3", 1, "load", 0.900, 0.9195, "load-stage", bytes=mib32)  # 4.6x and under 20 ms
    t.add("1DF", 1, "load", 0.95, 0.95, "marker")                           # a marker is no load
    st = host_calls.load_stalls(t)
    assert (st.loads, st.stalled, st.with_recv) == (24, 2, 1)
    assert st.rate_Bps == pytest.approx(8e9)
    assert st.excess_s == st.worst_rank_s == pytest.approx(0.600 - 2 * slot)      # both on rank 1
    t.save(tmp_path / "trace-Mobius.json")
    assert host_calls.main([str(tmp_path), "--load-stalls"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].split() == [tmp_path.name, "Mobius", "24", "8.0", "2", "592", "1"]
