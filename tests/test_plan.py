"""Plans: builders, JSON round-trip, golden printouts, the validator and the partition search."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aptmoe.analytic_cost import AnalyticCost, a800_pcie_hardware
from aptmoe.config import ClusterConfig, ConfigError, Pipeline, PopularityConfig, RunConfig, ScheduleConfig, TrainConfig, moe_model
from aptmoe.memory import MemoryModel
from aptmoe.plan.actions import Action, Kind
from aptmoe.plan.builders import aptmoe, build_plan, gpipe, gpipe_offload, mobius
from aptmoe.plan.partition import candidate_stages, choose_num_stages, estimate_step_s, working_set_bytes
from aptmoe.plan.plan import Plan, PlanError
from aptmoe.plan.validate import dry_run, validate

from conftest import make_tiny_config, memory_of

GOLDEN = Path(__file__).parent / "golden"
BIG = 10**15
WINDOW = {"GPipeOffload": 1, "Mobius": 2, "APTMoE": 2}


def a(text: str) -> Action:
    return Action.parse(text)


def tiny_plan(pipeline: str, **kw) -> tuple[Plan, RunConfig]:
    cfg = make_tiny_config(pipeline, **kw)
    return build_plan(cfg), cfg


class ParamsOnly(MemoryModel):
    """Counts parameters only: no activations, no gradients, so the dry-run peak is the
    number of resident stages times one stage's parameter bytes."""

    def activation_bytes_per_layer(self) -> int:
        return 0

    def boundary_bytes(self) -> int:           # the stage-input checkpoints of recomputation
        return 0

    def grad_bytes(self, layers) -> int:
        return 0


def assert_grid(msg: str) -> None:
    assert "step  rank 0" in msg, msg
    assert "<-- here" in msg, msg


# --------------------------------------------------------------------------- builders


@pytest.mark.parametrize("pipeline", [p.value for p in Pipeline])
@pytest.mark.parametrize("fwd_only", [False, True])
def test_json_round_trip(pipeline: str, fwd_only: bool) -> None:
    plan, _ = tiny_plan(pipeline, ranks=2, stages=2 if pipeline == "GPipe" else 6, micro_batches=3,
                        fwd_only=fwd_only, inter_stage_only=pipeline == "APTMoE")
    back = Plan.from_json(plan.to_json())
    assert back == plan
    assert back.to_json() == plan.to_json()
    assert back.describe() == plan.describe()


def test_from_dict_rejects_other_formats() -> None:
    d = tiny_plan("Mobius")[0].to_dict()
    d["format"] = "something-else/2"
    with pytest.raises(PlanError, match="aptmoe-plan/1"):
        Plan.from_dict(d)


def test_builder_functions_agree_with_build_plan() -> None:
    cfg = make_tiny_config("Mobius", ranks=2, stages=4)
    assert mobius(cfg, 4).programs == build_plan(cfg).programs
    assert gpipe_offload(cfg, 4).stages != mobius(cfg, 4).stages
    ap = aptmoe(cfg, 4)
    assert ap.pipeline == "APTMoE" and ap.policy == "aptmoe" and ap.programs == mobius(cfg, 4).programs
    assert gpipe(cfg).policy == "resident" and gpipe(cfg).resident
    assert build_plan(cfg).meta["model"] == "tiny" and build_plan(cfg).meta["experts"] == 4


def test_stage_mappings() -> None:
    cfg = make_tiny_config("Mobius", ranks=2, stages=6)
    assert [s.rank for s in mobius(cfg, 6).stages] == [0, 1, 0, 1, 0, 1]            # cross mapping
    assert [s.rank for s in gpipe_offload(cfg, 6).stages] == [0, 0, 0, 1, 1, 1]      # contiguous
    assert [s.layers for s in mobius(cfg, 6).stages] == [(i,) for i in range(6)]
    assert [s.layers for s in gpipe(cfg).stages] == [(0, 1, 2), (3, 4, 5)]


# --------------------------------------------------------------------------- golden plans


def golden_text(plan: Plan) -> str:
    deps = "\n".join(f"  {x} <- {' '.join(map(str, ds))}" for x, ds in sorted(plan.deps.items()))
    return f"{plan.describe()}\ndeps:\n{deps}\n"


GOLDEN_CASES = {
    "mobius_2r_4s_2mb": dict(pipeline="Mobius", ranks=2, stages=4, micro_batches=2),
    "gpipe_offload_2r_4s_2mb": dict(pipeline="GPipeOffload", ranks=2, stages=4, micro_batches=2),
    "aptmoe_fwd_only_2r_4s_2mb": dict(pipeline="APTMoE", ranks=2, stages=4, micro_batches=2, fwd_only=True),
    "gpipe_2r_2mb": dict(pipeline="GPipe", ranks=2, stages=2, layers=4, micro_batches=2),
}


@pytest.mark.parametrize("name", sorted(GOLDEN_CASES))
def test_golden_plan(name: str) -> None:
    """Printed plans checked into tests/golden/; APTMOE_UPDATE_GOLDEN=1 rewrites them (review the diff)."""
    kw = dict(GOLDEN_CASES[name])
    plan, cfg = tiny_plan(kw.pop("pipeline"), **kw)
    validate(plan, memory=memory_of(cfg), capacity_bytes=BIG)
    path = GOLDEN / f"{name}.txt"
    text = golden_text(plan)
    if os.environ.get("APTMOE_UPDATE_GOLDEN"):
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
    assert text == path.read_text()


# --------------------------------------------------------------------------- properties


@st.composite
def plan_configs(draw) -> RunConfig:
    pipeline = draw(st.sampled_from([p.value for p in Pipeline]))
    ranks = draw(st.integers(1, 8))
    per_rank = 1 if pipeline == "GPipe" else draw(st.integers(1, 16 // ranks))
    stages = ranks * per_rank
    layers = stages * draw(st.integers(1, 2))
    return make_tiny_config(pipeline, ranks=ranks, stages=stages, layers=layers,
                            micro_batches=draw(st.integers(1, 16)), fwd_only=draw(st.booleans()),
                            experts=draw(st.sampled_from([2, 4])), width=16, seq_length=4)


@settings(max_examples=200, deadline=None)
@given(plan_configs())
def test_every_builder_validates_and_never_deadlocks(cfg: RunConfig) -> None:
    plan = build_plan(cfg)
    run = validate(plan, memory=memory_of(cfg), capacity_bytes=BIG)
    G, M, S = cfg.world_size, cfg.micro_batches, plan.num_stages
    k = S // G
    assert set(run.start) == {x for _, _, x in plan.actions()}      # every action ran once
    assert len(run.peak_bytes) == G and all(p > 0 for p in run.peak_bytes)
    for r in range(G):
        owned = plan.stages_of(r)
        assert len(owned) == k
        compute = [x for x in plan.programs[r]["compute"] if x.kind in (Kind.FWD, Kind.BWD)]
        want = {Action(s, Kind.FWD, m) for s in owned for m in range(M)}
        if not cfg.schedule.fwd_only:
            want |= {Action(s, Kind.BWD, m) for s in owned for m in range(M)}
        assert sorted(compute) == sorted(want)
        loads = plan.programs[r]["load"]
        if plan.resident:
            assert not loads
        else:
            assert len(loads) == (k if cfg.schedule.fwd_only else 2 * k - 1)
    if cfg.schedule.fwd_only:
        assert not any(x.kind in (Kind.BWD, Kind.UPDATE, Kind.OFFLOAD) for _, _, x in plan.actions())
    else:   # every stage updated once, after its last backward
        updates = [x for _, _, x in plan.actions() if x.kind is Kind.UPDATE]
        assert sorted(u.stage for u in updates) == list(range(S))


@settings(max_examples=100, deadline=None)
@given(plan_configs().filter(lambda c: c.schedule.pipeline is not Pipeline.GPIPE))
def test_resident_stage_bound(cfg: RunConfig) -> None:
    """Mobius and APTMoE hold at most two stages' parameters (and do prefetch the second),
    GPipeOffload at most one: from the dry-run memory with activations and gradients at 0,
    and, independently, from the load/drop intervals of the dry run."""
    plan = build_plan(cfg)
    window = WINDOW[plan.pipeline]
    k = plan.num_stages // cfg.world_size
    mem = ParamsOnly(cfg.model, cfg.tokens_per_micro_batch, cfg.micro_batch_size)
    run = validate(plan, memory=mem, capacity_bytes=BIG)
    per_stage = mem.param_bytes(plan.stages[0].layers)
    assert run.peak_bytes == [min(window, k) * per_stage] * cfg.world_size

    # The same from intervals: residency = [load start, drop start].
    for r in range(cfg.world_size):
        opens = sorted(run.start[x] for x in plan.programs[r]["load"])
        closes = sorted(run.start[x] for rr, _, x in plan.actions()
                        if rr == r and x.kind in (Kind.DROP_F, Kind.DROP_B))
        events = sorted([(t, 0, +1) for t in opens] + [(t, 1, -1) for t in closes])
        held = peak = 0
        for _, _, delta in events:
            held += delta
            peak = max(peak, held)
        assert peak == min(window, k)


# --------------------------------------------------------------------------- validator: negatives


@pytest.fixture
def mobius_plan() -> Plan:
    return tiny_plan("Mobius", ranks=2, stages=4, micro_batches=2)[0]


def _drop_dep(plan: Plan, action: str, dep: str) -> None:
    x, d = a(action), a(dep)
    assert d in plan.deps[x]
    plan.deps[x] = tuple(y for y in plan.deps[x] if y != d)


def test_removed_dependency_is_reported(mobius_plan: Plan) -> None:
    validate(mobius_plan)
    _drop_dep(mobius_plan, "2F0", "2RF0")
    with pytest.raises(PlanError) as err:
        validate(mobius_plan)
    assert "2F0 starts before its input 2RF0 has arrived" in str(err.value)
    assert_grid(str(err.value))


def test_swapped_compute_actions_are_reported(mobius_plan: Plan) -> None:
    prog = mobius_plan.programs[1]["compute"]
    i, j = prog.index(a("3F0")), prog.index(a("3B0"))
    prog[i], prog[j] = prog[j], prog[i]
    with pytest.raises(PlanError) as err:
        validate(mobius_plan)
    assert "3B0 starts before its forward 3F0" in str(err.value)
    assert_grid(str(err.value))


def test_use_after_drop_is_reported(mobius_plan: Plan) -> None:
    prog = mobius_plan.programs[0]["compute"]
    i, j = prog.index(a("0F1")), prog.index(a("0DF"))
    prog[i], prog[j] = prog[j], prog[i]
    with pytest.raises(PlanError) as err:
        validate(mobius_plan)
    assert "0F1 runs after stage 0 was dropped by 0DF" in str(err.value)
    assert_grid(str(err.value))


def test_load_after_its_use_is_reported(mobius_plan: Plan) -> None:
    _drop_dep(mobius_plan, "0F0", "0LF")
    mobius_plan.deps[a("0LF")] = (a("0F1"),)          # the load now waits for the second forward
    with pytest.raises(PlanError) as err:
        validate(mobius_plan)
    assert "0F0 uses stage 0's parameters before they are loaded" in str(err.value)
    assert_grid(str(err.value))


def _delete_recv(plan: Plan, recv: str) -> None:
    x = a(recv)
    for streams in plan.programs:
        if x in streams["net"]:
            streams["net"].remove(x)
    plan.deps.pop(x)
    plan.deps = {k: tuple(d for d in ds if d != x) for k, ds in plan.deps.items()}


def test_deleted_recv_is_reported(mobius_plan: Plan) -> None:
    _delete_recv(mobius_plan, "2RF0")
    with pytest.raises(PlanError) as err:
        validate(mobius_plan)
    assert "1SF0 has no matching 2RF0" in str(err.value)


def test_deleted_recv_error_shows_grid(mobius_plan: Plan) -> None:
    """DESIGN §3: the validator prints the grid with the failing step marked, for
    send/receive matching as for ordering."""
    _delete_recv(mobius_plan, "2RF0")
    with pytest.raises(PlanError) as err:
        validate(mobius_plan)
    assert_grid(str(err.value))


def test_deleted_recv_left_in_deps_is_reported(mobius_plan: Plan) -> None:
    mobius_plan.programs[0]["net"].remove(a("2RF0"))
    with pytest.raises(PlanError, match="2RF0"):
        validate(mobius_plan)


def test_capacity_below_peak_is_reported(mobius_plan: Plan) -> None:
    cfg = make_tiny_config("Mobius", ranks=2, stages=4, micro_batches=2)
    mem = memory_of(cfg)
    peak = max(validate(mobius_plan, memory=mem).peak_bytes)
    validate(mobius_plan, memory=mem, capacity_bytes=peak)               # exactly enough
    with pytest.raises(PlanError) as err:
        validate(mobius_plan, memory=mem, capacity_bytes=peak - 1)
    msg = str(err.value)
    assert "GB of GPU memory" in msg and "rank 0 needs" in msg
    assert_grid(msg)
    assert "<-- here (rank 0)" in msg


def test_memory_peak_by_hand() -> None:
    """Mobius, 2 ranks, 4 one-layer stages, 2 micro-batches: rank 0's peak is at 2B0's start,
    holding stage 2 (params + grads) and stage 0 (reloaded for backward), what the four
    forwards (0F0 0F1 2F0 2F1) saved, and 2B0's working set (its recomputed activations)."""
    plan, cfg = tiny_plan("Mobius", ranks=2, stages=4, micro_batches=2)
    mem = memory_of(cfg)
    run = validate(plan, memory=mem)
    one = (0,)
    rc = plan.recomputes(0)
    assert plan.recompute == "all" and rc and plan.recomputes(1)
    assert run.peak_bytes[0] == (2 * mem.param_bytes(one) + mem.grad_bytes(one) + 4 * mem.saved_bytes(one, rc)
                                 + mem.backward_working_bytes(one, rc))
    assert run.peak_step[0] == run.start[a("2B0")]


def test_deadlock_is_reported() -> None:
    """Rank 0 waits for rank 1's 1SB0 before sending 0SF0, which rank 1 needs first."""
    plan, _ = tiny_plan("GPipe", ranks=2, stages=2, layers=4, micro_batches=2)
    net = plan.programs[0]["net"]
    net.remove(a("0RB0"))
    net.insert(0, a("0RB0"))
    with pytest.raises(PlanError) as err:
        dry_run(plan)
    msg = str(err.value)
    assert msg.startswith("deadlock")
    assert "rank 0 net: 0RB0 waits for 1SB0" in msg
    assert "rank 1 net: 1RF0 waits for 0SF0" in msg
    assert_grid(msg)
    with pytest.raises(PlanError, match="deadlock"):
        validate(plan)


def _move(plan: Plan, action: str, src: tuple[int, str], dst: tuple[int, str]) -> None:
    plan.programs[src[0]][src[1]].remove(a(action))
    plan.programs[dst[0]][dst[1]].append(a(action))


@pytest.mark.parametrize("mutate, needle", [
    (lambda p: p.programs[0]["compute"].append(a("0F0")), "appears twice"),
    (lambda p: _move(p, "0U", (0, "cpu"), (1, "cpu")), "0U is on rank 1, but stage 0 lives on rank 0"),
    (lambda p: _move(p, "0DF", (0, "compute"), (0, "load")), "DROP_F belongs on compute"),
    (lambda p: p.programs[0]["compute"].append(a("0F7")), "micro-batch 7"),
    (lambda p: p.programs[0]["compute"].append(a("8F0")), "stage 8"),
    (lambda p: p.deps.__setitem__(a("2RF0"), ()), "2RF0 does not wait for its send 1SF0"),
])
def test_structural_errors(mobius_plan: Plan, mutate, needle: str) -> None:
    mutate(mobius_plan)
    with pytest.raises(PlanError, match=needle):
        validate(mobius_plan)


def test_mutations_do_not_leak_between_tests(mobius_plan: Plan) -> None:
    assert validate(copy.deepcopy(mobius_plan)).steps == validate(mobius_plan).steps


# --------------------------------------------------------------------------- partition search


def _paper_cfg(pipeline: Pipeline, cap_bytes: int, experts: int = 8) -> RunConfig:
    return RunConfig(model=moe_model("S", experts), cluster=ClusterConfig(gpus_per_node=4, gpu_memory_bytes=cap_bytes),
                     train=TrainConfig(batch_size=128), schedule=ScheduleConfig(pipeline=pipeline),
                     popularity=PopularityConfig(gini=0.3))


def _working_sets(cfg: RunConfig) -> dict[int, int]:
    return {S: working_set_bytes(cfg, S, WINDOW[cfg.schedule.pipeline.value]) for S in candidate_stages(cfg)}


@pytest.mark.parametrize("pipeline", [Pipeline.MOBIUS, Pipeline.GPIPE_OFFLOAD, Pipeline.APTMOE])
@pytest.mark.parametrize("experts", [8, 16])
@pytest.mark.parametrize("tight", [False, True])
def test_choose_num_stages_fits_memory(pipeline: Pipeline, experts: int, tight: bool) -> None:
    """The choice fits (by the closed form and by the validator's dry run) and is the fastest
    estimate among the candidates that fit; `tight` leaves only the two smallest working sets."""
    cfg = _paper_cfg(pipeline, 80 * 10**9, experts)
    if tight:
        cap = sorted(_working_sets(cfg).values())[1]
        cfg = cfg.replace(cluster=ClusterConfig(gpus_per_node=4, gpu_memory_bytes=cap))
    cap = cfg.cluster.gpu_memory_bytes
    cost = AnalyticCost(cfg.model, a800_pcie_hardware())
    window = WINDOW[pipeline.value]
    S = choose_num_stages(cfg, cost)
    assert S in candidate_stages(cfg) == [4, 8, 16, 32, 64]
    fits = [c for c, ws in _working_sets(cfg).items() if ws <= cap]
    assert S in fits and (len(fits) == 2 if tight else len(fits) > 2)
    assert estimate_step_s(cfg, cost, S, window) == min(estimate_step_s(cfg, cost, c, window) for c in fits)
    plan = build_plan(cfg.replace(schedule=ScheduleConfig(pipeline=pipeline, num_stages=S)))
    validate(plan, memory=memory_of(cfg), capacity_bytes=cap)


@pytest.mark.parametrize("experts", [8, 16])
def test_memory_decides_the_partition(experts: int) -> None:
    """A cap just below the fastest partition's working set moves the choice to the fastest
    of the partitions that still fit. (GPipeOffload: one stage resident, so more, smaller
    stages gain little and the fastest is not the smallest.)"""
    pipeline = Pipeline.GPIPE_OFFLOAD
    cfg = _paper_cfg(pipeline, 80 * 10**9, experts)
    cost = AnalyticCost(cfg.model, a800_pcie_hardware())
    ws = _working_sets(cfg)
    best = choose_num_stages(cfg, cost)
    smaller = [S for S in ws if ws[S] < ws[best]]
    assert smaller, f"the fastest partition ({best}) has the smallest working set: nothing to test"
    tight = cfg.replace(cluster=ClusterConfig(gpus_per_node=4, gpu_memory_bytes=ws[best] - 1))
    chosen = choose_num_stages(tight, cost)
    window = WINDOW[pipeline.value]
    assert chosen in smaller
    assert chosen == min(smaller, key=lambda S: (estimate_step_s(cfg, cost, S, window), S))


@pytest.mark.parametrize("pipeline", [Pipeline.MOBIUS, Pipeline.GPIPE_OFFLOAD])
def test_working_set_is_the_dry_run_peak(pipeline: Pipeline) -> None:
    """The partition search's closed form equals the validator's high-water mark once a rank
    owns at least `window` stages (with fewer it is an upper bound)."""
    cfg = _paper_cfg(pipeline, 80 * 10**9, experts=16)
    window = WINDOW[pipeline.value]
    for S in candidate_stages(cfg):
        plan = build_plan(cfg.replace(schedule=ScheduleConfig(pipeline=pipeline, num_stages=S)))
        peak = max(validate(plan, memory=memory_of(cfg)).peak_bytes)
        ws = working_set_bytes(cfg, S, window)
        if S // cfg.world_size >= window:
            assert ws == peak
        else:
            assert ws >= peak


def test_choose_num_stages_errors_when_nothing_fits() -> None:
    cfg = _paper_cfg(Pipeline.MOBIUS, 80 * 10**9)
    cost = AnalyticCost(cfg.model, a800_pcie_hardware())
    need = min(_working_sets(cfg).values())
    just_enough = cfg.replace(cluster=ClusterConfig(gpus_per_node=4, gpu_memory_bytes=need))
    assert choose_num_stages(just_enough, cost) in candidate_stages(cfg)
    too_small = cfg.replace(cluster=ClusterConfig(gpus_per_node=4, gpu_memory_bytes=need - 1))
    with pytest.raises(ConfigError) as err:
        choose_num_stages(too_small, cost)
    msg = str(err.value)
    assert f"MoE-S-8 does not fit {(need - 1) / 1e9:.1f} GB" in msg
    assert f"smallest working set {need / 1e9:.1f} GB" in msg
    assert "more GPUs" in msg


def test_build_plan_needs_stages_or_a_cost() -> None:
    cfg = _paper_cfg(Pipeline.MOBIUS, 80 * 10**9)
    with pytest.raises(ConfigError, match="--num_stages"):
        build_plan(cfg)
    plan = build_plan(cfg, AnalyticCost(cfg.model, a800_pcie_hardware()))
    assert plan.num_stages == choose_num_stages(cfg, AnalyticCost(cfg.model, a800_pcie_hardware()))


@pytest.mark.parametrize("pipeline", ["GPipe", "GPipeOffload", "Mobius", "APTMoE"])
def test_every_send_is_posted_after_the_pass_that_computes_it(pipeline):
    """Plan.sends_by_producer, the one rule both back-ends follow for who posts a send: each of a
    rank's sends once, after its stage's forward (activations) or backward (gradients) of the
    same micro-batch, in the net program's order."""
    plan = build_plan(make_tiny_config(pipeline, ranks=2, stages=None if pipeline == "GPipe" else 4))
    for rank in range(plan.num_ranks):
        sends = [a for a in plan.programs[rank]["net"] if a.kind in (Kind.SEND_F, Kind.SEND_B)]
        by = plan.sends_by_producer(rank)
        assert sends and sorted(map(str, sends)) == sorted(str(s) for ss in by.values() for s in ss)
        for producer, ss in by.items():
            for s in ss:
                want = Kind.FWD if s.kind is Kind.SEND_F else Kind.BWD
                assert (producer.kind, producer.stage, producer.mb) == (want, s.stage, s.mb), (producer, s)
            assert ss == sorted(ss, key=plan.programs[rank]["net"].index)
