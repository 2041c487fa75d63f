"""aptmoe.own_work and calibration/own_calls.py: the issuing thread's calls beside its rank's
own copies and Adam, read from an executor trace."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aptmoe.own_work import MIN_ALONE, _covered, calls_by_condition, own_work_factors
from aptmoe.trace import Trace

CALL_S = 3e-3        # each call's slot: 3 ms apart (the longest call is 1.5 ms)


def _trace(conditions: list[tuple[str, str, float]], rank: int = 0) -> Trace:
    """Expert recomputes (`re`) or attention forwards (`fa`), one per slot, each (kind, what runs
    beside it over its whole issue, host us); what runs beside is drawn around the call."""
    t = Trace("real")
    for i, (kind, beside, us) in enumerate(conditions):
        a = i * CALL_S
        b = a + us * 1e-6
        name, cat = (f"0B0@1:e{i % 8}", "recompute") if kind == "re" else ("0F0@1:a", "forward")
        t.add(name, rank, "compute", a, a + 0.9 * CALL_S, cat, host_us=us)
        if "copy" in beside:
            t.add("0O", rank, "offload", a - 1e-6, b + 1e-6, "offload")
        if "adam" in beside:
            t.add("0U@1:e0", rank, "cpu", a - 1e-6, b + 1e-6, "update")
        if "expert" in beside:
            t.add("0F0@1:e3", rank, "cpu", a, b, "cpu-expert")
    return t


def test_each_call_goes_to_what_ran_beside_it_and_calls_by_a_cpu_expert_are_left_out() -> None:
    t = _trace([("re", "alone", 100.0), ("re", "adam", 150.0), ("re", "copy", 120.0), ("re", "copy+adam", 400.0),
                ("re", "adam+expert", 900.0)])
    got = calls_by_condition(t)
    assert {c: [us for _, us in v] for c, v in got.items()} == {
        "alone": [100.0], "adam": [150.0], "copy": [120.0], "copy+adam": [400.0]}


def test_a_neighbour_for_part_of_a_call_only_leaves_it_out() -> None:
    t = Trace("real")
    t.add("0B0@1:e0", 0, "compute", 0.0, 1e-3, "recompute", host_us=200.0)
    t.add("0U@1:e0", 0, "cpu", 150e-6, 1e-3, "update")                 # the last quarter of its 200 us
    assert calls_by_condition(t) == {}
    t.add("0U@1:e0", 0, "cpu", 0.0, 150e-6, "update")                  # and the rest: beside Adam throughout
    assert calls_by_condition(t) == {"adam": [("re", 200.0)]}


def test_another_ranks_copies_and_adam_are_not_this_ranks() -> None:
    t = _trace([("re", "alone", 100.0)] * 3)
    t.add("1O", 1, "offload", 0.0, 1.0, "offload")
    t.add("1U@5:e0", 1, "cpu", 0.0, 1.0, "update")
    assert [c for c in calls_by_condition(t)] == ["alone"]


def test_factors_are_each_calls_time_over_its_kinds_alone_median() -> None:
    # attention forwards take 10x an expert's; beside Adam each takes 1.5x its own kind's time
    calls = [("re", "alone", 100.0)] * MIN_ALONE + [("fa", "alone", 1000.0)] * MIN_ALONE \
        + [("re", "adam", 150.0)] * 5 + [("fa", "adam", 1500.0)] * 3 + [("re", "copy+adam", 390.0)] * 4
    f = own_work_factors(_trace(calls))
    assert f["adam"].factor == pytest.approx(1.5) and (f["adam"].calls, f["adam"].kinds) == (8, 2)
    assert f["copy+adam"].factor == pytest.approx(3.9) and f["copy+adam"].calls == 4
    assert "copy" not in f


def test_a_kind_with_too_few_calls_alone_counts_for_nothing() -> None:
    calls = [("re", "alone", 100.0)] * (MIN_ALONE - 1) + [("re", "adam", 150.0)] * 5
    assert own_work_factors(_trace(calls)) == {}


def test_faster_beside_than_alone_is_noise_around_none() -> None:
    calls = [("re", "alone", 100.0)] * MIN_ALONE + [("re", "adam", 90.0)] * 5
    assert own_work_factors(_trace(calls))["adam"].factor == 1.0


def test_several_traces_pool_their_ratios_each_against_its_own_alone() -> None:
    fast = _trace([("re", "alone", 100.0)] * MIN_ALONE + [("re", "adam", 120.0)] * 3)
    slow = _trace([("re", "alone", 300.0)] * MIN_ALONE + [("re", "adam", 600.0)] * 4)
    f = own_work_factors([fast, slow])
    assert f["adam"].median == pytest.approx(2.0) and f["adam"].calls == 7     # 1.2 x3, 2.0 x4: median 2.0
    assert f["adam"].factor == pytest.approx((3 * 120 + 4 * 600) / (3 * 100 + 4 * 300))


def test_the_factor_keeps_the_time_of_a_long_tail_that_the_median_leaves_out() -> None:
    # nine calls beside Adam at 1.2x and one at 10x: the median says 1.2, the time says 2.08
    calls = [("re", "alone", 100.0)] * MIN_ALONE + [("re", "adam", 120.0)] * 9 + [("re", "adam", 1000.0)]
    f = own_work_factors(_trace(calls))["adam"]
    assert f.median == pytest.approx(1.2)
    assert f.factor == pytest.approx((9 * 120 + 1000) / (10 * 100))
    assert "2.08x (median 1.20; 10 calls of 1 kinds)" == str(f)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 1), st.floats(0, 1)), max_size=6), st.floats(0, 1), st.floats(0, 1))
def test_covered_is_a_share_and_ignores_overlaps_between_spans(spans, a, w) -> None:
    spans = [(min(s, t), max(s, t)) for s, t in spans]
    b = a + w
    got = _covered(spans, a, b)
    assert 0.0 <= got <= 1.0 + 1e-9
    assert _covered(spans + spans, a, b) == pytest.approx(got)              # twice the same spans: no more
    if b > a:
        assert _covered([(a, b)], a, b) == pytest.approx(1.0)


def test_the_calibration_takes_both_fields_or_says_what_it_lacked() -> None:
    from aptmoe.calibration.own_calls import MIN_CALLS, issue_fields
    from aptmoe.own_work import OwnWork

    # the factor (a ratio of sums), not the median
    assert issue_fields({"adam": OwnWork(1.4, MIN_CALLS, 6, 1.3), "copy+adam": OwnWork(3.1, MIN_CALLS + 5, 3, 2.9),
                         "copy": OwnWork(1.8, 100, 6, 1.7)}) == {"adam_factor": 1.4, "copy_adam_factor": 3.1}
    with pytest.raises(ValueError, match=f"needs {MIN_CALLS} calls.*adam {MIN_CALLS}, copy\\+adam none"):
        issue_fields({"adam": OwnWork(1.4, MIN_CALLS, 6, 1.4)})
    with pytest.raises(ValueError, match="copy\\+adam 3"):
        issue_fields({"adam": OwnWork(1.4, MIN_CALLS, 6, 1.4), "copy+adam": OwnWork(3.1, 3, 1, 3.1)})


@pytest.mark.parametrize("module", ["own_calls", "cpu_jobs"])
def test_the_calibrations_executor_runs_are_no_config_of_the_grid(module) -> None:
    """The figures stand for a machine, not for the matrix they are checked against: the
    calibration's own executor runs have a depth that no cell of the grid has."""
    import importlib

    from aptmoe.sim.matrix import make_matrix_parser, parse_models

    probe = importlib.import_module(f"aptmoe.calibration.{module}").PROBE
    flags = dict(zip(probe[2::2], probe[3::2]))
    grid = parse_models(make_matrix_parser().get_default("models"), 8)
    assert int(flags["--num_layers"]) not in {layers for _, layers, _, _ in grid}


def test_the_probes_command_refuses_no_runs_in_one_line(capsys) -> None:
    from aptmoe.calibration.own_calls import main

    with pytest.raises(SystemExit) as e:
        main(["--repeats", "0"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "at least 1 run" in err[-1] and not any("Traceback" in line for line in err)


def _loaded_block_trace() -> Trace:
    """Stage 0's expert 0 of layer 1 loaded twice (forward, then backward); its calls after each
    load; an attention block the rank keeps (never loaded)."""
    t = Trace("real")
    ms = 1e-3
    t.add("0LF@1:e0", 0, "load", 0.0, 1 * ms, "load-stage", layer=1)
    for i, (at, us) in enumerate([(2, 300.0), (5, 100.0), (8, 110.0)]):
        t.add(f"0F{i}@1:e0", 0, "compute", at * ms, (at + 1) * ms, "forward", host_us=us, layer=1)
        t.add(f"0F{i}@1:a", 0, "compute", (at + 1.5) * ms, (at + 2) * ms, "forward", host_us=90.0, layer=1)
    t.add("0LB@1:e0", 0, "load", 10 * ms, 11 * ms, "load-stage", layer=1)
    t.add("0B0@1:e0", 0, "compute", 12 * ms, 13 * ms, "recompute", host_us=250.0, layer=1)
    t.add("0B1@1:e0", 0, "compute", 14.0 * ms, 14.5 * ms, "recompute", host_us=10.0, layer=1)  # beside a copy:
    t.add("0LB@2:e3", 0, "load", 13.9 * ms, 15 * ms, "load-stage", layer=2)                  # not alone
    return t


def test_the_first_call_after_a_blocks_load_is_told_from_its_later_calls() -> None:
    from aptmoe.own_work import first_uses

    got = first_uses(_loaded_block_trace())
    assert got == {"fe": {"first": [300.0], "later": [100.0, 110.0]}, "re": {"first": [250.0], "later": []}}
    # a rank's resident blocks (the attention here, all of GPipe's) are not counted
    assert "fa" not in got


def test_the_probes_command_prints_the_first_use_of_loaded_blocks() -> None:
    from aptmoe.calibration.own_calls import first_use_line

    t = _loaded_block_trace()
    assert first_use_line([t, t]) == ("first call after a block's load / its later calls, alone, host us: "
                                      "fe 300 / 105 (2)")
    assert first_use_line([Trace("real")]).endswith(": none")


AB_RUNS = sorted((Path(__file__).resolve().parents[1] / "docs" / "measured" / "session35" / "ab").iterdir())


def test_the_factors_of_stored_one_gpu_runs_go_onto_a_profile(tmp_path, capsys) -> None:
    """`--from` reads stored runs, one set of factors a run: session 35's six one-GPU Mobius A/B
    runs give the 1.53x and 3.80x docs/measured/session36 cites (their medians); `--onto` puts
    them into a copy of h200-1gpu's issue_tolls, the rest of it as it was, saying where from."""
    from aptmoe.calibration.own_calls import main
    from aptmoe.profile import load_profile

    assert len(AB_RUNS) == 6
    out = tmp_path / "own.json"
    assert main(["--from", *map(str, AB_RUNS), "--onto", "h200-1gpu", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "adam_factor: median 1.53 over 6 runs" in text and "copy_adam_factor: median 3.80 over 6 runs" in text
    assert "the run's own calls (Mobius)" in text
    got, base = load_profile(str(out)), load_profile("h200-1gpu")
    assert got.issue_tolls.adam_factor == pytest.approx(1.530, abs=5e-4)
    assert got.issue_tolls.copy_adam_factor == pytest.approx(3.797, abs=5e-4)
    assert got.issue_tolls.copy_s == base.issue_tolls.copy_s and got.dispatch == base.dispatch
    assert "6 stored runs" in got.sources["issue_tolls"] and "own_calls --from" in got.made_by.command


def test_the_stored_runs_command_says_what_is_wrong_in_one_line(tmp_path, capsys) -> None:
    from aptmoe.calibration.own_calls import main

    def exit_code(argv: list[str]) -> int:
        try:
            return main(argv)
        except SystemExit as e:            # argparse's usage errors
            return e.code

    for argv, code, words in [
        (["--from", str(AB_RUNS[0]), "--repeats", "2"], 2, "give one of them"),
        (["--from", str(AB_RUNS[0]), "--onto", "h200-1gpu"], 2, "go together"),
        (["--from", str(tmp_path)], 1, "no trace of Mobius or GPipeOffload"),
        (["--from", str(AB_RUNS[0]), "--onto", "a800-paper", "--out", str(tmp_path / "x.json")], 2,
         "no issue_tolls section"),
    ]:
        assert exit_code(argv) == code, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert words in err[-1] and not any("Traceback" in line for line in err), (argv, err)
    assert not (tmp_path / "x.json").exists()
