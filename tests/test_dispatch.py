"""The executor's host cost per block call: measured from its own trace, stored in the
profile (optional section), and a floor under every block's predicted time."""

from __future__ import annotations

import dataclasses
import json

import pytest

from aptmoe.config import moe_model
from aptmoe.profile import Dispatch, ProfileCost, ProfileError, load_profile
from aptmoe.trace import Trace

MOE_S = moe_model("S", 8)
D = Dispatch("cuda", {"a": {"fwd": 4e-4, "bwd": 9e-4}, "e": {"fwd": 1.5e-4, "bwd": 3e-4},
                      "g": {"fwd": 1e-4, "bwd": 2e-4}}, 120)


@pytest.fixture(scope="module")
def with_dispatch():
    return dataclasses.replace(load_profile("a800-paper"), dispatch=D)


def test_dispatch_round_trips_and_is_optional(with_dispatch, tmp_path) -> None:
    again = load_profile(str(with_dispatch.save(tmp_path / "d.json")))
    assert again.dispatch == D
    assert "dispatch" not in json.loads(load_profile("a800-paper").to_json())


@pytest.mark.parametrize("mutate, field", [
    (lambda d: d.update(device="tpu"), "dispatch.device"),
    (lambda d: d["seconds"].update(x={"fwd": 1e-4}), "dispatch.seconds.x"),
    (lambda d: d["seconds"]["a"].update(rec=1e-4), "dispatch.seconds.a.rec"),
    (lambda d: d["seconds"]["e"].update(fwd=-1.0), "dispatch.seconds.e.fwd"),
    (lambda d: d.pop("samples"), "dispatch.samples"),
])
def test_a_bad_dispatch_section_is_named(with_dispatch, tmp_path, mutate, field) -> None:
    d = with_dispatch.to_dict()
    mutate(d["dispatch"])
    (tmp_path / "bad.json").write_text(json.dumps(d))
    with pytest.raises(ProfileError, match=field.replace(".", r"\.")):
        load_profile(str(tmp_path / "bad.json"))


def test_a_block_takes_at_least_its_dispatch(with_dispatch) -> None:
    plain = ProfileCost(load_profile("a800-paper"), MOE_S)
    floored = ProfileCost(with_dispatch, MOE_S)
    for kind, dirs in D.seconds.items():
        for direction, floor in dirs.items():
            for tokens in (1, 64, 4096, 65536):
                kernel = plain.gpu_s(kind, tokens, direction)
                assert floored.gpu_s(kind, tokens, direction) == pytest.approx(max(kernel, floor))
            assert floored.gpu_s(kind, 0, direction) == 0.0          # a block with no tokens does not run
    # the floor matters where kernels are short and vanishes where they are long
    assert floored.gpu_s("e", 1, "fwd") > plain.gpu_s("e", 1, "fwd")
    assert floored.gpu_s("e", 65536, "fwd") == plain.gpu_s("e", 65536, "fwd")


def test_spans_are_read_by_kind_and_direction() -> None:
    from aptmoe.calibration.dispatch import dispatch_from_trace

    tr = Trace("real")
    t = 0.0
    for name, cat, dur in [("0F0@0:a", "forward", 1.0), ("0F0@0:e3", "forward", 0.2), ("0F1@0:e1", "forward", 0.4),
                           ("0B0@0:e3", "recompute", 0.3), ("0B0@0:e3", "backward", 0.5), ("0B0@0:g", "backward", 0.1),
                           ("0F0", "forward", 9.0), ("0LF@0:e3", "load-stage", 7.0)]:
        tr.add(name, 0, "load" if cat.startswith("load") else "compute", t, t + dur, cat)
        t += dur
    d = dispatch_from_trace(tr, "cpu")
    assert d.seconds == {"a": {"fwd": pytest.approx(1.0)}, "e": {"bwd": pytest.approx(0.5), "fwd": pytest.approx(0.3)},
                         "g": {"bwd": pytest.approx(0.1)}}
    assert d.samples == 6 and d.device == "cpu"
    with pytest.raises(ValueError, match="no block events"):
        dispatch_from_trace(Trace("real"), "cpu")


def test_the_probe_measures_the_executor_on_cpu_ranks() -> None:
    pytest.importorskip("torch")
    from aptmoe.calibration.dispatch import measure_dispatch

    d = measure_dispatch("cpu", 2)
    assert set(d.seconds) == {"a", "g", "e"}
    assert all(set(v) == {"fwd", "bwd"} and min(v.values()) > 0 for v in d.seconds.values())
    assert d.samples >= 4 * 3 * 10          # blocks x passes x layers-and-micro-batches, at least


def test_merge_takes_dispatch_or_drops_it(with_dispatch, tmp_path) -> None:
    pytest.importorskip("torch")
    from aptmoe.calibration.merge import main as merge_main

    src = with_dispatch.to_dict()
    src["sources"]["dispatch"] = "measured: a test figure"
    (tmp_path / "d.json").write_text(json.dumps(src))
    assert merge_main(["a800-paper", "--take", f"dispatch={tmp_path / 'd.json'}", "--out",
                       str(tmp_path / "m.json")]) == 0
    merged = load_profile(str(tmp_path / "m.json"))
    assert merged.dispatch == D and merged.sources["dispatch"] == "measured: a test figure"
    # taking the section from a file without it leaves none, and none of its sources
    assert merge_main([str(tmp_path / "m.json"), "--take", "dispatch=a800-paper", "--out",
                       str(tmp_path / "n.json")]) == 0
    none = load_profile(str(tmp_path / "n.json"))
    assert none.dispatch is None and "dispatch" not in none.sources
