"""Closed-form checks of the simulator (issue 3 §7)."""

from __future__ import annotations

import dataclasses

import pytest
import simpy

from aptmoe.config import ClusterConfig, ModelConfig, Pipeline, PopularityConfig, RunConfig, ScheduleConfig, TrainConfig
from aptmoe.costs import KernelTimeOnly, LinkSpec
from aptmoe.memory import MemoryModel
from aptmoe.plan.actions import Kind
from aptmoe.plan.builders import build_plan
from aptmoe.sim.links import SharedRoot, max_min_rates
from aptmoe.sim.simulate import simulate
from aptmoe.trace import CPU_JOB_PHASES, Trace


class ConstCost(KernelTimeOnly):
    """Every block costs a fixed time; links are fast or as given; no optimizer cost."""

    name = "const"

    def __init__(self, block_s=1e-3, h2d_GBps=1e6, root_GBps=None, cpu_s=1.0):
        self.block_s, self.h2d_GBps, self.cpu_s = block_s, h2d_GBps, cpu_s
        self._root = root_GBps
        self.fallbacks: set[str] = set()

    def gpu_s(self, kind, tokens, direction):
        if tokens == 0:
            return 0.0
        # a layer's forward costs block_s in all (attention carries it), backward twice
        return (self.block_s if kind == "a" else 0.0) * (1 if direction == "fwd" else 2)

    def cpu_expert_s(self, tokens, direction, threads):
        return self.cpu_s

    def h2d(self):
        return LinkSpec(0.0, self.h2d_GBps)

    def d2h(self):
        return LinkSpec(0.0, self.h2d_GBps)

    def root_GBps(self, n, direction="h2d"):
        return self._root if self._root is not None else n * self.h2d_GBps

    def p2p(self, same_node):
        return LinkSpec(0.0, 1e9)

    def adam_cpu_s(self, num_params, threads):
        return 0.0

    def adam_gpu_s(self, num_params):
        return 0.0


def _cfg(pipeline=Pipeline.GPIPE, gpus=4, layers=8, stages=None, chunks=4, experts=4, gini=0.4, topo="C1+G1",
         mem=10**15, **sched):
    return RunConfig(
        model=ModelConfig(name="tiny", embedding_dim=64, hidden_dim=128, num_heads=4, num_layers=layers,
                          num_experts=experts, seq_length=16),
        cluster=ClusterConfig(gpus_per_node=gpus, topo=topo, gpu_memory_bytes=mem),
        train=TrainConfig(batch_size=8 * chunks, num_chunks=chunks, num_warmup_steps=1, num_training_steps=1),
        schedule=ScheduleConfig(pipeline=pipeline, num_stages=stages, **sched),
        popularity=PopularityConfig(gini=gini))


class CpuConst(ConstCost):
    """ConstCost on CPU ranks: the host issues and computes on one thread, and a message is
    waited for by the host before the action that uses it (gloo's receive blocks)."""

    def host_runs_ahead(self):
        return False


@pytest.mark.parametrize("ranks", ["gpu", "cpu"])
@pytest.mark.parametrize("recompute", ["none", "all"])
@pytest.mark.parametrize("p,m", [(2, 2), (4, 4), (4, 8), (3, 5)])
def test_gpipe_bubble_fraction(p, m, recompute, ranks):
    """Forward F = 1, backward B = 2 units per stage and micro-batch, and a recompute R = 1
    before each backward when recomputing. The last stage runs its backwards back to back,
    one every R + B; each stage before it ends each backward B after the gradient comes. On a
    GPU its recompute runs while that gradient is on the way (the stream waits for the
    message, not the host: exec/runtime.py `_output_grad`), and fits, since the gradients
    come every R + B: a stage adds F + B to the pipeline's fill and drain, and the bubble is
    (p-1)(F+B) / (m(F+R+B) + (p-1)(F+B)). On CPU ranks the recompute waits for the gradient
    too: each stage adds F + R + B, the textbook (p-1)/(m+p-1)."""
    cfg = _cfg(gpus=p, layers=p * 2, chunks=m, topo="C1+G1", recompute=recompute)
    t = 1e-3
    r = simulate(cfg, (ConstCost if ranks == "gpu" else CpuConst)(block_s=t))
    F, B, R = 1, 2, 1 if recompute == "all" else 0
    ideal = m * (F + R + B) * 2 * t             # every micro-batch's forward + backward, two layers a stage
    bubble = 1 - ideal / r.iteration_s
    fill = (p - 1) * (F + B if ranks == "gpu" else F + R + B)
    assert bubble == pytest.approx(fill / (m * (F + R + B) + fill), rel=1e-6)


def test_a_backward_recomputes_while_its_gradient_is_on_the_way_on_a_gpu_not_on_a_cpu():
    """GPipe on two ranks, recomputing: stage 0's first backward recomputes from the end of its
    forwards, before stage 1's gradient has landed, and runs its backward blocks from the
    landing on (the executor's order on a GPU, session 22: 2 x H200 M8 G0.45 GPipe went from
    +5.9% to +1.8% with it). On CPU ranks it waits for the gradient first."""
    cfg = _cfg(gpus=2, layers=4, chunks=2, topo="C1+G1", recompute="all")
    for cost, early in ((ConstCost(block_s=1e-3), True), (CpuConst(block_s=1e-3), False)):
        tr = Trace("sim")
        simulate(cfg, cost, trace=tr)
        landed = next(e.end_s for e in tr.events if e.rank == 0 and e.name == "0RB0")
        calls = [e for e in tr.events if e.rank == 0 and e.name.startswith("0B0@") and e.dur_s > 0]
        recompute = [e for e in calls if e.cat == "recompute"]
        backward = [e for e in calls if e.cat == "backward"]
        assert recompute and backward
        if early:
            assert max(e.end_s for e in recompute) < landed
            assert min(e.start_s for e in backward) == pytest.approx(landed)
        else:
            assert min(e.start_s for e in recompute) == pytest.approx(landed)
            assert min(e.start_s for e in backward) == pytest.approx(max(e.end_s for e in recompute))


class HostBound(ConstCost):
    """ConstCost whose every block call also costs the issuing thread `host` seconds."""

    def __init__(self, host: float, **kw):
        super().__init__(**kw)
        self.host = host

    def host_s(self, kind, direction):
        return self.host


@pytest.mark.parametrize("reach", [0, 4, 8])
def test_the_issuing_thread_runs_at_most_ahead_blocks_ahead_of_the_gpu(reach):
    """One GPU, one layer forward only: an attention block of 1 s on the GPU, then a gate and
    32 experts that take the GPU no time and the host 1 ms each. Unbounded, the host issues
    them all while the attention runs, and the layer ends with it. With a reach of K, after
    issuing block i the host waits for block i-K's end: blocks 1..K are issued during the
    attention, block K+1 only once it has ended, and each block after it takes the host's
    1 ms: the layer ends (34 - 1 - K) ms after the attention (exec/runtime.py does the same)."""
    cfg = _cfg(gpus=1, layers=1, chunks=1, experts=32, gini=0.05, fwd_only=True, ahead_blocks=reach)
    tr = Trace("sim")
    simulate(cfg, HostBound(host=1e-3, block_s=1.0), trace=tr)
    fwd = next(e for e in tr.events if e.name == "0F0" and e.cat == "forward")
    attention = next(e for e in tr.events if e.name == "0F0@0:a")
    blocks = [e for e in tr.events if e.name.startswith("0F0@0:")]
    assert len(blocks) == 34                                  # attention, gate, 32 experts
    late = 0.0 if reach == 0 else (34 - 1 - reach) * 1e-3
    assert fwd.end_s - attention.end_s == pytest.approx(late, abs=1e-9)


class Posting(HostBound):
    """HostBound whose issuing thread also spends `send` and `recv` seconds per message posted."""

    def __init__(self, send: float, recv: float, **kw):
        super().__init__(**kw)
        self.posts = {"send": send, "recv": recv}

    def post_s(self, message):
        return self.posts[message]


@pytest.mark.parametrize("ranks", ["gpu", "cpu"])
def test_the_issuing_thread_pays_for_the_sends_it_posts(ranks):
    """GPipe on two ranks, forward only, one layer a stage and 4 micro-batches, the blocks'
    kernels free and each call 1 ms of host: rank 0 issues its four forwards back to back,
    34 calls each, and posts each forward's send after it. A post of 5 ms puts each forward
    5 ms later than the one before it ended, so the fourth ends 3 x 5 ms later than with
    free posts. On CPU ranks the one thread does the same, in the same order. Rank 1
    posts no receive itself: its net thread reaches every one first (nothing is before them)."""
    cfg = _cfg(gpus=2, layers=2, chunks=4, experts=32, gini=0.05, fwd_only=True)
    cls = Posting if ranks == "gpu" else type("CpuPosting", (Posting,), {"host_runs_ahead": lambda self: False})
    ends = {}
    for send in (0.0, 5e-3):
        tr = Trace("sim")
        simulate(cfg, cls(send=send, recv=7e-3, host=1e-3, block_s=0.0), trace=tr)
        ends[send] = [e.end_s for e in sorted((e for e in tr.events if e.rank == 0 and e.cat == "forward"
                                               and "@" not in e.name), key=lambda e: e.start_s)]
    assert len(ends[0.0]) == 4
    for i in range(4):
        assert ends[5e-3][i] - ends[0.0][i] == pytest.approx(i * 5e-3, abs=1e-9), i


def test_the_issuing_thread_posts_a_receive_the_net_program_has_not_reached_and_only_once(monkeypatch):
    """Mobius on two ranks: a rank alternates stages, and the receive its next forward or
    backward needs sits in the net program behind the send of the action it just ran, which
    the net lane reaches only once that action is done: the compute lane gets there first
    and pays for the post. Every charge is a whole number of receives, and no receive is
    paid for twice."""
    from aptmoe.sim.engine import RankModel

    paid = []
    real = RankModel._posting

    def spy(self, seconds):
        paid.append((self.rank, round(seconds / 7e-3, 9)))
        yield from real(self, seconds)

    monkeypatch.setattr(RankModel, "_posting", spy)
    cfg = _cfg(pipeline=Pipeline.MOBIUS, gpus=2, layers=4, stages=4, chunks=2)
    plan = build_plan(cfg)
    simulate(cfg, Posting(send=0.0, recv=7e-3, host=1e-4))
    for rank in (0, 1):
        receives = [a for a in plan.programs[rank]["net"] if a.kind in (Kind.RECV_F, Kind.RECV_B)]
        counts = [n for r, n in paid if r == rank and n]
        assert counts and all(n == int(n) for n in counts)
        assert 0 < sum(counts) <= len(receives) * (cfg.train.num_warmup_steps + cfg.train.num_training_steps)


def test_bytes_moved_equal_the_plan_loads():
    cfg = _cfg(pipeline=Pipeline.MOBIUS, gpus=2, layers=8, stages=4, topo="C1+G1")
    plan = build_plan(cfg)
    mem = MemoryModel(cfg.model, cfg.tokens_per_micro_batch, cfg.micro_batch_size)
    loads = [a for _, _, a in plan.actions() if a.kind in (Kind.LOAD_F, Kind.LOAD_B)]
    want = sum(mem.param_bytes(plan.stages[a.stage].layers) for a in loads)
    r = simulate(cfg, ConstCost(h2d_GBps=1.0))
    assert r.metrics["link/h2d_bytes"] == pytest.approx(want)
    assert r.metrics["load/stage_bytes"] == pytest.approx(want)


def _run_flows(sizes_caps, aggregate):
    env = simpy.Environment()
    root = SharedRoot(env, lambda n: aggregate)
    done = {}

    def flow(i, nbytes, cap, delay):
        yield env.timeout(delay)
        yield from root.transfer(nbytes, cap)
        done[i] = env.now

    for i, (nbytes, cap, delay) in enumerate(sizes_caps):
        env.process(flow(i, nbytes, cap, delay))
    env.run()
    return done


def test_two_equal_flows_on_a_shared_root_each_take_twice_as_long():
    alone = _run_flows([(1e9, 10.0, 0)], aggregate=10.0)[0]
    both = _run_flows([(1e9, 10.0, 0), (1e9, 10.0, 0)], aggregate=10.0)
    assert alone == pytest.approx(0.1)
    assert both[0] == pytest.approx(2 * alone) and both[1] == pytest.approx(2 * alone)


def test_a_capped_copy_takes_bytes_over_cap():
    assert _run_flows([(8e9, 8.0, 0)], aggregate=55.0)[0] == pytest.approx(1.0)


def test_a_late_flow_replans_the_share():
    # A alone for 0.05 s at 10 GB/s (0.5 GB), then A and B share 5 GB/s each.
    done = _run_flows([(1e9, 10.0, 0.0), (1e9, 10.0, 0.05)], aggregate=10.0)
    assert done[0] == pytest.approx(0.05 + 0.5e9 / 5e9)
    assert done[1] == pytest.approx(done[0] + (1e9 - 0.5e9) / 10e9)


def test_max_min_rates_give_unused_share_to_others():
    assert max_min_rates([1.0, 10.0, 10.0], 9.0) == pytest.approx([1.0, 4.0, 4.0])


def test_oom_exactly_where_memory_arithmetic_says():
    cfg = _cfg(gpus=2, layers=4, chunks=2, topo="C1+G1", recompute="none")
    mem = MemoryModel(cfg.model, cfg.tokens_per_micro_batch, cfg.micro_batch_size)
    ly = (0, 1)
    need = (mem.param_bytes(ly) + mem.adam_bytes(ly) + mem.grad_bytes(ly)
            + cfg.micro_batches * mem.activation_bytes(ly))
    fits = simulate(cfg.replace(cluster=ClusterConfig(gpus_per_node=2, topo="C1+G1", gpu_memory_bytes=need)),
                    ConstCost())
    assert not fits.oom and fits.peak_gpu_bytes == need
    short = simulate(cfg.replace(cluster=ClusterConfig(gpus_per_node=2, topo="C1+G1", gpu_memory_bytes=need - 1)),
                     ConstCost())
    assert short.oom and "rank 0" in short.oom_detail and "stage 0" in short.oom_detail


def test_same_seed_same_timeline_and_microsecond_units(tmp_path):
    cfg = _cfg(pipeline=Pipeline.APTMOE, gpus=2, layers=8, stages=4, topo="C1+G2", gini=0.6)
    traces = []
    for _ in range(2):
        tr = Trace("sim")
        simulate(cfg, "a800-paper", trace=tr)
        traces.append(tr)
    assert traces[0].to_chrome() == traces[1].to_chrome()
    other = Trace("sim")
    simulate(cfg.replace(train=TrainConfig(batch_size=32, num_chunks=4, seed=7, num_warmup_steps=1,
                                           num_training_steps=1)), "a800-paper", trace=other)
    assert other.to_chrome() != traces[0].to_chrome()
    path = tmp_path / "t.json"
    traces[0].save(path)
    back = Trace.load(path)
    ev = max(back.events, key=lambda e: e.dur_s)
    raw = next(e for e in traces[0].to_chrome()["traceEvents"] if e.get("ph") == "X" and e["name"] == ev.name)
    assert raw["dur"] == pytest.approx(ev.dur_s * 1e6, rel=1e-6)


@pytest.mark.parametrize("pipeline", list(Pipeline))
def test_every_schedule_runs_and_reports(pipeline):
    stages = 2 if pipeline is Pipeline.GPIPE else 4
    r = simulate(_cfg(pipeline=pipeline, gpus=2, layers=8, stages=stages, topo="C1+G2"), "a800-paper")
    assert not r.oom and r.iteration_s > 0
    assert r.throughput_seq_per_s == pytest.approx(32 / r.iteration_s)
    assert 0 < r.metrics["busy/compute"] <= 1


def test_aptmoe_puts_rare_experts_on_the_cpu_when_the_link_is_slow():
    cfg = _cfg(pipeline=Pipeline.APTMOE, gpus=2, layers=8, stages=4, topo="C1+G1", experts=8, gini=0.6)
    slow = simulate(cfg, ConstCost(h2d_GBps=1e-3, cpu_s=1e-4))
    fast = simulate(cfg, ConstCost(h2d_GBps=1e6, cpu_s=1.0))
    assert slow.metrics["cpu/expert_share"] > 0.1
    assert fast.metrics["cpu/expert_share"] == 0.0


from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

from aptmoe.config import TOPOLOGIES  # noqa: E402


@st.composite
def _any_config(draw):
    G = draw(st.sampled_from([1, 2, 4]))
    topo = draw(st.sampled_from([t for t, k in TOPOLOGIES.items() if G % k == 0]))
    E = draw(st.sampled_from([1, 2, 4, 8]))
    k = draw(st.sampled_from([1, 2])) if E >= 2 else 1
    pipe = draw(st.sampled_from(list(Pipeline)))
    S = G if pipe is Pipeline.GPIPE else G * draw(st.integers(1, 3))
    L = S * draw(st.integers(1, 2))
    lo, hi = 1 / E, 1 / k
    gini = draw(st.floats(lo, hi)) if E > 1 else 1.0
    M = draw(st.sampled_from([1, 2, 4]))
    return RunConfig(
        model=ModelConfig(embedding_dim=64, hidden_dim=128, num_heads=4, num_layers=L, num_experts=E, top_k=k,
                          seq_length=16, is_moe=E > 1),
        cluster=ClusterConfig(gpus_per_node=G, topo=topo, link_bandwidth_GBps=draw(st.sampled_from([None, 0.5, 8.0]))),
        train=TrainConfig(batch_size=4 * M, num_chunks=M, num_warmup_steps=draw(st.integers(0, 1)),
                          num_training_steps=1, seed=draw(st.integers(0, 99))),
        schedule=ScheduleConfig(pipeline=pipe, num_stages=S, fwd_only=draw(st.booleans()),
                                inter_stage_only=draw(st.booleans()),
                                recompute=draw(st.sampled_from(["auto", "none", "all", "except_last"])),
                                max_copies_in_flight=draw(st.sampled_from([1, 2, 4]))),
        popularity=PopularityConfig(gini=gini, persistence=0.8))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=_any_config(), profile=st.sampled_from(["a800-paper", "h200"]))
def test_any_config_simulates_to_the_end_and_accounts_for_its_bytes(cfg, profile):
    """No stall, no crash (the engine also checks every rank frees what a step allocated);
    loads happen only for the offload schedules."""
    r = simulate(cfg, profile)
    assert r.oom or r.iteration_s > 0
    if not r.oom:
        loaded = r.metrics["link/h2d_bytes"]
        if cfg.schedule.pipeline is Pipeline.GPIPE:
            assert loaded == 0
        else:
            assert loaded > 0
        assert 0 <= r.metrics["cpu/expert_share"] <= 1


def test_flows_of_one_gpu_share_its_link_and_the_root_is_shared_by_gpu():
    # two flows of GPU 0 share its 10 GB/s; GPU 1's single flow gets its own 10
    assert max_min_rates([10.0, 10.0, 10.0], 100.0, [0, 0, 1]) == pytest.approx([5.0, 5.0, 10.0])
    # a 12 GB/s root is split by GPU (6 each), then within GPU 0 by flow
    assert max_min_rates([10.0, 10.0, 10.0], 12.0, [0, 0, 1]) == pytest.approx([3.0, 3.0, 6.0])


def test_a_second_flow_of_the_same_gpu_does_not_speed_it_up():
    env = simpy.Environment()
    root = SharedRoot(env, lambda n: 100.0)
    done = {}

    def flow(i):
        yield from root.transfer(1e9, 10.0, group="gpu0")
        done[i] = env.now

    env.process(flow(0))
    env.process(flow(1))
    env.run()
    assert done[0] == pytest.approx(0.2) and done[1] == pytest.approx(0.2)    # 2 GB over one 10 GB/s link


class ThreadsSeen(ConstCost):
    """ConstCost that remembers the thread counts the engine asks CPU costs for."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.threads: set[int] = set()

    def cpu_expert_s(self, tokens, direction, threads):
        self.threads.add(threads)
        return self.cpu_s

    def adam_cpu_s(self, num_params, threads):
        self.threads.add(threads)
        return 0.0


@pytest.mark.parametrize("host_cores", [0, 3])
def test_cpu_work_runs_on_the_cores_left_after_the_host_threads(host_cores):
    """--host-cores keeps cores for a rank's host threads: the CPU experts and Adam run with
    the rest (C1+G1 with 28 cores per socket: 28 - host_cores threads)."""
    cfg = _cfg(pipeline=Pipeline.APTMOE, gpus=2, layers=8, stages=4, topo="C1+G1", experts=8, gini=0.6)
    cfg = cfg.replace(cluster=dataclasses.replace(cfg.cluster, host_cores=host_cores))
    cost = ThreadsSeen(h2d_GBps=1e-3, cpu_s=1e-4)
    r = simulate(cfg, cost)
    assert r.metrics["cpu/expert_share"] > 0
    assert cost.threads == {28 - host_cores}


def test_kernels_issued_while_a_receive_waits_take_the_profiles_slowdown():
    """A receive is posted when its rank's net program reaches it and waits on the GPU for the
    peer's send; the rank's blocks issued meanwhile take their kind's `recv_wait` figure times
    their time alone (NCCL's receive kernel holds SMs as it waits: docs/validation-h200-2gpu).
    GPipe on two GPUs, a800-paper (no host cost: a block's time is its kernel's). Rank 0 posts
    its first gradient receive only after its last forward's send, so no forward is slowed;
    its first backward recomputes while that receive waits (from its posting, after the last
    forward's send: slowed), and issues its backward blocks once it has landed, while the next
    one waits for rank 1's second backward: slowed; nothing is left to receive during its last
    backward."""
    from aptmoe.profile import RecvWait, load_profile
    from aptmoe.trace import by_occurrence

    base = load_profile("a800-paper")
    assert base.recv_wait is None
    cfg = _cfg(gpus=2, layers=4, chunks=4, topo="C1+G1")
    d = cfg.model.embedding_dim

    def wait(a, e, g):
        return dataclasses.replace(base, recv_wait=RecvWait((("a", d, a), ("e", d, e), ("g", d, g))))

    runs = {}
    for name, prof in (("none", base), ("ones", wait(1.0, 1.0, 1.0)), ("noise", wait(0.9, 0.95, 0.8)),
                       ("slow", wait(1.5, 1.25, 1.0))):
        tr = Trace("sim")
        runs[name] = (simulate(cfg, prof, trace=tr), tr)
    # measured 1, or under 1 (the timing's noise): a waiting receive costs nothing
    assert runs["ones"][0].iteration_s == runs["noise"][0].iteration_s == runs["none"][0].iteration_s
    assert runs["slow"][0].iteration_s > runs["none"][0].iteration_s

    def blocks(tr, what=lambda e: e.dur_s):
        calls = by_occurrence((e for e in tr.events if e.stream == "compute" and ":" in e.name),
                              lambda e: (e.rank, e.name, e.cat))
        return {k: what(e) for k, e in calls.items()}

    def starts(tr):
        return blocks(tr, lambda e: e.start_s)

    alone, beside = blocks(runs["none"][1]), blocks(runs["slow"][1])
    posted = next(e.start_s for e in runs["none"][1].events if e.name == "0RB0")
    assert alone.keys() == beside.keys()
    ratio = {k: beside[k] / alone[k] for k in alone if alone[k] > 0}
    kind = lambda k: k[1].split(":")[1][0]                         # noqa: E731
    for want, of_kind in ((1.5, "a"), (1.25, "e"), (1.0, "g")):
        assert {round(r, 9) for k, r in ratio.items() if kind(k) == of_kind} == {1.0, want}
    rank0 = {k: r for k, r in ratio.items() if k[0] == 0}
    assert all(r == pytest.approx(1.0) for k, r in rank0.items() if k[2] == "forward")
    first = {k: r for k, r in rank0.items() if k[1].startswith("0B0@")}
    issued = {k: e for k, e in starts(runs["none"][1]).items() if k in first}
    assert any(k[2] == "recompute" and issued[k] >= posted for k in first)      # recomputed beside it
    assert all(r == pytest.approx({"a": 1.5, "e": 1.25, "g": 1.0}[kind(k)] if issued[k] >= posted else 1.0)
               for k, r in first.items())
    assert all(r == pytest.approx(1.0) for k, r in rank0.items() if k[1].startswith("0B3@"))
    # the receives are in the trace, from posted to landed, as the executor records them
    recvs = sorted((e.rank, e.name) for e in runs["slow"][1].events if e.cat == "recv")
    assert recvs == [(0, f"0RB{m}") for m in range(4)] + [(1, f"1RF{m}") for m in range(4)]


def test_a_profile_without_the_receive_figure_is_named_only_where_a_rank_receives():
    """The simulator asks for `recv_wait` only on a rank that receives: one GPU's prediction
    (no receives) does not list it among the figures it fell back on; two GPUs' does."""
    one = simulate(_cfg(gpus=1, layers=4, chunks=2, topo="C1+G1"), "a800-paper")
    two = simulate(_cfg(gpus=2, layers=4, chunks=2, topo="C1+G1"), "a800-paper")
    note = "recv wait: not measured, a posted receive costs the blocks beside it nothing"
    assert note not in one.fallbacks and note in two.fallbacks


def test_a_cpu_jobs_phases_are_its_copies_and_its_experts_compute():
    """Forward only (no gradient offload shares the copy down): each job's copy down takes its
    activations' bytes over the link, its compute the cost's figure per expert, its copy up
    no less than its bytes over the link (weight loads share it), and the five phases add up
    to the job's span on the cpu-jobs lane."""
    cfg = _cfg(pipeline=Pipeline.APTMOE, gpus=2, layers=8, stages=4, topo="C1+G1", experts=8, gini=0.6,
               fwd_only=True)
    rate, cpu_s = 1e-3, 1e-4
    tr = Trace("sim")
    simulate(cfg, ConstCost(h2d_GBps=rate, cpu_s=cpu_s), trace=tr)
    jobs = [e for e in tr.events if e.cat == "cpu-job"]
    assert jobs and all(e.stream == "cpu-jobs" for e in jobs)
    for j in jobs:
        us = {k: j.args[f"{k}_us"] for k in CPU_JOB_PHASES}
        copy_us = j.args["tokens"] * cfg.model.embedding_dim * cfg.model.dtype_bytes / (rate * 1e9) * 1e6
        assert us["down"] == pytest.approx(copy_us, abs=0.1)
        assert us["up"] >= copy_us - 0.1
        assert us["compute"] == pytest.approx(len(j.args["experts"]) * cpu_s * 1e6, abs=0.1)
        assert us["ready"] == 0.0 and us["queue"] >= 0.0
        assert sum(us.values()) == pytest.approx(j.dur_s * 1e6, abs=0.5)
