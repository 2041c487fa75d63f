"""The affinity split: exact against brute force, and the counter-examples of its docstring."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aptmoe.affinity import Split, block_load_s, evaluate_split, paper_split, split_experts
from aptmoe.analytic_cost import AnalyticCost, a800_pcie_hardware, h200_hardware
from aptmoe.config import ConfigError, moe_model
from aptmoe.costs import KernelTimeOnly, LinkSpec

S8 = moe_model("S", 8)
A800 = AnalyticCost(S8, a800_pcie_hardware())
REL = 1e-9


class LinearCost(KernelTimeOnly):
    """A CostSource with hand-set linear times; backward = 2x forward."""

    name = "linear"

    def __init__(self, cpu_overhead_s: float, cpu_per_token_s: float, gpu_fixed_s: float,
                 gpu_per_token_s: float, GBps: float) -> None:
        self.c0, self.c1, self.g0, self.g1, self.GBps = cpu_overhead_s, cpu_per_token_s, gpu_fixed_s, gpu_per_token_s, GBps

    def gpu_s(self, kind: str, tokens: int, direction: str) -> float:
        return (2 if direction == "bwd" else 1) * (self.g0 + self.g1 * tokens) if tokens else 0.0

    def cpu_expert_s(self, tokens: int, direction: str, threads: int) -> float:
        return (2 if direction == "bwd" else 1) * (self.c0 + self.c1 * tokens) / threads if tokens else 0.0

    def h2d(self) -> LinkSpec:
        return LinkSpec(0.0, self.GBps)

    d2h = h2d

    def root_GBps(self, gpus_sharing: int) -> float:
        return self.GBps

    def p2p(self, same_node: bool) -> LinkSpec:
        return LinkSpec(0.0, self.GBps)

    def adam_cpu_s(self, num_params: int, threads: int) -> float:
        return 0.0

    def adam_gpu_s(self, num_params: int) -> float:
        return 0.0


# ----------------------------------------------------------------- oracles, from the formula


def objective(head, counts, cost, model, *, threads, resident, load_attn_gate, remaining_mbs, direction):
    """makespan = max(CPU_tail, LOAD_head + GPU_head), straight from the definition."""
    active = [e for e in range(len(counts)) if counts[e] > 0]
    tail = [e for e in active if e not in head and e not in resident]
    on_gpu = [e for e in active if e in head or e in resident]
    cpu = remaining_mbs * sum(cost.cpu_expert_s(counts[e], direction, threads) for e in tail)
    load = sum(cost.h2d().time_s(model.block_bytes("e")) for e in head)
    if load_attn_gate:
        load += cost.h2d().time_s(model.block_bytes("a")) + cost.h2d().time_s(model.block_bytes("g"))
    gpu = remaining_mbs * sum(cost.gpu_s("e", counts[e], direction) for e in on_gpu)
    return max(cpu, load + gpu)


def candidates(counts, resident):
    """Non-resident experts with tokens, most popular first."""
    return sorted((e for e in range(len(counts)) if counts[e] > 0 and e not in resident),
                  key=lambda e: (-counts[e], e))


def brute_prefixes(counts, cost, model, **kw):
    order = candidates(counts, kw["resident"])
    return [(set(order[:k]), objective(set(order[:k]), counts, cost, model, **kw)) for k in range(len(order) + 1)]


def brute_subsets(counts, cost, model, **kw):
    order = candidates(counts, kw["resident"])
    return min(objective(set(s), counts, cost, model, **kw)
               for r in range(len(order) + 1) for s in itertools.combinations(order, r))


# ----------------------------------------------------------------- random instances


@st.composite
def instances(draw, max_experts: int = 10):
    E = draw(st.integers(1, max_experts))
    dtype = draw(st.sampled_from(["fp32", "bf16"]))
    model = moe_model("S", E, dtype=dtype)
    hw = draw(st.sampled_from([a800_pcie_hardware, h200_hardware]))()
    # Caps from starved to native, so the balance point falls anywhere in the ranking.
    cap = draw(st.one_of(st.none(), st.floats(0.05, 60.0)))
    cost = AnalyticCost(model, hw, cap)
    top = draw(st.sampled_from([8, 64, 512, 4096]))
    counts = draw(st.lists(st.integers(0, top), min_size=E, max_size=E))
    kw = dict(
        threads=draw(st.integers(1, 32)),
        resident=frozenset(draw(st.sets(st.integers(0, E - 1), max_size=E))),
        load_attn_gate=draw(st.booleans()),
        remaining_mbs=draw(st.integers(1, 8)),
        direction=draw(st.sampled_from(["fwd", "bwd"])),
    )
    return counts, cost, model, kw


@settings(max_examples=200, deadline=None)
@given(instances())
def test_split_is_the_best_prefix(inst):
    counts, cost, model, kw = inst
    split = split_experts(counts, cost, model, **kw)
    options = brute_prefixes(counts, cost, model, **kw)
    best = min(span for _, span in options)
    assert split.makespan_s == pytest.approx(best, rel=REL)
    assert split.makespan_s == pytest.approx(objective(set(split.to_load), counts, cost, model, **kw), rel=REL)
    # Same set up to ties; a tie goes to the larger head (fewer CPU experts).
    tied = [head for head, span in options if span <= best * (1 + 1e-7)]
    assert set(split.to_load) in tied
    assert len(split.to_load) >= max(len(h) for h in tied) - (1 if len(tied) > 1 else 0)
    # Sets: every expert with tokens in exactly one place; residents on the GPU.
    active = {e for e, n in enumerate(counts) if n > 0}
    assert set(split.gpu) | set(split.cpu) == active
    assert not set(split.gpu) & set(split.cpu)
    assert active & kw["resident"] <= set(split.gpu)
    assert set(split.to_load) == set(split.gpu) - kw["resident"]


@settings(max_examples=200, deadline=None)
@given(instances(), st.floats(0.0, 1.0))
def test_a_cpu_budget_bounds_the_tail_and_keeps_the_best_prefix_within_it(inst, share):
    counts, cost, model, kw = inst
    free = split_experts(counts, cost, model, **kw)
    budget = share * free.cpu_s
    capped = split_experts(counts, cost, model, max_cpu_s=budget, **kw)
    assert capped.cpu_s <= budget * (1 + REL) or not capped.cpu
    # the best prefix among those whose tail fits: never better than the free choice
    fits = [span for head, span in brute_prefixes(counts, cost, model, **kw)
            if evaluate_split(head, counts, cost, model, **kw).cpu_s <= budget * (1 + REL)]
    assert capped.makespan_s == pytest.approx(min(fits), rel=REL)
    assert capped.makespan_s >= free.makespan_s * (1 - REL)
    assert split_experts(counts, cost, model, max_cpu_s=free.cpu_s, **kw) == free
    assert not split_experts(counts, cost, model, max_cpu_s=0.0, **kw).cpu      # no budget: every expert loaded


@settings(max_examples=100, deadline=None)
@given(instances(max_experts=8))
def test_paper_rule_and_prefix_rule_against_all_subsets(inst):
    counts, cost, model, kw = inst
    ours = split_experts(counts, cost, model, **kw)
    paper = paper_split(counts, cost, model, **kw)
    optimum = brute_subsets(counts, cost, model, **kw)
    assert ours.makespan_s >= optimum * (1 - REL)
    assert paper.makespan_s >= ours.makespan_s * (1 - REL)


@settings(max_examples=100, deadline=None)
@given(instances(max_experts=8), st.floats(1e-5, 1e-2))
def test_prefix_is_optimal_when_gpu_cost_is_uniform(inst, gpu_fixed_s):
    counts, _, model, kw = inst
    # Any CPU cost that grows with tokens (here: overhead + linear) and a GPU time that is
    # the same for every expert: the best prefix is the best of all subsets.
    cost = LinearCost(2e-4, 3e-6, gpu_fixed_s, 0.0, GBps=25.0)
    split = split_experts(counts, cost, model, **kw)
    assert split.makespan_s == pytest.approx(brute_subsets(counts, cost, model, **kw), rel=REL)


def test_paper_rule_is_exactly_the_R_crossing():
    # GPU compute negligible: the paper stops at the first k where CPU_tail <= LOAD_head.
    cost = LinearCost(0.0, 1e-3, 0.0, 0.0, GBps=1.0)      # 1 ms per token on CPU
    model = moe_model("S", 4)
    load = block_load_s(cost, model, "e")                    # 33.6 ms per expert
    counts = [40, 30, 20, 10]                                # CPU 40, 30, 20, 10 ms
    split = paper_split(counts, cost, model, threads=1)
    # k=1: CPU 60 > 33.6; k=2: 30 <= 67.1 -> stop at 2. The best prefix is k=1.
    assert split.to_load == (0, 1) and split.cpu == (2, 3)
    assert split_experts(counts, cost, model, threads=1).to_load == (0,)
    assert split.load_s == pytest.approx(2 * load)


# ----------------------------------------------------------------- the docstring's examples


def test_counter_example_paper_overshoots():
    kw = dict(threads=28, remaining_mbs=1)
    ours, paper = split_experts([4] * 8, A800, S8, **kw), paper_split([4] * 8, A800, S8, **kw)
    assert len(ours.to_load) == 1 and len(paper.to_load) == 2
    assert ours.makespan_s == pytest.approx(1.68e-3, rel=0.01)
    assert paper.makespan_s == pytest.approx(2.81e-3, rel=0.01)


def test_counter_example_paper_ignores_gpu_compute():
    counts = [3000, 400, 200, 100, 100, 100, 50, 50]
    kw = dict(threads=14, remaining_mbs=4)
    ours, paper = split_experts(counts, A800, S8, **kw), paper_split(counts, A800, S8, **kw)
    assert ours.to_load == (0, 1, 2, 3, 4) and len(paper.to_load) == 7
    assert ours.makespan_s == pytest.approx(29.2e-3, rel=0.01)
    assert paper.makespan_s == pytest.approx(33.0e-3, rel=0.01)
    assert ours.makespan_s == pytest.approx(brute_subsets(counts, A800, S8, resident=frozenset(),
                                                          load_attn_gate=False, direction="fwd", **kw))


def test_counter_example_prefix_is_not_always_optimal():
    counts = [1900, 1000, 800, 500, 500, 100, 0, 0]
    kw = dict(threads=28, remaining_mbs=4, load_attn_gate=True)
    ours = split_experts(counts, A800, S8, **kw)
    other = evaluate_split([0, 1, 2, 3, 5], counts, A800, S8, **kw)
    assert ours.to_load == (0, 1, 2, 3, 4)
    assert ours.makespan_s == pytest.approx(35.0e-3, rel=0.01)
    assert other.makespan_s == pytest.approx(32.7e-3, rel=0.01)
    assert other.cpu == (4,)


# ----------------------------------------------------------------- monotone sanity


@settings(max_examples=100, deadline=None)
@given(instances(), st.integers(1, 32))
def test_more_threads_never_move_experts_to_the_gpu(inst, more):
    counts, cost, model, kw = inst
    fewer = split_experts(counts, cost, model, **kw)
    kw["threads"] += more
    faster_cpu = split_experts(counts, cost, model, **kw)
    assert set(fewer.cpu) <= set(faster_cpu.cpu)


@settings(max_examples=100, deadline=None)
@given(instances(), st.floats(0.05, 30.0), st.floats(1.1, 100.0))
def test_a_faster_link_never_moves_experts_to_the_cpu(inst, cap, factor):
    counts, cost, model, kw = inst
    slow = split_experts(counts, AnalyticCost(model, cost.hw, cap), model, **kw)
    fast = split_experts(counts, AnalyticCost(model, cost.hw, cap * factor), model, **kw)
    assert set(fast.cpu) <= set(slow.cpu)


COUNTS = [900, 300, 120, 40, 9, 3, 1, 0]


@pytest.mark.parametrize("direction", ["fwd", "bwd"])
@pytest.mark.parametrize("load_attn_gate", [False, True])
def test_a_much_faster_link_puts_everything_on_the_gpu(direction, load_attn_gate):
    # GPU compute small next to the CPU's (the paper's regime): everything is loaded.
    cost = LinearCost(2e-4, 1e-5, 1e-6, 1e-9, GBps=1e6)
    split = split_experts(COUNTS, cost, S8, threads=1, remaining_mbs=4,
                          direction=direction, load_attn_gate=load_attn_gate)
    assert split.cpu == () and split.gpu == (0, 1, 2, 3, 4, 5, 6)


@pytest.mark.parametrize("direction", ["fwd", "bwd"])
def test_with_a_free_link_the_cpu_only_takes_work_hidden_under_gpu_compute(direction):
    # fp32 on the A800: the popular experts keep the GPU busy for ms, and the CPU computes
    # light experts alongside, so not everything is loaded even when loading is free.
    hw = a800_pcie_hardware().with_(h2d=LinkSpec(0.0, 1e6))
    cost = AnalyticCost(S8, hw)
    split = split_experts(COUNTS, cost, S8, threads=28, remaining_mbs=4, direction=direction)
    everything = evaluate_split(range(7), COUNTS, cost, S8, threads=28, remaining_mbs=4, direction=direction)
    assert split.cpu and split.cpu_s <= split.load_s + split.gpu_s
    assert split.makespan_s < everything.makespan_s


@pytest.mark.parametrize("direction", ["fwd", "bwd"])
def test_a_starved_link_puts_everything_on_the_cpu(direction):
    cost = AnalyticCost(S8, a800_pcie_hardware(), link_cap_GBps=1e-6)
    split = split_experts(COUNTS, cost, S8, threads=1, resident={0, 7}, direction=direction,
                          load_attn_gate=True)
    assert split.to_load == () and split.gpu == (0,) and split.cpu == (1, 2, 3, 4, 5, 6)


# ----------------------------------------------------------------- backward


def test_backward_is_the_same_function_on_summed_counts():
    # MoE-S-8 bf16, 7 threads (C1+G4), four identical forward micro-batches of one layer.
    model = moe_model("S", 8, dtype="bf16")
    cost = AnalyticCost(model, a800_pcie_hardware())
    per_mb = [600, 300, 150, 12, 6, 3, 2, 0]
    fwd = split_experts(per_mb, cost, model, threads=7, remaining_mbs=4)
    summed = [4 * n for n in per_mb]
    bwd = split_experts(summed, cost, model, threads=7, remaining_mbs=1, direction="bwd")
    # Its numbers are the backward times of the summed counts, nothing else.
    assert bwd.cpu_s == pytest.approx(sum(cost.cpu_expert_s(summed[e], "bwd", 7) for e in bwd.cpu))
    assert bwd.gpu_s == pytest.approx(sum(cost.gpu_s("e", summed[e], "bwd") for e in bwd.gpu))
    assert bwd.makespan_s == pytest.approx(min(s for _, s in brute_prefixes(
        summed, cost, model, threads=7, resident=frozenset(), load_attn_gate=False, remaining_mbs=1,
        direction="bwd")))
    # Backward compute is twice the forward's while a load costs the same, so loading pays
    # off for expert 5, which the forward kept on the CPU.
    assert fwd.to_load == (0, 1, 2, 3, 4) and bwd.to_load == (0, 1, 2, 3, 4, 5)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 500), min_size=8, max_size=8), st.integers(1, 8), st.floats(0.1, 30.0))
def test_backward_loads_at_least_what_forward_loads(counts, mbs, GBps):
    # Linear costs, identical micro-batches: the backward's compute doubles while the loads
    # stay the same, like the forward on a link twice as fast, so its head can only grow.
    cost = LinearCost(0.0, 5e-6, 0.0, 1e-7, GBps)
    fwd = split_experts(counts, cost, S8, threads=4, remaining_mbs=mbs)
    bwd = split_experts([mbs * n for n in counts], cost, S8, threads=4, direction="bwd")
    assert set(fwd.gpu) <= set(bwd.gpu)


# ----------------------------------------------------------------- edges and errors


def test_numpy_counts_and_ids_are_accepted():
    np = pytest.importorskip("numpy")
    counts = np.array([900, 300, 120, 40, 9, 3, 1, 0])
    split = split_experts(counts, A800, S8, threads=np.int64(7), resident=np.array([1]))
    assert split == split_experts(COUNTS, A800, S8, threads=7, resident={1})
    assert all(type(e) is int for e in split.gpu + split.cpu)


def test_zero_token_experts_are_in_neither_set():
    split = split_experts([0, 50, 0, 5, 0, 0, 0, 0], A800, S8, threads=7, resident={0, 1})
    assert set(split.gpu) | set(split.cpu) == {1, 3}
    assert 0 not in split.to_load and 0 not in split.gpu


def test_all_resident_means_nothing_to_decide():
    split = split_experts([5] * 8, A800, S8, threads=7, resident=range(8))
    assert split.cpu == () and split.to_load == () and split.load_s == 0.0
    assert split.makespan_s == pytest.approx(8 * A800.gpu_s("e", 5, "fwd"))


def test_ids_come_in_popularity_order():
    split = split_experts([1, 900, 2, 900, 50, 3, 4, 5], A800, S8, threads=1,
                          load_attn_gate=True, remaining_mbs=4)
    ranked = [1, 3, 4, 7, 6, 5, 2, 0]
    assert list(split.gpu) + list(split.cpu) == ranked


def test_block_load_s_is_one_copy_on_the_h2d_link():
    assert block_load_s(A800, S8, "e") == pytest.approx(10e-6 + 2 * 1024 * 4096 * 4 / 25e9)
    with pytest.raises(ConfigError, match="block kind"):
        block_load_s(A800, S8, "x")


def test_split_is_frozen():
    split = split_experts([5] * 8, A800, S8, threads=7)
    assert isinstance(split, Split)
    with pytest.raises(AttributeError):
        split.cpu = ()  # type: ignore[misc]


@pytest.mark.parametrize("counts, kw, match", [
    ([1] * 7, {}, "8 experts"),
    ([1] * 7 + [-1], {}, "non-negative"),
    ([1] * 8, {"resident": {8}}, "0..7"),
    ([1] * 8, {"remaining_mbs": 0}, "remaining_mbs"),
    ([1] * 8, {"threads": 0}, "threads"),
    ([1] * 8, {"direction": "back"}, "fwd, bwd"),
])
def test_bad_arguments_say_what_to_change(counts, kw, match):
    args = {"threads": 4, **kw}
    for rule in (split_experts, paper_split):
        with pytest.raises(ConfigError, match=match):
            rule(counts, A800, S8, **args)


def test_evaluate_split_rejects_experts_that_cannot_be_loaded():
    with pytest.raises(ConfigError, match="resident or have no tokens"):
        evaluate_split([0, 2], [5, 5, 0, 5, 5, 5, 5, 5], A800, S8, threads=4, resident={0})
