"""The loading policy's answers as host work: timed on this host (aptmoe/policy_timing.py),
kept in the profile (`policy_host`), and charged to the simulator's issuing thread."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from aptmoe.analytic_cost import AnalyticCost, h200_hardware
from aptmoe.config import moe_model
from aptmoe.policy_timing import CALLS, POLICIES, Shape, WalkCalls, measure_policy_host, time_policy_calls
from aptmoe.profile import (POLICY_HOST_POLICIES, Dispatch, PolicyHost, ProfileCost, ProfileError, load_profile)
from aptmoe.stored import read_json

MODEL = moe_model("S", 8, num_layers=8)
COST = AnalyticCost(MODEL, h200_hardware())
PH = PolicyHost({"aptmoe": {"gate_counts": 4e-5, "predicted_counts": 3e-5, "backward_decide": 1e-4},
                 "stage": {"gate_counts": 2e-6}}, loop_s=0.02)


@pytest.fixture(scope="module")
def timed():
    return time_policy_calls(COST, Shape(steps=2))


def test_every_call_the_walks_make_is_timed_and_aptmoe_decides_where_stage_does_not(timed) -> None:
    assert set(timed) == set(POLICIES) == set(POLICY_HOST_POLICIES)
    assert set(timed["aptmoe"]) == set(CALLS)
    assert set(timed["stage"]) == set(CALLS) - {"backward_decide"}        # nothing to decide
    assert all(s > 0 for calls in timed.values() for s in calls.values())
    # APTMoE splits its experts (numpy) where the stage policy hands back every one
    assert timed["aptmoe"]["gate_counts"] > 3 * timed["stage"]["gate_counts"]


def test_walk_calls_decide_each_stage_once_per_backward() -> None:
    from aptmoe.policy import AptmoePolicy
    from aptmoe.stage_walk import backward_walk

    from test_policy import aptmoe_policy

    policy: AptmoePolicy = aptmoe_policy(stages=4)
    seen = []
    walk = WalkCalls(policy, policy.layers, lambda kind, per, fn, *args: (seen.append((kind, per)), fn(*args))[1])
    counts = np.full((8, 2, 8), 64)
    policy.stage_load_begins(2, "B")
    for mb in range(2):
        list(backward_walk(2, mb, policy.layers[2], walk, counts, moe=True, recompute=True))
    # the first placement decides the stage's two layers; every later one finds it decided
    assert seen[0] == ("backward_decide", 2) and seen.count(("backward_decide", 2)) == 1
    assert {k for k, _ in seen[1:]} == {"backward_placement", "forward_placement"}
    policy.stage_dropped(2)
    assert not policy.backward_decided(2)


def test_the_section_round_trips_and_bad_ones_are_named(tmp_path) -> None:
    base = load_profile("a800-paper")
    again = load_profile(str(base.with_(policy_host=PH).save(tmp_path / "p.json")))
    assert again.policy_host == PH
    assert "policy_host" not in json.loads(base.to_json())
    for mutate, field in [(lambda d: d["seconds"].update(lru={"gate_counts": 1e-5}), "policy_host.seconds.lru"),
                          (lambda d: d["seconds"]["aptmoe"].update(route=1e-5), "policy_host.seconds.aptmoe.route"),
                          (lambda d: d["seconds"]["aptmoe"].update(gate_counts=-1e-5), "gate_counts"),
                          (lambda d: d.update(seconds={}), "policy_host.seconds"),
                          (lambda d: d.update(loop_s=0), "policy_host.loop_s")]:
        d = base.with_(policy_host=PH).to_dict()
        mutate(d["policy_host"])
        (tmp_path / "bad.json").write_text(json.dumps(d))
        with pytest.raises(ProfileError, match=field.replace(".", r"\.")):
            load_profile(str(tmp_path / "bad.json"))


def test_a_call_costs_its_figure_at_the_dispatch_probes_host_speed() -> None:
    base = load_profile("a800-paper")
    assert ProfileCost(base, MODEL).policy_s("aptmoe", "gate_counts") == 0.0            # not measured
    # timed beside a loop of 0.02 s; the dispatch probe's host ran its loop in 0.03 s: 1.5x as slow
    D = Dispatch("cuda", {"a": {"fwd": 1e-4, "bwd": 2e-4}}, {"fwd": 1e-4, "bwd": 1e-4}, 10, loop_s=0.03)
    cost = ProfileCost(base.with_(policy_host=PH, dispatch=D), MODEL)
    assert cost.policy_s("aptmoe", "gate_counts") == pytest.approx(1.5 * 4e-5)
    assert cost.policy_s("aptmoe", "forward_placement") == 0.0                           # a call not timed
    slower = ProfileCost(base.with_(policy_host=PH, dispatch=D).with_host_speed(2.0), MODEL)
    assert slower.policy_s("stage", "gate_counts") == pytest.approx(2 * 1.5 * 2e-6)
    no_loop = ProfileCost(base.with_(policy_host=PH, dispatch=dataclasses.replace(D, loop_s=None)), MODEL)
    assert no_loop.policy_s("aptmoe", "backward_decide") == 1e-4                         # as timed


def test_the_engine_charges_the_issuing_thread_before_the_next_step() -> None:
    from aptmoe.sim.engine import RankModel
    from aptmoe.sim.issuing import IssuingThread

    figures = {"gate_counts": 4e-5, "backward_decide": 1e-4}
    r = SimpleNamespace(cost=SimpleNamespace(policy_s=lambda p, k: figures.get(k, 0.0) if p == "aptmoe" else 9.0),
                        plan=SimpleNamespace(policy="aptmoe"), policy_owed=0.0, host_t=5.0, runs_ahead=True,
                        issuing=IssuingThread(None, capped=False))
    r._between = lambda b: RankModel._between(r, b)
    assert RankModel._charged(r, "gate_counts", 1, lambda x: x + 1, 1) == 2          # the answer, unchanged
    RankModel._charged(r, "backward_decide", 2, lambda: None)
    RankModel._charged(r, "forward_placement", 1, lambda: None)
    assert r.policy_owed == pytest.approx(4e-5 + 2e-4)
    assert list(RankModel._pay_policy(r)) == []          # a GPU rank's host clock moves; nothing is held
    assert r.host_t == pytest.approx(5.0 + 2.4e-4) and r.policy_owed == 0.0


def test_aptmoe_on_a_host_bound_step_pays_for_its_answers() -> None:
    """MoE-S8 on one H200, issuing-bound: with the policy's figures in the profile each
    schedule's step grows by about what its walks' calls cost: more where the issuing thread
    is slowed beside copies (each charge is host work, `IssuingThread.slowdown`), less where
    the GPU or a load, not the host, holds the step."""
    from aptmoe.config import RunConfig
    from aptmoe.sim.simulate import simulate

    doc = read_json(Path(__file__).resolve().parents[1] / "docs" / "validation-h200-v13-fresh" / "cells"
                    / "S8x8-G0.45-native-1gpu" / "real" / "results.json")
    prof = load_profile("h200-1gpu").with_(policy_host=None)
    ph = PolicyHost({"aptmoe": {"gate_counts": 1e-4, "predicted_counts": 1e-4, "backward_decide": 3e-4},
                     "stage": {"gate_counts": 1e-6}}, loop_s=prof.dispatch.loop_s)
    for name, most in (("APTMoE", 32 * (1e-4 + 1e-4) + 8 * 3e-4), ("Mobius", 32 * 1e-6)):
        cfg = RunConfig.from_dict(doc["schedules"][name]["config"])
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, num_training_steps=2))
        without = simulate(cfg, prof).iteration_s
        grew = simulate(cfg, prof.with_(policy_host=ph)).iteration_s - without
        assert 0.5 * most < grew < 2 * most, (name, grew, most)
