"""Pooling calibrations (calibration/pool.py): every figure the median of the inputs', curves
matched by what they are, one clean error where the inputs cannot be pooled."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aptmoe.calibration.pool import main as pool_main
from aptmoe.calibration.pool import pool, pool_onto, pooled
from aptmoe.profile import ProfileError, load_profile
from aptmoe.stored import stored_file


def _h200(tmp_path: Path, name: str, scale: float, *, reverse_curves: bool = False,
          drop_token: int | None = None) -> Path:
    """The one-GPU H200 profile with its host figures scaled by `scale`."""
    doc = copy.deepcopy(load_profile("h200-1gpu").to_dict())
    doc["name"] = name
    doc["made_by"] = {**doc["made_by"], "command": f"aptmoe-calibrate --out {name}.json"}
    for t in doc["adam"]["cpu_s_per_param"]:
        doc["adam"]["cpu_s_per_param"][t] *= scale
    for curve in doc["cpu_expert"]:
        curve["seconds"] = [s * scale for s in curve["seconds"]]
        if drop_token is not None and drop_token in curve["tokens"]:
            i = curve["tokens"].index(drop_token)
            del curve["tokens"][i], curve["seconds"][i]
    if reverse_curves:
        doc["cpu_expert"].reverse()
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(doc))
    return path


def test_three_calibrations_pool_to_their_median_figure_by_figure(tmp_path) -> None:
    paths = [_h200(tmp_path, "a", 1.0), _h200(tmp_path, "b", 1.3, reverse_curves=True),
             _h200(tmp_path, "c", 0.8, drop_token=2)]
    out = tmp_path / "pooled.json"
    assert pool_main([*map(str, paths), "--name", "h200-pooled", "--out", str(out)]) == 0
    got, base = load_profile(str(out)), load_profile("h200-1gpu")
    assert got.name == "h200-pooled"
    # the middle input (scale 1.0) is every scaled figure's median, whatever order the curves came in
    assert got.adam.cpu_s_per_param == pytest.approx(base.adam.cpu_s_per_param)
    by_id = {(c.d, c.h, c.dtype, c.direction, c.threads): c for c in base.cpu_expert}
    for c in got.cpu_expert:
        ref = by_id[(c.d, c.h, c.dtype, c.direction, c.threads)]
        assert 2 not in c.tokens                                      # only points every input measured
        assert list(c.tokens) == [t for t in ref.tokens if t != 2]
        assert list(c.seconds) == pytest.approx([s for t, s in zip(ref.tokens, ref.seconds) if t != 2])
    assert got.gpu == base.gpu and got.links == base.links          # figures all inputs share, unchanged
    history = got.made_by.command.split(" | ")
    assert [h.split(":")[0] for h in history[:3]] == ["input 1", "input 2", "input 3"]
    assert "aptmoe-calibrate --out b.json" in history[1] and history[-1].startswith("python -m aptmoe.calibration.pool")
    assert got.sources["adam"].startswith("measured: the median of 3 of 3 calibrations")


def test_pooling_refuses_other_machines_one_input_and_shapes_that_differ(tmp_path, capsys) -> None:
    a = _h200(tmp_path, "a", 1.0)
    out = tmp_path / "p.json"
    other = json.loads(a.read_text())
    other["hardware"]["gpu_name"] = "NVIDIA A800"
    (tmp_path / "other.json").write_text(json.dumps(other))
    assert pool_main([str(a), str(tmp_path / "other.json"), "--out", str(out)]) == 2
    assert pool_main([str(a), "--out", str(out)]) == 2
    bad = json.loads(a.read_text())
    bad["adam"]["cpu_s_per_param"] = {"14": 1e-10}                  # the same keys, fewer of them: fine
    (tmp_path / "fewer.json").write_text(json.dumps(bad))
    assert pool_main([str(a), str(tmp_path / "fewer.json"), "--out", str(out)]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "different machines" in err[0] and "at least two" in err[1]
    with pytest.raises(ProfileError, match="differ in shape"):
        pooled([[1.0, 2.0], [1.0, 2.0, 3.0]], "x")


monotone = st.lists(st.floats(0.0, 1.0, allow_nan=False), min_size=4, max_size=4).map(
    lambda xs: [sum(xs[:i + 1]) for i in range(len(xs))])


@settings(max_examples=60, deadline=None)
@given(st.lists(monotone, min_size=2, max_size=5))
def test_the_pointwise_median_of_monotone_curves_is_monotone_and_between_them(curves) -> None:
    tokens = [1, 2, 4, 8]
    got = pooled([{"tokens": tokens, "seconds": s, "threads": 4} for s in curves], "c")
    assert got["tokens"] == tokens and got["threads"] == 4
    sec = got["seconds"]
    assert all(a <= b + 1e-12 for a, b in zip(sec, sec[1:]))
    for i, s in enumerate(sec):
        assert min(c[i] for c in curves) - 1e-12 <= s <= max(c[i] for c in curves) + 1e-12


def test_pool_keeps_only_parts_every_input_skipped() -> None:
    a = load_profile("h200-1gpu").to_dict()
    b = copy.deepcopy(a)
    b["skipped"] = [*b["skipped"], {"part": "adam", "reason": "test"}]
    doc = pool([b, a], name="p", command="test")
    assert {s["part"] for s in doc["skipped"]} == {s["part"] for s in a["skipped"]}


def test_pooling_refuses_a_recompute_between_measured_apart_beside_one_held_in_bwd(tmp_path, capsys) -> None:
    """Since session 22 `dispatch.between.bwd` is the backward's alone where `rec` is there; a
    calibration before it holds both in bwd: the median of the two is of neither."""
    old, new = json.loads(_h200(tmp_path, "old", 1.0).read_text()), json.loads(_h200(tmp_path, "new", 1.0).read_text())
    for doc in (old, new):                # a calibration before session 33: the actions' ends in between
        doc["dispatch"].pop("action"), doc["dispatch"]["between"].pop("rec")
    (tmp_path / "old.json").write_text(json.dumps(old))
    old = tmp_path / "old.json"
    new["dispatch"]["between"]["rec"] = 6e-4
    (tmp_path / "new.json").write_text(json.dumps(new))
    assert pool_main([str(old), str(tmp_path / "new.json"), "--out", str(tmp_path / "p.json")]) == 2
    assert "rec" in capsys.readouterr().err and not (tmp_path / "p.json").exists()
    both = json.loads((tmp_path / "new.json").read_text())
    (tmp_path / "new2.json").write_text(json.dumps(both))
    assert pool_main([str(tmp_path / "new.json"), str(tmp_path / "new2.json"), "--out", str(tmp_path / "p.json")]) == 0
    assert load_profile(str(tmp_path / "p.json")).dispatch.between["rec"] == pytest.approx(6e-4)
    # nor a between that holds the actions' ends beside one that sets them apart (session 33)
    assert pool_main([str(tmp_path / "new.json"), str(_h200(tmp_path, "apart", 1.0)), "--out",
                      str(tmp_path / "q.json")]) == 2
    assert "dispatch.action" in capsys.readouterr().err and not (tmp_path / "q.json").exists()


def _with_stream(tmp_path: Path, name: str, alone: float, beside_adam: float | None = None) -> Path:
    """h200-1gpu with its host memory's CPU stream alone at `alone` GB/s (14 threads) and, where
    given, copies beside one rank's Adam at `beside_adam` GB/s each way."""
    doc = copy.deepcopy(load_profile("h200-1gpu").to_dict())
    doc["name"] = name
    doc["made_by"] = {**doc["made_by"], "command": f"aptmoe-calibrate --out {name}.json"}
    doc["host_memory"]["cpu_alone_GBps"]["14"] = alone
    doc["adam"]["cpu_s_per_param"]["14"] = alone * 1e-12             # a figure --only leaves alone
    if beside_adam is not None:
        doc["host_memory"]["copies_beside_adam"] = {"14": {"1": {c: beside_adam for c in
                                                                 ("h2d", "d2h", "duplex_h2d", "duplex_d2h")}}}
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(doc))
    return path


def test_onto_pools_only_the_figures_named_and_keeps_the_rest_of_the_base(tmp_path, capsys) -> None:
    base = _with_stream(tmp_path, "base", 62.0)
    leases = [_with_stream(tmp_path, f"l{i}", v, b) for i, (v, b) in enumerate([(90.0, 40.0), (80.0, 44.0),
                                                                                (120.0, None), (70.0, 50.0)])]
    out = tmp_path / "out.json"
    assert pool_main(["--onto", str(base), "--only", "host_memory.cpu_alone_GBps,host_memory.copies_beside_adam",
                      str(base), *map(str, leases), "--out", str(out)]) == 0
    assert "each the median of those of the 5 calibrations that have it" in capsys.readouterr().out
    got, was = load_profile(str(out)).to_dict(), json.loads(base.read_text())
    assert got["host_memory"]["cpu_alone_GBps"]["14"] == pytest.approx(80.0)     # of 62, 90, 80, 120, 70
    assert got["host_memory"]["cpu_alone_GBps"]["16"] == was["host_memory"]["cpu_alone_GBps"]["16"]
    # the base had no copies beside Adam: the median of the three inputs that have them
    assert got["host_memory"]["copies_beside_adam"]["14"]["1"]["h2d"] == pytest.approx(44.0)
    assert got["adam"] == was["adam"] and got["name"] == "base" and got["gpu"] == was["gpu"]
    src = got["sources"]["host_memory"]
    assert "cpu_alone_GBps: the median of 5 calibrations" in src and "copies_beside_adam: the median of 3" in src
    assert got["made_by"]["command"].split(" | ")[-1].startswith("python -m aptmoe.calibration.pool --onto")


def test_onto_gives_figures_pooled_from_the_same_inputs_one_account(tmp_path) -> None:
    """Four figures of h200-1gpu's cpu_job from three probe runs read as one list of inputs, not four."""
    base = _with_stream(tmp_path, "base", 62.0)
    leases = [_with_stream(tmp_path, f"l{i}", v, b) for i, (v, b) in enumerate([(90.0, 40.0), (80.0, 44.0)])]
    fields = ["host_memory.cpu_alone_GBps", "host_memory.GBps", "host_memory.copies_beside_adam"]
    got = pool_onto(json.loads(base.read_text()), [json.loads(p.read_text()) for p in (base, *leases)], fields,
                    command="test")
    src = got["sources"]["host_memory"]
    assert "cpu_alone_GBps, GBps: the median of 3 calibrations" in src, src
    assert "copies_beside_adam: the median of 2 calibrations" in src and src.count("aptmoe-calibrate --out l0.json") == 2


def test_onto_refuses_what_it_cannot_pool_with_one_line_and_no_file(tmp_path, capsys) -> None:
    base, lease = _with_stream(tmp_path, "base", 62.0), _with_stream(tmp_path, "l", 90.0)
    out = tmp_path / "out.json"
    other = json.loads(lease.read_text())
    other["hardware"]["cpu_cores"] = 64
    (tmp_path / "other.json").write_text(json.dumps(other))
    cases = [
        (["--only", "nosuch.x", str(base), str(lease)], "no section 'nosuch'"),
        (["--only", "host_memory.copies_beside_adam", str(base), str(lease)], "0 of the 2 inputs have it"),
        (["--only", "host_memory.cpu_alone_GBps", str(base), str(tmp_path / "other.json")], "another machine"),
    ]
    for args, message in cases:
        assert pool_main(["--onto", str(base), *args, "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
        assert not out.exists()
    with pytest.raises(SystemExit):
        pool_main(["--onto", str(base), str(base), str(lease), "--out", str(out)])       # --only missing
    assert "go together" in capsys.readouterr().err


H200_2GPU_HOST_MEMORY = ["session26/h200-2gpu-lease-native.json", *(f"h200x2-session17/calibrations/run{i}.json"
                                                                     for i in (1, 2, 3)),
                         "h200x2-session21/dispatch.json", "session23/dispatch.json",
                         *(f"session27/am-{i}.json" for i in (1, 2, 3)),
                         "session30/memory-one-rank.json", "session30/memory-all-ranks.json"]


def test_h200_2gpu_s_host_memory_is_the_median_of_every_2_gpu_calibration_of_it() -> None:
    """Session 31: h200-2gpu's CPU stream figures (alone and beside copies) had come from one
    lease (session 26), whose stream alone at 14 threads read 62.2 GB/s; eleven calibrations of
    the part on the 2-GPU kind, by the same method, are now pooled into it (median 86.6)."""
    root = Path(__file__).resolve().parents[1]
    files = [root / "docs" / "measured" / f for f in H200_2GPU_HOST_MEMORY]
    if not all(stored_file(f) for f in files):               # kept as .json.xz
        pytest.skip("the stored calibrations are not in this tree")
    shipped = load_profile("h200-2gpu").to_dict()
    fields = ["host_memory.GBps", "host_memory.cpu_alone_GBps", "host_memory.beside"]
    again = pool_onto(shipped, [load_profile(str(f)).to_dict() for f in files], fields, command="test")
    for f in fields:
        key = f.split(".")[1]
        assert again["host_memory"][key] == shipped["host_memory"][key], key
    assert shipped["host_memory"]["cpu_alone_GBps"]["14"] == pytest.approx(86.64)
    assert "cpu_alone_GBps: the median of 11 calibrations" in shipped["sources"]["host_memory"]


def test_h200_1gpu_s_cpu_job_is_the_median_of_three_probe_runs_on_one_h200() -> None:
    """Session 32: h200-1gpu had no `cpu_job`, so its CPU jobs took their copies and experts
    only; the 2- and 4-GPU profiles have it. Three runs of the CPU-job probe on one H200
    (docs/measured/session32) are pooled into it."""
    root = Path(__file__).resolve().parents[1]
    files = [root / "docs" / "measured" / "session32" / f"cpujob-{i}.json" for i in (1, 2, 3)]
    if not all(stored_file(f) for f in files):               # kept as .json.xz
        pytest.skip("the stored calibrations are not in this tree")
    shipped = load_profile("h200-1gpu").to_dict()
    fields = [f"cpu_job.{k}" for k in ("take_s", "down_s", "up_s", "resume_s")]
    again = pool_onto(shipped, [load_profile(str(f)).to_dict() for f in files], fields, command="test")
    assert again["cpu_job"] == shipped["cpu_job"]
    # (its gaps between Adam chunks came later: session 38, tests/test_adam_gaps.py)
    waits = {k: v for k, v in shipped["cpu_job"].items() if k != "adam_gap_s"}
    assert waits == pytest.approx({"take_s": 180.2e-6, "down_s": 359.2e-6, "up_s": 208.6e-6, "resume_s": 85.07e-6})
