"""Loading policies: scripted event sequences with the expected copy order, and a whole plan
driven through a tiny instant-copy back-end."""

from __future__ import annotations

import numpy as np
import pytest

from aptmoe.affinity import split_experts
from aptmoe.analytic_cost import AnalyticCost, a800_pcie_hardware, h200_hardware
from aptmoe.config import ClusterConfig, Pipeline, PopularityConfig, RunConfig, ScheduleConfig, TrainConfig, moe_model
from aptmoe.plan.actions import Block, BlockKind, Kind
from aptmoe.plan.builders import build_plan
from aptmoe.plan.plan import STREAMS, Plan
from aptmoe.plan.validate import dry_run
from aptmoe.policy import PHASES, AptmoePolicy, Copy, Placement, StagePolicy, make_policy

E = 8
MODEL = moe_model("S", E, num_layers=8)          # real widths, so the Eq.-1 split is meaningful
COST = AnalyticCost(MODEL, a800_pcie_hardware())
THREADS = 14
T = 512                                          # tokens per micro-batch below (4 sequences of 128)


def cfg_for(pipeline: str, *, stages: int = 4, micro_batches: int = 2, fwd_only: bool = False,
            inter_stage_only: bool = False, layers: int = 8, recompute: str = "auto") -> RunConfig:
    return RunConfig(model=MODEL.with_(num_layers=layers), cluster=ClusterConfig(gpus_per_node=2),
                     train=TrainConfig(batch_size=4 * micro_batches, num_chunks=micro_batches),
                     schedule=ScheduleConfig(pipeline=Pipeline.parse(pipeline), num_stages=stages, fwd_only=fwd_only,
                                             inter_stage_only=inter_stage_only, recompute=recompute),
                     popularity=PopularityConfig(gini=0.3))


def aptmoe_policy(rank: int = 0, *, stages: int = 4, inter_stage_only: bool = False) -> AptmoePolicy:
    plan = build_plan(cfg_for("APTMoE", stages=stages, inter_stage_only=inter_stage_only,
                              layers=8 if 8 % stages == 0 else stages))
    return AptmoePolicy(plan, rank, MODEL, COST, threads=THREADS, inter_stage_only=inter_stage_only)


def stage_policy(rank: int = 0, **kw) -> StagePolicy:
    return StagePolicy(build_plan(cfg_for("Mobius", **kw)), rank, MODEL)


def drain(policy, limit: int = 10_000) -> list[Copy]:
    """Copy until the policy has nothing left; every copy completes at once, in order."""
    out = []
    while (c := policy.next_copy()) is not None:
        policy.copy_finished(c)
        out.append(c)
        assert len(out) < limit
    return out


def names(copies) -> list[str]:
    return [str(c.action) for c in copies]


def queued(policy: AptmoePolicy, phase: str) -> set[tuple[int, Block]]:
    return set(policy.queues[phase].items)


def attn(layer):
    return Block.attn(layer)


def gate(layer):
    return Block.gate(layer)


def ex(layer, e):
    return Block.expert_of(layer, e)


# --------------------------------------------------------------------------- StagePolicy


def test_stage_policy_forward_loads_every_block_in_layer_order() -> None:
    p = stage_policy(0)
    assert p.layers == {0: (0, 1), 2: (4, 5)}
    p.stage_load_begins(0, "F")
    got = drain(p)
    want = [f"0LF@{l}:{k}" for l in (0, 1) for k in ["a", "g"] + [f"e{e}" for e in range(E)]]
    assert names(got) == want
    assert {c.phase for c in got} == {"stage"}
    assert all(c.nbytes == MODEL.block_bytes(c.block.kind.value) for c in got)
    assert all(p.is_loaded(0, c.block) for c in got)
    assert drain(p) == []                          # nothing twice


def test_stage_policy_backward_without_recompute_walks_layers_in_reverse() -> None:
    p = stage_policy(0, recompute="none")
    p.stage_load_begins(2, "B")
    got = drain(p)
    layers = [c.block.layer for c in got]
    assert layers == sorted(layers, reverse=True) and layers[0] == 5
    # within a layer, in the order the backward uses them: experts, gate, attention
    assert names(got)[:E + 2] == [f"2LB@5:e{e}" for e in range(E)] + ["2LB@5:g", "2LB@5:a"]
    assert {c.block for c in got} == set(p.stage_blocks(2)) and len(got) == 2 * (E + 2)
    assert all(str(c.action).startswith("2LB@") for c in got)


def test_stage_policy_backward_with_recompute_loads_in_forward_order() -> None:
    p = stage_policy(0)                      # offload schedules recompute by default
    p.stage_load_begins(2, "B")
    want = [f"2LB@{l}:{k}" for l in (4, 5) for k in ["a", "g"] + [f"e{e}" for e in range(E)]]
    assert names(drain(p)) == want


def test_stage_policy_require_jumps_the_queue() -> None:
    p = stage_policy(0)
    woken = []
    p.on_work = lambda: woken.append(1)
    p.stage_load_begins(0, "F")
    assert woken
    first = p.next_copy()
    assert first.block == attn(0)
    p.require(0, "F", ex(1, 5))
    p.require(0, "F", attn(0))                     # in flight: not queued again
    second = p.next_copy()
    assert second.block == ex(1, 5)
    p.copy_finished(first)
    p.copy_finished(second)
    rest = drain(p)
    blocks = [first.block, second.block] + [c.block for c in rest]
    assert len(blocks) == len(set(blocks)) == 2 * (E + 2)


def test_stage_policy_places_every_expert_on_the_gpu() -> None:
    p = stage_policy(0)
    assert p.gate_counts(0, 0, 0, [0, 3, 0, 1, 0, 0, 0, 9]) == Placement((1, 3, 7), ())
    assert p.backward_placement(0, 0) == Placement(tuple(range(E)), ())


def test_stage_policy_drop_forgets_the_stage() -> None:
    p = stage_policy(0)
    p.stage_load_begins(0, "F")
    c = p.next_copy()
    p.stage_dropped(0)
    p.copy_finished(c)                             # a copy that lands after the drop
    assert not p.is_loaded(0, c.block)
    assert p.next_copy() is None
    p.stage_load_begins(0, "B")                    # reloaded for the backward: every block again
    assert len(drain(p)) == 2 * (E + 2)


# --------------------------------------------------------------------------- AptmoePolicy: inter-stage


def _expected_inter_stage(stage: int, layers, ranks: dict[int, list[int]]) -> list[str]:
    out = [f"{stage}LF@{l}:{k}" for l in layers for k in ("a", "g")]
    out += [f"{stage}LF@{l}:e{ranks[l][r]}" for r in range(E) for l in layers]
    return out


def test_inter_stage_order_without_history() -> None:
    p = aptmoe_policy()
    p.stage_load_begins(0, "F")
    got = drain(p)
    assert names(got) == _expected_inter_stage(0, (0, 1), {0: list(range(E)), 1: list(range(E))})
    assert {c.phase for c in got} == {"inter-stage"}


def test_inter_stage_order_follows_previous_iteration_popularity() -> None:
    p = aptmoe_policy(inter_stage_only=True)       # keeps the gate from queueing anything itself
    p.stage_load_begins(0, "F")
    counts = {  # (layer, mb) -> tokens per expert
        (0, 0): [10, 0, 50, 0, 5, 100, 0, 347], (0, 1): [10, 1, 50, 0, 5, 100, 0, 346],
        (1, 0): [0, 0, 0, 400, 0, 12, 100, 0], (1, 1): [0, 200, 0, 100, 0, 12, 0, 200],
    }
    for (layer, mb), c in counts.items():
        p.gate_counts(0, layer, mb, c)
    p.stage_dropped(0)
    p.end_iteration()
    # summed: layer 0 [20, 1, 100, 0, 10, 200, 0, 693]; layer 1 [0, 200, 0, 500, 0, 24, 100, 200]
    ranks = {0: [7, 5, 2, 0, 4, 1, 3, 6], 1: [3, 1, 7, 6, 5, 0, 2, 4]}
    p.stage_load_begins(0, "F")
    assert names(drain(p)) == _expected_inter_stage(0, (0, 1), ranks)


def test_prime_history_orders_the_first_step() -> None:
    p = aptmoe_policy()
    totals = [[0] * E for _ in range(MODEL.num_layers)]
    totals[0] = [1, 2, 3, 4, 5, 6, 7, 8]
    totals[1] = [9, 0, 0, 0, 0, 0, 0, 8]
    p.prime_history(totals)
    p.stage_load_begins(0, "F")
    ranks = {0: [7, 6, 5, 4, 3, 2, 1, 0], 1: [0, 7, 1, 2, 3, 4, 5, 6]}
    assert names(drain(p)) == _expected_inter_stage(0, (0, 1), ranks)


def test_forward_placement_is_what_the_gate_decided() -> None:
    p = aptmoe_policy()
    p.stage_load_begins(0, "F")
    placement = p.gate_counts(0, 0, 1, [300, 100, 50, 30, 20, 10, 2, 0])
    assert p.forward_placement(0, 1) == placement
    assert p.forward_placement(0, 0) is None
    p.end_iteration()
    assert p.forward_placement(0, 1) is None
    assert stage_policy().forward_placement(0, 0) is None          # Mobius: every expert on the GPU


def test_stage_switch_moves_attention_and_gates_down_and_drops_speculative_experts() -> None:
    p = aptmoe_policy()
    p.stage_load_begins(0, "F")
    first = p.next_copy()
    assert first.block == attn(0)
    p.require(0, "F", attn(0))                      # stage 0's compute waits for its first block
    p.stage_load_begins(2, "F")
    assert {s for s, _ in queued(p, "inter-stage")} == {2}
    assert queued(p, "inter-layer") == {(0, gate(0)), (0, attn(1)), (0, gate(1))}
    assert not any(s == 0 and b.kind is BlockKind.EXPERT for q in PHASES for s, b in queued(p, q))
    p.copy_finished(first)
    got = drain(p)
    assert names(got[:3]) == ["0LF@0:g", "0LF@1:a", "0LF@1:g"]
    assert [c.phase for c in got[:3]] == ["inter-layer"] * 3
    assert names(got[3:]) == _expected_inter_stage(2, (4, 5), {4: list(range(E)), 5: list(range(E))})


def test_a_window_whose_compute_has_not_begun_keeps_its_place_ahead_of_the_next() -> None:
    """At a step's start a rank opens two windows at once: the first stage, needed first,
    keeps its inter-stage phase (it was dropped for the second's, and its forward then waited
    for every expert), and the second's queues behind it."""
    p = aptmoe_policy()
    p.stage_load_begins(0, "F")
    first = p.next_copy()
    p.stage_load_begins(2, "F")
    assert {s for s, _ in queued(p, "inter-stage")} == {0, 2} and not queued(p, "inter-layer")
    p.copy_finished(first)
    ids = {layer: list(range(E)) for layer in (0, 1, 4, 5)}
    assert [str(first.action)] + names(drain(p)) == (_expected_inter_stage(0, (0, 1), ids)
                                                     + _expected_inter_stage(2, (4, 5), ids))


def _forward_stages(p: AptmoePolicy, stages_layers, counts) -> None:
    """Run the forward residencies of `stages_layers` [(stage, layers)], every micro-batch with `counts`."""
    for s, layers in stages_layers:
        p.stage_load_begins(s, "F")
        for layer in layers:
            for mb in range(p.M):
                p.gate_counts(s, layer, mb, counts)
        drain(p)
        p.stage_dropped(s)


def test_backward_inter_stage_order_uses_this_steps_forward() -> None:
    p = aptmoe_policy()
    p.prime_history([[1] * E] * MODEL.num_layers)          # last step: a tie, so id order
    _forward_stages(p, [(0, (0, 1))], [5, 0, 0, 9, 0, 0, 7, 1])
    p.stage_load_begins(0, "B")
    # this step's forward, summed over micro-batches, ranks e3 > e6 > e0 > e7 > e1 = e2 = e4 = e5;
    # the backward recomputes first, so layers come in forward order
    order = [3, 6, 0, 7, 1, 2, 4, 5]
    want = [f"0LB@{l}:{k}" for l in (0, 1) for k in ("a", "g")]
    want += [f"0LB@{l}:e{order[r]}" for r in range(E) for l in (0, 1)]
    assert names(drain(p)) == want


def test_stage_switch_in_backward_keeps_the_gpu_experts() -> None:
    p = aptmoe_policy(stages=6)                    # rank 0 owns 0, 2, 4: residencies 0F 2F 4FB 2B 0B
    assert p.layers == {0: (0,), 2: (2,), 4: (4,)}
    hot = [300, 100, 50, 30, 20, 10, 2, 0]
    _forward_stages(p, [(0, (0,)), (2, (2,))], hot)
    p.adam_done(10**12)                            # stage 4's update is over: the CPU is free
    p.stage_load_begins(2, "B")
    placement = p.backward_placement(2, 2)
    assert placement.gpu and placement.cpu
    assert queued(p, "inter-expert") == {(2, ex(2, e)) for e in placement.gpu}
    assert not any((2, ex(2, e)) in p.queues[ph] for e in placement.cpu for ph in PHASES)
    p.stage_load_begins(0, "B")                    # before any of stage 2's backward copies ran
    assert queued(p, "inter-layer") == {(2, attn(2)), (2, gate(2))}
    assert queued(p, "inter-expert") == {(2, ex(2, e)) for e in placement.gpu}
    assert {s for s, _ in queued(p, "inter-stage")} == {0}
    got = drain(p)
    assert {c.block for c in got if c.stage == 2} == {attn(2), gate(2)} | {ex(2, e) for e in placement.gpu}


def test_stage_switch_before_the_backward_decision_drops_speculative_experts() -> None:
    """Later in a step a window opens as the stage before it starts to compute: that stage's
    speculative experts are dropped, and its backward decision demands what it places."""
    p = aptmoe_policy(stages=6)
    hot = [300, 100, 50, 30, 20, 10, 2, 0]
    _forward_stages(p, [(0, (0,)), (2, (2,))], hot)
    p.stage_load_begins(2, "B")
    p.stage_load_begins(0, "B")
    assert not any(s == 2 and b.kind is BlockKind.EXPERT for ph in PHASES for s, b in queued(p, ph))
    placement = p.backward_placement(2, 2)          # decided later: the missing GPU experts are demanded
    assert queued(p, "inter-expert") == {(2, ex(2, e)) for e in placement.gpu}


def test_at_a_steps_start_the_first_stage_keeps_what_last_step_says_it_will_load() -> None:
    """Both windows open before the rank computes anything: the first stage, needed first,
    keeps its attention and gates and the experts last step's counts say the split will
    load (per micro-batch, all of them to come), ahead of the second stage's inter-stage."""
    p = aptmoe_policy()
    hot = [300, 100, 50, 30, 20, 10, 2, 0]
    p.prime_history([[c * p.M for c in hot]] * MODEL.num_layers)
    p.stage_load_begins(0, "F")
    p.stage_load_begins(2, "F")
    heads = {layer: split_experts(hot, COST, MODEL, threads=THREADS, load_attn_gate=True,
                                  remaining_mbs=p.M, direction="fwd").to_load for layer in (0, 1)}
    assert 0 < len(heads[0]) < E
    assert queued(p, "inter-layer") == ({(0, b) for layer in (0, 1) for b in (attn(layer), gate(layer))}
                                        | {(0, ex(layer, e)) for layer in (0, 1) for e in heads[layer]})
    assert {s for s, _ in queued(p, "inter-stage")} == {2}
    got = drain(p)
    first = [c for c in got if c.stage == 0]
    assert got[:len(first)] == first and {c.phase for c in first} == {"inter-layer"}


def test_later_in_a_step_a_forward_not_begun_keeps_what_last_step_says_it_will_load() -> None:
    """Rank 0 owns stages 0, 2 and 4 of six. Stage 2's forward window opens while stage 0
    computes; stage 4's opens before stage 2's first input has come (it comes from another
    rank): stage 2 keeps last step's head, ahead of stage 4's inter-stage, rather than
    demanding each expert behind stage 4's copies. Once a predictor gate has spoken for it,
    or its compute has begun, a stage switch drops its speculative experts as before."""
    hot = [300, 100, 50, 30, 20, 10, 2, 0]
    M = aptmoe_policy(stages=6).M
    head = split_experts(hot, COST, MODEL, threads=THREADS, load_attn_gate=True, remaining_mbs=M,
                         direction="fwd").to_load
    assert 0 < len(head) < E

    def stage_2_then_4(predicted: bool, begun: bool) -> AptmoePolicy:
        p = aptmoe_policy(stages=6)
        p.prime_history([[c * p.M for c in hot]] * MODEL.num_layers)
        _forward_stages(p, [(0, (0,))], hot)                 # stage 0 computed: the rank has begun
        p.stage_load_begins(2, "F")
        if predicted:
            p.predicted_counts(2, 2, 0, [0] * (E - 1) + [400])   # the predictor says: e7 alone
        if begun:
            p.require(2, "F", attn(2))
        p.stage_load_begins(4, "F")
        return p

    kept = stage_2_then_4(predicted=False, begun=False)
    assert {b for s, b in queued(kept, "inter-layer") if s == 2} == {attn(2), gate(2)} | {ex(2, e) for e in head}
    assert {s for s, _ in queued(kept, "inter-stage")} == {4}
    got = drain(kept)
    assert {c.stage for c in got[:len(head) + 2]} == {2}

    spoken = stage_2_then_4(predicted=True, begun=False)
    assert {b for s, b in queued(spoken, "inter-layer") if s == 2 and b.kind is BlockKind.EXPERT} <= {ex(2, 7)}
    begun = stage_2_then_4(predicted=False, begun=True)
    assert not any(s == 2 and b.kind is BlockKind.EXPERT for ph in PHASES for s, b in queued(begun, ph))


def test_backward_does_not_load_experts_without_tokens() -> None:
    """An expert that got no token in the whole forward has no backward work: once the
    backward placement is fixed, copying it only wastes the link and GPU memory."""
    p = aptmoe_policy()
    _forward_stages(p, [(0, (0, 1))], [300, 100, 50, 30, 20, 10, 2, 0])
    p.stage_load_begins(0, "B")
    for layer in (1, 0):
        placement = p.backward_placement(0, layer)
        assert 7 not in placement.gpu + placement.cpu
    got = drain(p)
    useless = [str(c.action) for c in got if c.block.kind is BlockKind.EXPERT
               and c.block.expert not in p.backward_placement(0, c.block.layer).gpu]
    assert useless == []


# --------------------------------------------------------------------------- inter-layer and inter-expert


def test_predicted_counts_enqueue_and_are_revised_per_micro_batch() -> None:
    p = aptmoe_policy()
    p.stage_load_begins(0, "F")
    drain_first = [p.next_copy() for _ in range(4)]          # MHA and gates of layers 0 and 1
    for c in drain_first:
        p.copy_finished(c)
    pred0 = [0, 500, 12, 0, 0, 0, 0, 0]
    want0 = split_experts(pred0, COST, MODEL, threads=THREADS, resident=(), load_attn_gate=False,
                          remaining_mbs=2, direction="fwd").to_load
    assert want0 == (1,)
    p.predicted_counts(0, 1, 0, pred0)
    assert {b for s, b in queued(p, "inter-layer")} == {ex(1, 1)}
    assert (0, ex(1, 1)) not in p.queues["inter-stage"]
    pred1 = [500, 0, 12, 0, 0, 0, 0, 0]                      # the next micro-batch predicts otherwise
    p.predicted_counts(0, 1, 1, pred1)
    assert {b for s, b in queued(p, "inter-layer")} == {ex(1, 0)}
    c = p.next_copy()
    assert (c.block, c.phase) == (ex(1, 0), "inter-layer")


def test_gate_counts_queue_the_gpu_head_and_return_the_cpu_tail() -> None:
    p = aptmoe_policy()
    p.stage_load_begins(0, "F")
    counts = [300, 100, 50, 30, 20, 10, 2, 0]
    split = split_experts(counts, COST, MODEL, threads=THREADS, resident=(), load_attn_gate=False,
                          remaining_mbs=2, direction="fwd")
    placement = p.gate_counts(0, 0, 0, counts)
    assert placement == Placement(split.gpu, split.cpu)
    assert placement.cpu == (3, 4, 5, 6) and 7 not in placement.gpu + placement.cpu
    assert queued(p, "inter-expert") == {(0, ex(0, e)) for e in split.to_load}
    got = [p.next_copy() for _ in split.to_load]
    assert [c.block.expert for c in got] == list(split.to_load)           # popularity order
    assert {c.phase for c in got} == {"inter-expert"}


def test_an_expert_whose_copy_lands_too_late_runs_on_the_cpu_this_micro_batch() -> None:
    """Experts of even popularity on a slow link: the split loads six and leaves two to the
    CPU for both micro-batches. The sixth copy lands after six loads (8.1 ms); the CPU gets
    through the two and the sixth's 70 tokens in 5.9 ms, so this micro-batch runs it there
    while its copy stays queued for the next; the fifth would keep the CPU past its copy's
    landing. The last micro-batch takes the split as it is."""
    p = aptmoe_policy()
    p.stage_load_begins(0, "F")
    counts = [120, 110, 100, 90, 80, 70, 60, 50]
    split = split_experts(counts, COST, MODEL, threads=THREADS, remaining_mbs=2, direction="fwd")
    assert split.to_load == (0, 1, 2, 3, 4, 5) and split.cpu == (6, 7)
    cpu = {e: COST.cpu_expert_s(counts[e], "fwd", THREADS) for e in range(E)}
    load = p._block_load_s[BlockKind.EXPERT]
    gpu = {e: COST.gpu_s("e", counts[e], "fwd") for e in range(E)}
    assert cpu[6] + cpu[7] + cpu[5] <= 6 * load + gpu[5]                    # e5: the CPU first
    assert cpu[6] + cpu[7] + cpu[5] + cpu[4] > 5 * load + gpu[4]            # e4: its copy first
    placement = p.gate_counts(0, 0, 0, counts)
    assert placement == Placement((0, 1, 2, 3, 4), (6, 7, 5))
    assert (0, ex(0, 5)) in queued(p, "inter-expert")
    resident = p._resident_experts(0, 0)
    final = split_experts(counts, COST, MODEL, threads=THREADS, resident=resident, remaining_mbs=1, direction="fwd")
    assert final.to_load                                    # it loads more, and still waits for it
    assert p.gate_counts(0, 0, 1, counts) == Placement(final.gpu, final.cpu)


def test_gate_counts_keep_resident_experts_on_the_gpu() -> None:
    p = aptmoe_policy()
    p.stage_load_begins(0, "F")
    # load attention, gates and the first expert rank of both layers (e0 of layers 0 and 1)
    for _ in range(6):
        p.copy_finished(p.next_copy())
    assert p.is_loaded(0, ex(0, 0)) and not p.is_loaded(0, ex(0, 1))
    counts = [1, 1, 1, 1, 1, 1, 1, 505]
    placement = p.gate_counts(0, 0, 0, counts)
    split = split_experts(counts, COST, MODEL, threads=THREADS, resident={0}, remaining_mbs=2)
    assert placement == Placement(split.gpu, split.cpu)
    assert 0 in placement.gpu and 7 in placement.gpu


def test_priority_inter_expert_then_inter_layer_then_inter_stage() -> None:
    p = aptmoe_policy()
    p.stage_load_begins(0, "F")
    p.predicted_counts(0, 1, 0, [0, 500, 12, 0, 0, 0, 0, 0])
    p.gate_counts(0, 0, 0, [300, 100, 50, 30, 20, 10, 2, 0])
    assert all(len(p.queues[ph]) for ph in PHASES)
    got = drain(p)
    ranks = [PHASES.index(c.phase) for c in got]
    assert ranks == sorted(ranks) and set(ranks) == {0, 1, 2}
    assert [c.block for c in got[:4]] == [ex(0, 0), ex(0, 1), ex(0, 2), ex(1, 1)]


def test_require_jumps_ahead_of_everything() -> None:
    p = aptmoe_policy()
    p.stage_load_begins(0, "F")
    p.gate_counts(0, 0, 0, [300, 100, 50, 30, 20, 10, 2, 0])
    p.require(0, "F", ex(1, 6))
    c = p.next_copy()
    assert (c.block, c.phase) == (ex(1, 6), "inter-expert")
    p.require(0, "F", ex(0, 2))                      # already queued: moved to the front
    assert p.next_copy().block == ex(0, 2)


def test_in_flight_blocks_are_not_copied_twice() -> None:
    p = aptmoe_policy()
    p.stage_load_begins(0, "F")
    for _ in range(4):
        p.copy_finished(p.next_copy())
    p.gate_counts(0, 0, 0, [300, 100, 50, 30, 20, 10, 2, 0])
    flying = p.next_copy()
    assert flying.block == ex(0, 0) and not p.is_loaded(0, flying.block)
    # more demand for the same expert while it is on the link
    p.require(0, "F", flying.block)
    p.predicted_counts(0, 0, 1, [300, 100, 50, 30, 20, 10, 2, 0])
    placement1 = p.gate_counts(0, 0, 1, [300, 100, 50, 30, 20, 10, 2, 0])
    assert 0 in placement1.gpu
    assert not any((0, flying.block) in p.queues[ph] for ph in PHASES)
    rest = drain(p)
    assert flying.block not in [c.block for c in rest]
    p.copy_finished(flying)
    assert p.is_loaded(0, flying.block)
    blocks = [c.block for c in rest]
    assert len(blocks) == len(set(blocks))


def test_copy_finished_marks_loaded_and_stage_dropped_clears() -> None:
    p = aptmoe_policy()
    p.stage_load_begins(0, "F")
    p.gate_counts(0, 0, 0, [300, 100, 50, 30, 20, 10, 2, 0])
    c = p.next_copy()
    assert not p.is_loaded(0, c.block)
    p.copy_finished(c)
    assert p.is_loaded(0, c.block)
    p.stage_load_begins(2, "F")
    p.predicted_counts(0, 1, 0, [0, 500, 12, 0, 0, 0, 0, 0])
    p.stage_dropped(0)
    assert not p.is_loaded(0, c.block)
    assert not any(s == 0 for ph in PHASES for s, _ in queued(p, ph))
    assert not any(s == 0 for s, _ in p.required)
    assert {c.stage for c in drain(p)} == {2}


def test_backward_placement_fixed_once_from_summed_forward_counts() -> None:
    p = aptmoe_policy()
    p.stage_load_begins(0, "F")
    mbs = [[300, 100, 50, 30, 20, 10, 2, 0], [10, 20, 30, 0, 0, 0, 400, 52]]
    totals = {0: np.add(*mbs), 1: np.add(*mbs)[::-1]}
    for mb, c in enumerate(mbs):
        p.gate_counts(0, 0, mb, c)
        p.gate_counts(0, 1, mb, c[::-1])
    drain(p)
    p.stage_dropped(0)
    p.adam_done(10**12)                             # stage 2's update is over: the CPU is free
    p.stage_load_begins(0, "B")
    for _ in range(4 + 2):                          # MHA + gates, then the top expert of both layers
        p.copy_finished(p.next_copy())
    resident = {1: {1}, 0: {6}}                     # layer 1 totals [52, 402, ...]: e1; layer 0: e6 (402)
    assert {l: {e for e in range(E) if p.is_loaded(0, ex(l, e))} for l in (0, 1)} == resident
    before = {}
    for layer in (1, 0):
        split = split_experts([int(x) for x in totals[layer]], COST, MODEL, threads=THREADS,
                              resident=resident[layer], load_attn_gate=False, remaining_mbs=1, direction="bwd")
        before[layer] = p.backward_placement(0, layer)
        assert before[layer] == Placement(split.gpu, split.cpu)
        assert set(resident[layer]) <= set(before[layer].gpu)
    got = drain(p)                                    # loading changes residency ...
    assert {c.pass_ for c in got} == {"B"}
    for layer in (0, 1):
        assert all(p.is_loaded(0, ex(layer, e)) for e in before[layer].gpu)
        assert not any(p.is_loaded(0, ex(layer, e)) for e in before[layer].cpu)
    p.gate_counts(0, 0, 0, [0] * 7 + [999])           # ... and so would new counts: the decision stands
    assert {layer: p.backward_placement(0, layer) for layer in (0, 1)} == before
    p.stage_dropped(0)                                # a new residency decides again
    p.stage_load_begins(0, "B")
    assert p.backward_placement(0, 0) != before[0]


def test_inter_stage_only_puts_only_resident_experts_on_the_gpu() -> None:
    p = aptmoe_policy(inter_stage_only=True)
    p.stage_load_begins(0, "F")
    for _ in range(4 + 2 * 3):                       # MHA + gates, then expert ranks 0..2 of both layers
        p.copy_finished(p.next_copy())
    assert {e for e in range(E) if p.is_loaded(0, ex(0, e))} == {0, 1, 2}
    p.predicted_counts(0, 1, 0, [0, 500, 12, 0, 0, 0, 0, 0])
    placement = p.gate_counts(0, 0, 0, [0, 1, 50, 30, 0, 0, 400, 31])
    assert placement == Placement((1, 2), (3, 6, 7))
    assert not len(p.queues["inter-expert"]) and not len(p.queues["inter-layer"])


def test_make_policy() -> None:
    assert make_policy(build_plan(cfg_for("GPipe", stages=2)), 0, MODEL, None, threads=1) is None
    assert isinstance(make_policy(build_plan(cfg_for("Mobius")), 0, MODEL, None, threads=1), StagePolicy)
    assert isinstance(make_policy(build_plan(cfg_for("APTMoE")), 1, MODEL, COST, threads=1), AptmoePolicy)
    with pytest.raises(ValueError, match="cost source"):
        make_policy(build_plan(cfg_for("APTMoE")), 0, MODEL, None, threads=1)


# --------------------------------------------------------------------------- fake back-end


class InstantBackend:
    """Walks one rank's actions in dry-run order; one copy lands after each action, and a
    block compute needs is `require`d and copied at once. Checks that compute never uses a
    block that is not loaded and that no block is copied twice within one residency."""

    def __init__(self, plan: Plan, rank: int, policy, seed: int = 0) -> None:
        self.plan, self.rank, self.policy = plan, rank, policy
        self.rng = np.random.default_rng(seed)
        start = dry_run(plan).start
        mine = [(start[a], STREAMS.index(s), i, a) for i, (r, s, a) in enumerate(plan.actions()) if r == rank]
        self.order = [a for *_, a in sorted(mine)]
        self.layers = {st.index: st.layers for st in plan.stages}
        self.residency: dict[int, tuple[str, set[Block]]] = {}
        self.seen: dict[tuple[int, int], list[int]] = {}     # (layer, mb) -> this step's counts
        self.copied_bytes = 0
        self.cpu_expert_runs = 0
        self.demand_waits = 0

    def pump(self, n: int) -> None:
        for _ in range(n):
            c = self.policy.next_copy()
            if c is None:
                return
            assert c.stage in self.residency, f"{c.action} copied outside the stage's residency"
            blocks = self.residency[c.stage][1]
            assert c.block not in blocks, f"{c.action} copied twice in one residency"
            blocks.add(c.block)
            self.copied_bytes += c.nbytes
            self.policy.copy_finished(c)

    def use(self, stage: int, block: Block) -> None:
        if not self.policy.is_loaded(stage, block):
            self.demand_waits += 1
            self.policy.require(stage, self.residency[stage][0], block)
            for _ in range(2 * len(self.plan.stages) * (MODEL.num_experts + 2) * 4):
                self.pump(1)
                if self.policy.is_loaded(stage, block):
                    break
        assert self.policy.is_loaded(stage, block), f"{stage}:{block} used before it was loaded"

    def counts(self) -> list[int]:
        shares = self.rng.dirichlet(np.full(E, 0.3))
        return [int(x) for x in self.rng.multinomial(T, shares)]

    def forward(self, stage: int, mb: int) -> None:
        layers = self.layers[stage]
        for i, layer in enumerate(layers):
            self.use(stage, attn(layer))
            self.use(stage, gate(layer))
            if i + 1 < len(layers):                  # a predictor one layer ahead
                self.policy.predicted_counts(stage, layers[i + 1], mb, self.counts())
            counts = self.seen[(layer, mb)] = self.counts()
            placement = self.policy.gate_counts(stage, layer, mb, counts)
            self.check_placement(placement, counts)
            for e in placement.gpu:
                self.use(stage, ex(layer, e))
            self.cpu_expert_runs += len(placement.cpu)
            self.pump(1)

    def backward(self, stage: int, mb: int) -> None:
        """As the simulator runs it: recompute the forward (experts where their backward
        runs), then the layers in reverse; GPU experts with tokens in this micro-batch."""
        layers = self.layers[stage]
        if self.plan.recomputes(mb):
            for layer in layers:
                self.use(stage, attn(layer))
                self.use(stage, gate(layer))
                for e in self.policy.backward_placement(stage, layer).gpu:
                    if self.seen[(layer, mb)][e]:
                        self.use(stage, ex(layer, e))
                self.pump(1)
        for layer in reversed(layers):
            placement = self.policy.backward_placement(stage, layer)
            assert not set(placement.gpu) & set(placement.cpu)
            assert {e for e in range(E) if self.seen[(layer, mb)][e]} <= set(placement.gpu + placement.cpu)
            for e in placement.gpu:
                if self.seen[(layer, mb)][e]:
                    self.use(stage, ex(layer, e))
            self.use(stage, gate(layer))
            self.use(stage, attn(layer))
            self.pump(1)

    @staticmethod
    def check_placement(placement: Placement, counts: list[int]) -> None:
        assert not set(placement.gpu) & set(placement.cpu)
        assert {e for e in placement.gpu + placement.cpu if counts[e] > 0} == {e for e in range(E) if counts[e]}

    def iteration(self) -> None:
        for a in self.order:
            if a.kind in (Kind.LOAD_F, Kind.LOAD_B):
                assert a.stage not in self.residency
                self.residency[a.stage] = ("B" if a.kind is Kind.LOAD_B else "F", set())
                self.policy.stage_load_begins(a.stage, self.residency[a.stage][0])
            elif a.kind in (Kind.DROP_F, Kind.DROP_B):
                self.policy.stage_dropped(a.stage)
                del self.residency[a.stage]
            elif a.kind is Kind.FWD:
                self.forward(a.stage, a.mb)
            elif a.kind is Kind.BWD:
                self.backward(a.stage, a.mb)
            self.pump(1)
        assert not self.residency
        self.seen.clear()
        self.policy.end_iteration()


@pytest.mark.parametrize("pipeline, fwd_only, inter_stage_only", [
    ("Mobius", False, False), ("GPipeOffload", False, False), ("Mobius", True, False),
    ("APTMoE", False, False), ("APTMoE", True, False), ("APTMoE", False, True),
])
@pytest.mark.parametrize("stages", [4, 8])
def test_policy_through_a_whole_plan(pipeline: str, fwd_only: bool, inter_stage_only: bool, stages: int) -> None:
    plan = build_plan(cfg_for(pipeline, stages=stages, fwd_only=fwd_only, inter_stage_only=inter_stage_only,
                              micro_batches=3))
    for rank in range(plan.num_ranks):
        policy = make_policy(plan, rank, MODEL, COST, threads=THREADS)
        backend = InstantBackend(plan, rank, policy, seed=rank)
        for _ in range(2):                            # the second iteration has history
            backend.iteration()
        if plan.policy == "stage":                    # every block of every residency, once per iteration
            residencies = len(plan.programs[rank]["load"])
            stage_bytes = len(plan.stages[0].layers) * MODEL.layer_params * MODEL.dtype_bytes
            assert backend.copied_bytes == 2 * residencies * stage_bytes
            assert backend.cpu_expert_runs == 0
        else:
            assert backend.cpu_expert_runs > 0        # skewed counts send some experts to the CPU


def _queued_items(policy: AptmoePolicy) -> set[tuple]:
    """(phase, stage, block, its key) of every queued copy: a demand re-queues a block at the
    head of its phase (a new key)."""
    return {(phase, s, b, key) for phase, q in policy.queues.items() for (s, b), (key, _) in q.items.items()}


@pytest.mark.parametrize("stages", [4, 8])
def test_aptmoe_wakes_the_copy_engine_only_for_a_copy_it_queued(stages: int) -> None:
    """`on_work` wakes the executor's copy engine thread (the GIL and the policy's lock, taken
    from the issuing thread): every call of the compute side that queues a block (or moves
    one up: to a higher phase, to the head of its own) wakes it, and no other does. Through two iterations of a plan the
    gates' and predictors' counts queue something a few times only, so most calls stay quiet."""
    plan = build_plan(cfg_for("APTMoE", stages=stages, micro_batches=3))
    calls, quiet = 0, 0
    for rank in range(plan.num_ranks):
        policy = make_policy(plan, rank, MODEL, COST, threads=THREADS)
        woke: list[int] = []
        policy.on_work = lambda: woke.append(1)

        def watched(fn):
            def call(*args):
                nonlocal calls, quiet
                before, n = _queued_items(policy), len(woke)
                out = fn(*args)
                gained = bool(_queued_items(policy) - before)
                assert (len(woke) > n) == gained, (fn.__name__, args[:2], gained)
                calls += 1
                quiet += not gained
                return out
            return call

        for name in ("gate_counts", "predicted_counts", "backward_placement", "require"):
            setattr(policy, name, watched(getattr(policy, name)))
        backend = InstantBackend(plan, rank, policy, seed=rank)
        for _ in range(2):
            backend.iteration()
    assert calls > 0 and quiet > calls // 2, (calls, quiet)


# --------------------------------------------------------------------------- CPU experts as observed


def test_observed_cpu_view_learns_the_ratio_and_stays_exact_on_the_model() -> None:
    from aptmoe.costs import ObservedCpuView

    view = ObservedCpuView(COST)
    for _ in range(50):                       # the model observing itself: exactly 1
        view.observe(64, "fwd", THREADS, COST.cpu_expert_s(64, "fwd", THREADS))
    assert view.correction("fwd") == 1.0 and view.cpu_expert_s(64, "fwd", THREADS) == COST.cpu_expert_s(64, "fwd", THREADS)
    for _ in range(60):                       # a CPU 10x slower than calibrated, in the backward only
        view.observe(8, "bwd", THREADS, 10 * COST.cpu_expert_s(8, "bwd", THREADS))
    assert view.correction("bwd") == pytest.approx(10, rel=1e-3) and view.correction("fwd") == 1.0
    for _ in range(200):                      # never beyond its bounds
        view.observe(8, "bwd", THREADS, 1e6)
    assert view.correction("bwd") <= ObservedCpuView.BOUNDS[1] * (1 + 1e-9)
    assert view.h2d() == COST.h2d()            # the rest is delegated


def test_a_slow_cpu_moves_experts_back_to_the_gpu() -> None:
    counts = [300, 100, 50, 30, 20, 10, 2, 0]
    fast, slow = aptmoe_policy(), aptmoe_policy()
    for p in (fast, slow):
        p.stage_load_begins(0, "F")
    for _ in range(60):                       # CPU experts observed 50x slower than calibrated
        slow.cpu_expert_ran(10, "fwd", 50 * COST.cpu_expert_s(10, "fwd", THREADS))
    before = fast.gate_counts(0, 0, 0, counts)
    after = slow.gate_counts(0, 0, 0, counts)
    assert len(after.cpu) < len(before.cpu)


# --------------------------------------------------------------------------- the CPU's slack in the backward


def _backward_after_forward(cost, done_params: int, counts) -> tuple[Placement, AptmoePolicy]:
    """Rank 0 of a 4-stage plan (stages 0 and 2) after its forward; stage 2's backward is over
    and `done_params` of its Adam done; stage 0's backward placement, decided now."""
    p = AptmoePolicy(build_plan(cfg_for("APTMoE")), 0, MODEL, cost, threads=THREADS)
    _forward_stages(p, [(0, (0, 1)), (2, (4, 5))], counts)
    p.adam_done(done_params)
    p.stage_load_begins(0, "B")
    return p.backward_placement(0, 0), p


def test_backward_keeps_its_experts_off_a_cpu_that_still_owes_adam() -> None:
    """On a native H200 link an expert loads in 0.6 ms: Eq. 1 sends the cold ones to the CPU.
    But with stage 2's Adam still to run, the CPU is the step's tail, and an expert there
    would end the step later; once that Adam is done, the same counts split as Eq. 1 says."""
    cost = AnalyticCost(MODEL, h200_hardware())
    counts = [4000, 2000, 1000, 500, 8, 4, 2, 1]
    owed, p = _backward_after_forward(cost, 0, counts)
    assert not owed.cpu and set(owed.gpu) == set(range(E))
    free, p = _backward_after_forward(cost, 10**12, counts)
    total = [2 * c for c in counts]                   # two micro-batches
    split = split_experts(total, cost, MODEL, threads=THREADS, resident=p._resident_experts(0, 0),
                          load_attn_gate=p._attn_gate_pending(0, 0), remaining_mbs=1, direction="bwd")
    assert free.cpu and free == Placement(split.gpu, split.cpu)


def test_a_slow_link_leaves_the_cpu_its_experts_even_with_adam_owed() -> None:
    """Capped to 0.5 GB/s, the backward's loads outlast any Adam: the CPU has slack."""
    cost = AnalyticCost(MODEL, h200_hardware(), 0.5)
    owed, _ = _backward_after_forward(cost, 0, [4000, 2000, 1000, 500, 8, 4, 2, 1])
    assert owed.cpu


def test_adam_done_counts_what_the_cost_model_says_its_parameters_take() -> None:
    p = aptmoe_policy()
    p.adam_done(4 << 20)
    p.adam_done(1000)
    assert p.adam_done_s == pytest.approx(COST.adam_cpu_s(4 << 20, THREADS) + COST.adam_cpu_s(1000, THREADS))
    p.end_iteration()
    assert p.adam_done_s == 0.0
