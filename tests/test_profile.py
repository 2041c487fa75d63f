"""Calibration files: schema round-trip, validation, interpolation, the a800-paper profile."""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aptmoe.config import ConfigError, ModelConfig, moe_model
from aptmoe.costs import CostSource
from aptmoe.profile import (SCHEMA, CpuCurve, GpuCurve, Profile, ProfileCost, ProfileError, interp_monotone,
                            list_profiles, load_profile)
from aptmoe.calibration import reference as gen

REFERENCE = Path(os.environ.get("APTMOE_A800_REFERENCE", "/work/shared/reference/a800-paper-testbed.json"))
needs_reference = pytest.mark.skipif(not REFERENCE.is_file(), reason=f"{REFERENCE} not present")

MOE_S = moe_model("S", 8)
TINY = ModelConfig(name="tiny", embedding_dim=64, hidden_dim=128, num_heads=4, num_layers=4, num_experts=4)


@pytest.fixture(scope="module")
def a800() -> Profile:
    return load_profile("a800-paper")


@pytest.fixture(scope="module")
def raw_table() -> dict:
    if not REFERENCE.is_file():
        pytest.skip(f"{REFERENCE} not present")
    return json.loads(REFERENCE.read_text())["lookup_table"]


# --------------------------------------------------------------------------- schema


def test_builtin_listed_and_loads(a800):
    assert "a800-paper" in list_profiles()
    assert a800.name == "a800-paper" and a800.schema == SCHEMA
    assert a800.made_by.tool.startswith("aptmoe ")
    assert "aptmoe.calibration.reference" in a800.made_by.command
    assert a800.hardware.gpu_name == "A800-40GB-PCIe" and a800.hardware.torch_version is None
    assert Path(__file__).parents[1].joinpath("aptmoe/profiles/a800-paper.json").stat().st_size < 200_000


def test_round_trip_exact(a800, tmp_path):
    path = a800.save(tmp_path / "sub" / "copy.json")
    again = load_profile(str(path))
    assert again == a800
    assert again.to_json() == path.read_text()          # saving is a fixed point
    builtin = Path(__file__).parents[1] / "aptmoe/profiles/a800-paper.json"
    assert a800.to_json() == builtin.read_text()
    assert [p.name for p in path.parent.iterdir()] == ["copy.json"]   # no temp file left


def test_round_trip_with_curves(a800, tmp_path):
    p = a800.with_(gpu=(GpuCurve("e", 64, 128, None, None, None, "fp32", "fwd", (1, 8, 64), (1e-5, 2e-5, 9e-5)),
                        GpuCurve("a", 64, None, 4, 128, None, "bf16", "bwd", (128,), (3e-4,))),
                   adam=dataclasses.replace(a800.adam, cpu_s_per_param={7: 4e-9, 28: 1e-9}, gpu_s_per_param=3e-11))
    assert load_profile(str(p.save(tmp_path / "p.json"))) == p


def _corrupt(tmp_path, a800, mutate) -> str:
    d = a800.to_dict()
    mutate(d)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(d))
    return str(path)


@pytest.mark.parametrize("mutate, field, words", [
    (lambda d: d.update(schema="aptmoe-calibration/0"), "schema", "unknown schema version"),
    (lambda d: d.pop("links"), "links", "missing field"),
    (lambda d: d["links"]["h2d"]["pinned"].pop("GBps"), "links.h2d.pinned.GBps", "missing field"),
    (lambda d: d["cpu_expert"][0]["seconds"].__setitem__(3, -0.001), "cpu_expert[0].seconds[3]", "> 0"),
    (lambda d: d["cpu_expert"][1]["seconds"].__setitem__(0, 0), "cpu_expert[1].seconds[0]", "> 0"),
    (lambda d: d["cpu_expert"][0]["tokens"].__setitem__(2, 1), "cpu_expert[0].tokens[2]", "strictly increasing"),
    (lambda d: d["cpu_expert"][0]["tokens"].__setitem__(0, -1), "cpu_expert[0].tokens[0]", ">= 1"),
    (lambda d: d["cpu_expert"][0]["seconds"].__setitem__(5, 1.0), "cpu_expert[0].seconds[6]", "non-decreasing"),
    (lambda d: d["cpu_expert"][2]["seconds"].pop(), "cpu_expert[2]", "entries"),
    (lambda d: d["links"]["h2d"]["pageable"].update(GBps="8"), "links.h2d.pageable.GBps", "number"),
    (lambda d: d["links"]["root_GBps"]["h2d"].update({"two": 3.0}), "links.root_GBps.h2d.two", "positive integer"),
    (lambda d: d["roofline"].pop("gpu_hbm_GBps"), "roofline.gpu_hbm_GBps", "missing field"),
    (lambda d: d["roofline"].update(extra=1), "roofline.extra", "unknown field"),
    (lambda d: d["sources"].update(gpu="a guess"), "sources.gpu", "begin with"),
    (lambda d: d["sources"].pop("adam"), "sources.adam", "missing field"),
    (lambda d: d["made_by"].update(date="yesterday"), "made_by.date", "ISO 8601"),
    (lambda d: d.update(gpu=[{"kind": "e", "d": 64, "h": None, "heads": None, "seq_length": None,
                              "experts": None, "dtype": "fp32", "direction": "fwd", "tokens": [1],
                              "seconds": [1e-5]}]), "gpu[0].h", "integer"),
    (lambda d: d.update(gpu=[{"kind": "e", "d": 64, "h": 128, "heads": 4, "seq_length": None,
                              "experts": None, "dtype": "fp32", "direction": "fwd", "tokens": [1],
                              "seconds": [1e-5]}]), "gpu[0].heads", "null"),
    (lambda d: d["cpu_expert"][0].update(dtype="fp8"), "cpu_expert[0].dtype", "one of"),
])
def test_corrupt_file_is_one_line_error(tmp_path, a800, mutate, field, words):
    path = _corrupt(tmp_path, a800, mutate)
    with pytest.raises(ProfileError) as err:
        load_profile(path)
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith(f"{path}: {field}:"), msg
    assert words in msg, msg


def test_truncated_and_missing_files(tmp_path, a800):
    path = tmp_path / "cut.json"
    path.write_text(a800.to_json()[:500])
    with pytest.raises(ProfileError, match=r"cut\.json: invalid JSON at line \d+ column \d+") as err:
        load_profile(str(path))
    assert "\n" not in str(err.value)
    with pytest.raises(ProfileError, match="nope.json: no such calibration file"):
        load_profile(str(tmp_path / "nope.json"))
    with pytest.raises(ProfileError, match="'h100-dream' is not built in; built-in profiles: .*a800-paper"):
        load_profile("h100-dream")
    assert isinstance(ProfileError("x"), ValueError)


def test_a_stored_profile_loads_from_its_xz_and_a_corrupt_one_is_a_one_line_error(tmp_path, a800):
    import lzma

    cell = tmp_path / "cell"
    cell.mkdir()
    (cell / "profile.json.xz").write_bytes(lzma.compress(a800.to_json().encode()))
    for name in ("profile.json.xz", "profile.json"):         # the plain name of a packed profile reads its .xz
        assert load_profile(cell / name).to_dict() == a800.to_dict()
    (tmp_path / "bad.json.xz").write_bytes(b"not xz")
    with pytest.raises(ProfileError, match=r"bad\.json\.xz: cannot read: ") as err:
        load_profile(tmp_path / "bad.json.xz")
    assert "\n" not in str(err.value)
    (tmp_path / "cut.json.xz").write_bytes(lzma.compress(a800.to_json()[:500].encode()))
    with pytest.raises(ProfileError, match=r"cut\.json\.xz: invalid JSON at line \d+"):
        load_profile(tmp_path / "cut.json.xz")
    with pytest.raises(ProfileError, match="nope.json.xz: no such calibration file"):
        load_profile("nope.json.xz")              # a file's name, not a built-in profile's


# --------------------------------------------------------------------------- interpolation


@st.composite
def monotone_curves(draw):
    n = draw(st.integers(1, 12))
    steps = draw(st.lists(st.integers(1, 500), min_size=n, max_size=n))
    tokens = np.cumsum(steps).tolist()
    incs = draw(st.lists(st.floats(0, 1e-3, allow_nan=False), min_size=n, max_size=n))
    first = draw(st.floats(1e-6, 1e-2))
    seconds = (first + np.cumsum([0.0] + incs[1:])).tolist()
    return tuple(int(t) for t in tokens), tuple(float(s) for s in seconds)


@settings(max_examples=60, deadline=None)
@given(monotone_curves())
def test_interpolation_exact_and_monotone(a800, curve):
    tokens, seconds = curve
    p = a800.with_(gpu=(GpuCurve("e", 64, 128, None, None, None, "fp32", "fwd", tokens, seconds),),
                   cpu_expert=(CpuCurve(64, 128, "fp32", "fwd", 8, tokens, seconds),))
    cost = ProfileCost(p.validate(), TINY)
    for t, s in zip(tokens, seconds):
        assert cost.gpu_s("e", t, "fwd") == s
        assert cost.cpu_expert_s(t, "fwd", 8) == s
    grid = range(tokens[0], tokens[-1] + 1, max(1, (tokens[-1] - tokens[0]) // 200))
    values = [cost.gpu_s("e", t, "fwd") for t in grid]
    assert all(a <= b for a, b in zip(values, values[1:]))
    assert not cost.fallbacks
    # outside the range: the roofline's shape anchored at the curve's ends, still monotone
    beyond = [cost.gpu_s("e", t, "fwd") for t in (tokens[-1], tokens[-1] + 1, 2 * tokens[-1] + 5)]
    assert beyond[0] <= beyond[1] <= beyond[2]
    assert any("above measured tokens" in f for f in cost.fallbacks)
    if tokens[0] > 1:
        assert cost.gpu_s("e", 1, "fwd") <= seconds[0]
        assert any("below measured tokens" in f for f in cost.fallbacks)


@settings(max_examples=60, deadline=None)
@given(monotone_curves(), st.integers(0, 6000))
def test_a_staircase_curve_is_exact_monotone_and_takes_the_next_point(a800, curve, step_to):
    tokens, seconds = curve
    p = a800.with_(gpu=(GpuCurve("e", 64, 128, None, None, None, "fp32", "fwd", tokens, seconds, step_to or None),))
    cost = ProfileCost(p.validate(), TINY)
    grid = range(tokens[0], tokens[-1] + 1, max(1, (tokens[-1] - tokens[0]) // 200))
    values = [cost.gpu_s("e", t, "fwd") for t in grid]
    assert all(a <= b for a, b in zip(values, values[1:]))
    for t, s in zip(tokens, seconds):
        assert cost.gpu_s("e", t, "fwd") == s
    for lo, hi, s_hi in zip(tokens, tokens[1:], seconds[1:]):
        if lo + 1 < hi and hi <= step_to:
            assert cost.gpu_s("e", lo + 1, "fwd") == s_hi       # one token past a point: the next one's time


def test_step_to_round_trips_and_old_files_stay_as_they_were(a800, tmp_path):
    staircase = GpuCurve("e", 64, 128, None, None, None, "fp32", "fwd", (32, 64, 96), (1e-4, 2e-4, 3e-4), 96)
    p = a800.with_(gpu=(staircase,)).validate()
    again = load_profile(str(p.save(tmp_path / "s.json")))
    assert again.gpu == (staircase,) and '"step_to": 96' in again.to_json()
    assert "step_to" not in a800.to_json()                 # no curve of it has one
    assert ProfileCost(again, TINY).gpu_s("e", 65, "fwd") == 3e-4
    assert interp_monotone([32, 64, 96], [1.0, 2.0, 3.0], 65) == pytest.approx(2 + 1 / 32)


@pytest.mark.parametrize("value, says", [(0, "gpu[0].step_to"), ("96", "gpu[0].step_to"), (True, "gpu[0].step_to")])
def test_a_bad_step_to_is_one_clear_error(a800, tmp_path, value, says):
    curve = GpuCurve("e", 64, 128, None, None, None, "fp32", "fwd", (32, 64), (1e-4, 2e-4))
    doc = json.loads(a800.with_(gpu=(curve,)).to_json())
    doc["gpu"][0]["step_to"] = value
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(ProfileError, match=re.escape(says) + ": must be an integer >= 1"):
        load_profile(str(path))


def test_interp_monotone_rejects_outside():
    assert interp_monotone([1, 3], [1.0, 2.0], 2) == 1.5
    with pytest.raises(ValueError):
        interp_monotone([1, 3], [1.0, 2.0], 4)


def test_fallbacks_recorded(a800):
    cost = ProfileCost(a800, MOE_S)
    assert isinstance(cost, CostSource)
    assert cost.gpu_s("e", 0, "fwd") == 0.0 and cost.cpu_expert_s(0, "fwd", 28) == 0.0
    assert not cost.fallbacks
    inside = cost.cpu_expert_s(8192, "fwd", 28)
    assert not cost.fallbacks
    assert cost.cpu_expert_s(10000, "fwd", 28) > inside
    assert cost.fallbacks == {"cpu e fwd d1024 h4096 fp32 28 threads: above measured tokens 1..8192, "
                              "roofline scaled to the curve's end"}
    assert cost.gpu_s("e", 128, "fwd") == cost.roofline.gpu_s("e", 128, "fwd")
    assert "gpu e fwd d1024 h4096 fp32: no curve, roofline" in cost.fallbacks
    assert cost.adam_cpu_s(10**6, 14) == cost.roofline.adam_cpu_s(10**6, 14)
    assert "adam cpu: not measured, roofline" in cost.fallbacks
    # no curve for these dims at all
    tiny = ProfileCost(a800, TINY)
    assert tiny.cpu_expert_s(64, "bwd", 8) == tiny.roofline.cpu_expert_s(64, "bwd", 8)
    assert tiny.fallbacks == {"cpu e bwd d64 h128 fp32: no curve, roofline"}
    with pytest.raises(ConfigError):
        cost.gpu_s("x", 1, "fwd")
    with pytest.raises(ConfigError):
        cost.cpu_expert_s(-1, "fwd", 28)


def test_threads(a800):
    cost = ProfileCost(a800, MOE_S)
    base = cost.cpu_expert_s(256, "fwd", 28)
    assert cost.cpu_expert_s(256, "fwd", 7) == pytest.approx(4 * base)       # outside: 28/7
    assert any("7 threads outside measured 28..28" in f for f in cost.fallbacks)
    # between measured counts: linear in 1/threads, exact for ideal scaling
    c28 = next(c for c in a800.cpu_expert if c.d == 1024 and c.direction == "fwd")
    c7 = dataclasses.replace(c28, threads=7, seconds=tuple(4 * s for s in c28.seconds))
    two = ProfileCost(a800.with_(cpu_expert=(c7, c28)).validate(), MOE_S)
    assert two.cpu_expert_s(256, "fwd", 14) == pytest.approx(2 * base)
    assert two.cpu_expert_s(256, "fwd", 7) == pytest.approx(4 * base)
    assert not two.fallbacks


def test_link_cap_and_root(a800):
    plain = ProfileCost(a800, MOE_S)
    assert plain.h2d().GBps == 25.0 and plain.d2h().GBps == 25.0
    assert [plain.root_GBps(n) for n in (1, 2, 3, 4, 8)] == [25.0] * 5       # shared switch: half each at 2
    capped = ProfileCost(a800, MOE_S, link_cap_GBps=5.0)
    assert capped.h2d().GBps == 5.0 and capped.d2h().GBps == 5.0
    assert capped.h2d().latency_s == plain.h2d().latency_s
    assert capped.root_GBps(2) == 10.0 and capped.root_GBps(8) == 25.0
    assert capped.duplex_GBps() == (5.0, 5.0)
    pageable = ProfileCost(a800, MOE_S, pinned=False)
    assert pageable.h2d() == a800.links.h2d_pageable.spec()
    assert pageable.root_GBps(2) == pytest.approx(2 * a800.links.h2d_pageable.GBps)
    assert ProfileCost(a800, MOE_S, pinned=False, link_cap_GBps=20.0).h2d() == pageable.h2d()
    assert plain.p2p(True).GBps == 20.0 and plain.p2p(False).GBps == 12.5
    assert "@5GBps" in capped.name and "pageable" in pageable.name


# --------------------------------------------------------------------------- the a800-paper profile


def test_pageable_fit_reproduces_artifact_loads(a800, raw_table):
    link = a800.links.h2d_pageable.spec()
    pts = gen.load_points(raw_table)
    assert [(b, s) for _, b, s in pts] == list(a800.links.h2d_pageable.points)
    errors = {label: link.time_s(b) / s - 1 for label, b, s in pts}
    # One affine fit cannot do better than ~20% on all of them: the table's per-byte rate
    # falls from 10.5 GB/s (S expert, 34 MB) to 7.0 GB/s (M expert, 134 MB).
    assert max(abs(e) for e in errors.values()) < 0.25, errors
    assert np.median([abs(e) for e in errors.values()]) < 0.15, errors
    assert sum(abs(e) < 0.15 for e in errors.values()) >= 10, errors
    assert 7.0 < link.GBps < 10.5 and 0 < link.latency_s < 100e-6


@pytest.mark.parametrize("size", ["S", "M", "L"])
def test_cpu_curve_smooth_and_faithful(a800, raw_table, size):
    d, h = gen.SIZES[size]
    fwd = next(c for c in a800.cpu_expert if (c.d, c.h, c.direction) == (d, h, "fwd"))
    bwd = next(c for c in a800.cpu_expert if (c.d, c.h, c.direction) == (d, h, "bwd"))
    assert fwd.threads == 28 and bwd.tokens == fwd.tokens
    assert bwd.seconds == pytest.approx([2 * s for s in fwd.seconds], rel=1e-3)
    raw = np.asarray(raw_table[size]["cpu_expert_forward_s_by_tokens"][1:])
    assert fwd.tokens[0] == 1 and fwd.tokens[-1] == len(raw)
    cost = ProfileCost(a800, moe_model(size, 8))
    curve = np.array([cost.cpu_expert_s(n, "fwd", 28) for n in range(1, len(raw) + 1)])
    assert np.all(np.diff(curve) >= 0)
    med = gen.rolling_median(raw, 9)
    env = gen.padding_envelope(med)
    # everywhere: between the padding envelope of the rolling median and 10% above it
    assert np.all(curve >= env * 0.99) and np.all(curve <= env * 1.1 * 1.01)
    # at sample points where the rolling median is not itself an inversion (a slower run
    # than some larger token count), within 10% of it
    samples = [n for n in [2 ** k for k in range(14)] + [len(raw)] if n <= len(raw)]
    usable = [n for n in samples if med[n - 1] <= 1.1 * env[n - 1]]
    assert len(usable) >= 0.6 * len(samples)
    for n in usable:
        assert curve[n - 1] == pytest.approx(med[n - 1], rel=0.10), n


def test_generator_matches_committed_file(a800):
    if not REFERENCE.is_file():
        pytest.skip(f"{REFERENCE} not present")
    ref = json.loads(REFERENCE.read_text())
    built = gen.build_a800_profile(ref, a800.made_by.command, a800.made_by.date).validate()
    assert built == a800


def test_smoothing_helpers():
    assert gen.pava([1, 3, 2, 4]).tolist() == [1, 2.5, 2.5, 4]
    y = np.array([1.0, 5.0, 1.1, 1.2, 1.3, 9.0, 1.4, 1.5, 1.6])
    s = gen.smooth_monotone(y, window=3)
    assert np.all(np.diff(s) >= 0) and s.max() < 2
    knots = gen.select_knots(np.linspace(1, 2, 100) ** 2, tol=0.01)
    assert {0, 1, 3, 7, 15, 31, 63, 99} <= set(knots)


# --------------------------------------------------------------------------- Adam with ranks at once


def _with_shared(a800: Profile, ranks: int = 4) -> Profile:
    adam = dataclasses.replace(a800.adam, cpu_s_per_param={8: 4e-10, 16: 2.5e-10}, shared_ranks=ranks,
                               cpu_shared_s_per_param={8: 1.2e-9, 16: 1.0e-9})
    return a800.with_(adam=adam)


def test_shared_adam_round_trips_and_is_checked(a800, tmp_path):
    p = _with_shared(a800)
    again = load_profile(str(p.save(tmp_path / "s.json")))
    assert again.adam == p.adam
    d = json.loads((tmp_path / "s.json").read_text())
    d["adam"]["cpu_shared"]["ranks"] = 1
    (tmp_path / "bad.json").write_text(json.dumps(d))
    with pytest.raises(ProfileError, match="adam.cpu_shared.ranks"):
        load_profile(str(tmp_path / "bad.json"))
    assert "cpu_shared" not in json.loads(a800.to_json())["adam"]      # absent when not measured


def test_ranks_of_one_host_update_at_the_shared_rate(a800):
    p = _with_shared(a800, ranks=4)
    alone = ProfileCost(p, MOE_S, ranks_per_host=1)
    four = ProfileCost(p, MOE_S, ranks_per_host=4)
    assert alone.adam_cpu_s(10**6, 16) == pytest.approx(2.5e-4)
    assert four.adam_cpu_s(10**6, 16) == pytest.approx(1.0e-3)
    assert not any("ranks at once" in f for f in four.fallbacks)
    two = ProfileCost(p, MOE_S, ranks_per_host=2)
    two.adam_cpu_s(10**6, 16)
    assert any("measured with 4 ranks at once, used for 2" in f for f in two.fallbacks)


def test_a_chunk_alone_and_the_slowdown_beside_another_rank_come_from_the_two_figures(a800):
    p = _with_shared(a800, ranks=4)
    four = ProfileCost(p, MOE_S, ranks_per_host=4)
    assert four.adam_cpu_alone_s(10**6, 16) == pytest.approx(2.5e-4)       # the figure alone
    assert four.adam_shared_slowdown(16) == pytest.approx(4.0)              # 1.0e-3 / 2.5e-4
    assert ProfileCost(p, MOE_S, ranks_per_host=1).adam_shared_slowdown(16) == 1.0     # no other rank
    assert ProfileCost(a800, MOE_S, ranks_per_host=4).adam_shared_slowdown(16) == 1.0  # not measured


def test_each_adam_step_call_pays_its_measured_fixed_cost(a800, tmp_path):
    p = a800.with_(adam=dataclasses.replace(_with_shared(a800).adam, cpu_call_s={8: 3e-5, 16: 2e-5}))
    again = load_profile(str(p.save(tmp_path / "c.json")))
    assert again.adam.cpu_call_s == {8: 3e-5, 16: 2e-5}
    plain = ProfileCost(_with_shared(a800), MOE_S)
    cost = ProfileCost(again, MOE_S)
    for params, threads, call in ((10**6, 16, 2e-5), (4096, 8, 3e-5), (4096, 12, 3e-5), (1, 64, 2e-5)):
        assert cost.adam_cpu_s(params, threads) == pytest.approx(plain.adam_cpu_s(params, threads) + call)
    assert "cpu_call_s" not in json.loads(a800.to_json())["adam"]       # absent when not measured


def test_the_recv_wait_section_round_trips_is_checked_and_never_speeds_a_kernel(tmp_path):
    from aptmoe.profile import RecvWait

    p = load_profile("a800-paper")
    S, M = moe_model("S", 8), moe_model("M", 8)
    none = ProfileCost(p, S)
    assert p.recv_wait is None and none.recv_slowdown("a") == 1.0
    assert none.fallbacks == {"recv wait: not measured, a posted receive costs the blocks beside it nothing"}
    q = p.with_(recv_wait=RecvWait((("a", 1024, 1.2), ("e", 1024, 1.1), ("a", 2048, 1.6), ("e", 2048, 0.97))))
    again = load_profile(str(q.save(tmp_path / "p.json")))
    assert again.recv_wait == q.recv_wait
    cost = ProfileCost(again, M)
    assert cost.recv_slowdown("a") == 1.6 and not cost.fallbacks
    # a ratio under 1 is the timing's noise: kept as measured, used as 1
    assert cost.recv_slowdown("e") == 1.0
    # a block not measured: the median of those that were, and the report says so
    assert cost.recv_slowdown("g") == pytest.approx(1.15)
    assert any(f.startswith("recv wait g d2048: not measured") for f in cost.fallbacks)
    assert ProfileCost(again, moe_model("L", 8)).recv_slowdown("a") == pytest.approx(1.15)
    d = json.loads((tmp_path / "p.json").read_text())
    d["recv_wait"]["blocks"][0]["slowdown"] = 0
    (tmp_path / "bad.json").write_text(json.dumps(d))
    with pytest.raises(ProfileError, match=r"recv_wait.blocks\[0\].slowdown"):
        load_profile(str(tmp_path / "bad.json"))
    d["recv_wait"]["blocks"][0].update(slowdown=1.2, kind="x")
    (tmp_path / "bad.json").write_text(json.dumps(d))
    with pytest.raises(ProfileError, match=r"recv_wait.blocks\[0\].kind"):
        load_profile(str(tmp_path / "bad.json"))


def test_the_built_in_profile_of_a_machine_is_the_one_calibrated_on_its_kind() -> None:
    from aptmoe.profile import machine_profile

    assert machine_profile("NVIDIA H200", 2, 32) == "h200-2gpu"
    assert machine_profile("NVIDIA H200", 1, 16) == "h200-1gpu"
    assert machine_profile("NVIDIA H200", 4, 64) == "h200-4gpu"      # of h200 and h200-4gpu, the later
    assert machine_profile("NVIDIA H200", 2, 48) is None           # other cores: another host
    assert machine_profile("NVIDIA A800", 2, 32) is None


def test_aptmoe_run_plans_with_its_machines_profile_unless_told(monkeypatch) -> None:
    torch = pytest.importorskip("torch")
    from aptmoe.exec import cli

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "NVIDIA H200")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(cli, "physical_cores", lambda: 32)
    ns = cli.make_run_parser().parse_args([])
    assert cli.planning_profile(ns, True).name == "h200-2gpu"
    assert cli.planning_profile(ns, False).name == "a800-paper"
    monkeypatch.setattr(cli, "physical_cores", lambda: 48)             # no built-in profile of this host
    assert cli.planning_profile(ns, True).name == "h200"
    told = cli.make_run_parser().parse_args(["--calibration", "h200-1gpu"])
    assert cli.planning_profile(told, True).name == "h200-1gpu"
