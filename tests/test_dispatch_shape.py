"""calibration/dispatch_shape.py: a profile's dispatch split into its layers' and its actions'
host work as newer probe runs split theirs, at the profile's own level."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from aptmoe.profile import Dispatch, ProfileError, load_profile
from aptmoe.trace import Trace

ROOT = Path(__file__).resolve().parents[1]
RUNS = sorted((ROOT / "docs/measured/session33/probe").glob("run-*"))
SECONDS = {"a": {"fwd": 4e-4, "bwd": 9e-4}, "e": {"fwd": 1.5e-4, "bwd": 3e-4}, "g": {"fwd": 1e-4, "bwd": 2e-4}}


def _probe_run(folder: Path, stretch: float = 1.0) -> Path:
    """A probe run of one forward over two layers: 0.05 s embedding and 0.25 s of its own before
    its first call, 0.2 s between its layers' calls, 0.1 s loss and 0.2 s of its own after."""
    tr = Trace("real")
    x = stretch
    tr.add("0F0@0:a", 0, "compute", 0.3 * x, 0.4 * x, "forward", layer=0)
    tr.add("0F0@1:a", 0, "compute", 0.6 * x, 0.7 * x, "forward", layer=1)
    tr.add("0F0", 0, "compute", 0.0, 1.0 * x, "forward", embed_us=5e4 * x, head_us=1e5 * x)
    folder.mkdir(parents=True)
    tr.save(folder / "trace-GPipe.json")
    (folder / "results.json").write_text(json.dumps({"schedules": {"GPipe": {"host_loop_s": {"before": [0.03]}}}}))
    return folder


def test_the_probes_own_stage_keeps_the_profiles_cost_and_the_rest_moves_by_shape(tmp_path) -> None:
    """The run's forward spends 0.8 s outside its calls: 2 x 0.1 between them, 0.6 at its ends.
    A profile that charges its two layers 0.8 s each is twice as slow, so every new figure is
    doubled (between 0.1 -> 0.2, the start 0.25 -> 0.5, the embedding 0.05 -> 0.1 ...), and a
    stage like the probe's, first and last at once, of two layers, costs 2 x 0.8 as before."""
    from aptmoe.calibration.dispatch_shape import read_runs, reshape

    new, layers = read_runs([_probe_run(tmp_path / "r")], "cuda")
    assert layers == 2
    profile = Dispatch("cuda", SECONDS, {"fwd": 0.8, "bwd": 1.2}, 100)
    d = reshape(profile, new, layers)
    assert d.seconds == SECONDS and d.samples == 100           # the block calls are the profile's
    assert d.between == {"fwd": pytest.approx(0.2)}
    assert d.action == {"fwd": {"start": pytest.approx(0.5), "end": pytest.approx(0.4), "first": pytest.approx(0.1),
                                "last": pytest.approx(0.2)}}
    assert 2 * d.between["fwd"] + sum(d.action["fwd"].values()) == pytest.approx(2 * profile.between["fwd"])
    with pytest.raises(ProfileError, match="apart already"):
        reshape(d, new, layers)
    with pytest.raises(ProfileError, match="share no fwd pass"):
        reshape(dataclasses.replace(profile, between={"bwd": 1.2}), new, layers)
    with pytest.raises(ProfileError, match="combine has a bwd pass the runs do not"):
        reshape(dataclasses.replace(profile, combine={"fwd": 0.1, "bwd": 0.3}), new, layers)
    assert reshape(dataclasses.replace(profile, combine={"fwd": 0.7}), new, layers).combine == \
        {"fwd": pytest.approx(0.2)}             # capped by its pass's new between


def test_the_median_of_several_runs_is_taken_before_reshaping(tmp_path) -> None:
    from aptmoe.calibration.dispatch_shape import read_runs

    new, layers = read_runs([_probe_run(tmp_path / f"r{i}", x) for i, x in enumerate((1.0, 3.0, 2.0))], "cuda")
    assert layers == 2 and new.between["fwd"] == pytest.approx(0.2) and new.action["fwd"]["start"] == pytest.approx(0.5)


def test_bad_inputs_are_one_line_and_no_file(tmp_path, capsys) -> None:
    from aptmoe.calibration.dispatch_shape import main

    run = _probe_run(tmp_path / "r")
    out = tmp_path / "out.json"
    plain = tmp_path / "plain"               # a trace from before the executor kept the ends
    plain.mkdir()
    tr = Trace.load(run / "trace-GPipe.json")
    for e in tr.events:
        e.args.pop("embed_us", None), e.args.pop("head_us", None)
    tr.save(plain / "trace-GPipe.json")
    (plain / "results.json").write_text((run / "results.json").read_text())
    for args, says in [(["a800-paper", str(run)], "no dispatch section"),
                       (["h200-1gpu", str(plain)], "no embedding or loss times"),
                       (["h200-1gpu", str(tmp_path / "missing")], "not a dispatch probe's run")]:
        assert main([*args, "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and says in err, err
        assert not out.exists()


def test_a_dispatch_of_before_split_as_the_stored_probe_runs_split_theirs_keeps_its_stage_s_cost(tmp_path) -> None:
    """A dispatch of before (session 12's probe, between fwd 699 and bwd 1809 us a layer, the
    recompute in bwd) reshaped with session 33's five probe runs of one H200
    (docs/measured/session33), as h200-1gpu held it from session 33 to 36 (since session 37 its
    dispatch is the probe runs' own, tests/test_matrix.py): the actions' own work comes out of
    the layers', and the probe's own stage costs what it did before."""
    from aptmoe.calibration.dispatch_shape import main

    shipped = load_profile("h200-1gpu")
    before = dataclasses.replace(shipped, dispatch=dataclasses.replace(
        shipped.dispatch, between={"fwd": 0.0006985997500000025, "bwd": 0.0018087088749999848}, action=None,
        combine=None))
    before.save(tmp_path / "before.json")
    assert len(RUNS) == 5
    assert main([str(tmp_path / "before.json"), *map(str, RUNS), "--out", str(tmp_path / "after.json")]) == 0
    after = load_profile(str(tmp_path / "after.json")).dispatch
    assert after.seconds == shipped.dispatch.seconds and after.action is not None
    assert after.between["fwd"] < 0.0006985997500000025 and after.between["bwd"] < 0.0018087088749999848
    # the probe's own stage (first and last, four layers) costs what it did before, pass by pass
    a, b = after.action, after.between
    assert 4 * b["fwd"] + sum(a["fwd"].values()) == pytest.approx(4 * 0.0006985997500000025)
    assert 4 * (b["rec"] + b["bwd"]) + sum(a["rec"].values()) + sum(a["bwd"].values()) == \
        pytest.approx(4 * 0.0018087088749999848)


def test_the_two_gpu_profile_is_its_dispatch_of_before_split_as_its_lease_s_probe_runs_split_theirs(tmp_path) -> None:
    """h200-2gpu's dispatch (between fwd 639 and bwd 1475 us a layer, the recompute in bwd)
    reshaped with session 34's twelve probe runs, one rank on a 2 x H200 lease
    (docs/measured/session34), is what the shipped profile holds; its message posts stay."""
    from aptmoe.calibration.dispatch_shape import main

    runs = sorted((ROOT / "docs/measured/session34").glob("probe-call[12]/run-*"))
    fwd, bwd = 0.0006389175000000172, 0.0014751642499999905
    shipped = load_profile("h200-2gpu")
    before = dataclasses.replace(shipped, dispatch=dataclasses.replace(
        shipped.dispatch, between={"fwd": fwd, "bwd": bwd}, action=None))
    before.save(tmp_path / "before.json")
    assert len(runs) == 12
    assert main([str(tmp_path / "before.json"), *map(str, runs), "--out", str(tmp_path / "after.json")]) == 0
    after = load_profile(str(tmp_path / "after.json")).dispatch
    assert after == shipped.dispatch and after.post == before.dispatch.post
    a, b = after.action, after.between
    assert 4 * b["fwd"] + sum(a["fwd"].values()) == pytest.approx(4 * fwd)
    assert 4 * (b["rec"] + b["bwd"]) + sum(a["rec"].values()) + sum(a["bwd"].values()) == pytest.approx(4 * bwd)


def test_own_level_takes_the_runs_figures_as_they_are_and_keeps_the_profile_s_posts(tmp_path, capsys) -> None:
    """--own-level: a lease's dispatch from its probe runs (block calls, between, actions at the
    runs' host's level), onto a profile whose actions are apart already; the runs, on one rank,
    posted no messages, so the profile's posts stay."""
    from aptmoe.calibration.dispatch_shape import main, read_runs

    runs = [_probe_run(tmp_path / f"r{i}", x) for i, x in enumerate((1.0, 2.0, 3.0))]
    new, _ = read_runs(runs, "cuda")
    shipped = load_profile("h200-2gpu")
    assert shipped.dispatch.action is not None and shipped.dispatch.post
    out = tmp_path / "lease.json"
    assert main(["h200-2gpu", *map(str, runs), "--own-level", "--out", str(out)]) == 0
    assert "at the runs' own level" in capsys.readouterr().out
    lease = load_profile(str(out))
    assert lease.dispatch == dataclasses.replace(new, post=shipped.dispatch.post)
    assert lease.dispatch.between == {"fwd": pytest.approx(0.2)}      # the middle run's, not rescaled
    doc = json.loads(out.read_text())
    assert "own level" in doc["sources"]["dispatch"] and "dispatch.action" not in doc["sources"]
    # everything but the dispatch is the profile's
    assert dataclasses.replace(lease, dispatch=shipped.dispatch, made_by=shipped.made_by,
                               sources=shipped.sources) == shipped
