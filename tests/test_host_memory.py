"""Host memory shared by CPU work and the links' copies (sim/host_memory.py, the profile's
`host_memory`): closed-form durations, and the profile section's round trip."""

from __future__ import annotations

import json

import pytest
import simpy
from hypothesis import given, settings
from hypothesis import strategies as st

from aptmoe.costs import adam_bytes, cpu_expert_bytes
from aptmoe.profile import HostMemory as HostMemoryFigures
from aptmoe.profile import ProfileCost, ProfileError, load_profile
from aptmoe.config import moe_model
from aptmoe.sim.host_memory import HostMemory
from aptmoe.sim.links import SharedRoot

GB = 1e9


def _run(jobs, copies, total=100.0, cpu_alone=80.0, root=1000.0, back=(), beside=()):
    """jobs: (start, seconds alone, bytes); copies and `back`: (start, bytes, cap GB/s) on the
    h2d and the d2h root; the memory: a total less the copies (`beside` empty) or the CPU
    stream's measured points beside copies. -> job end times."""
    env = simpy.Environment()
    h2d, d2h = SharedRoot(env, lambda n: root), SharedRoot(env, lambda n: root)
    figures = HostMemoryFigures({14: total}, {14: cpu_alone}, {14: tuple(beside)} if beside else {})
    mem = HostMemory(env, figures.share(14), [h2d, d2h])
    ends = {}

    def job(i, at, seconds, nbytes, shared_slowdown=1.0):
        yield env.timeout(at)
        yield from mem.work(seconds, nbytes, shared_slowdown)
        ends[i] = env.now

    def copy(root, at, nbytes, cap):
        yield env.timeout(at)
        yield from root.transfer(nbytes, cap)

    for i, j in enumerate(jobs):
        env.process(job(i, *j))
    for c in copies:
        env.process(copy(h2d, *c))
    for c in back:
        env.process(copy(d2h, *c))
    env.run()
    return ends


def test_a_job_alone_takes_its_time_even_if_its_bytes_say_more():
    # 28 bytes a parameter in 0.25 ns would be 112 GB/s, over the 100 the memory gives:
    # alone, a job still takes what the calibration timed (its demand is capped at 80)
    assert _run([(0, 1.0, 112 * GB)], [])[0] == pytest.approx(1.0)


def test_a_streaming_job_beside_copies_gets_what_the_copies_leave():
    # copies at 50 GB/s for longer than the job: 100 - 50 = 50 of its 80 GB/s demand
    assert _run([(0, 1.0, 80 * GB)], [(0, 500 * GB, 50.0)])[0] == pytest.approx(80 / 50)


def test_a_compute_bound_job_does_not_wait_for_copies():
    # 20 GB/s of demand fits in the 50 the copies leave
    assert _run([(0, 1.0, 20 * GB)], [(0, 500 * GB, 50.0)])[0] == pytest.approx(1.0)


def test_a_copy_that_ends_mid_job_speeds_the_rest_up():
    # copies of 25 GB at 50 GB/s end at 0.5 s: the job does 0.5 * 50/80 of its second by
    # then, and the rest at full speed
    done_by_half = 0.5 * 50 / 80
    assert _run([(0, 1.0, 80 * GB)], [(0, 25 * GB, 50.0)])[0] == pytest.approx(0.5 + 1.0 - done_by_half)


def test_copies_in_both_directions_add_up():
    # 30 GB/s each way: 100 - 60 = 40 of the job's 80
    assert _run([(0, 1.0, 80 * GB)], [(0, 500 * GB, 30.0)], back=[(0, 500 * GB, 30.0)])[0] == pytest.approx(2.0)


def test_measured_points_set_what_a_job_gets_beside_copies():
    # the stream: 80 alone, 60 beside 50 GB/s, 40 beside 100 (both directions at 50)
    pts = [(50.0, 60.0), (100.0, 40.0)]
    assert _run([(0, 1.0, 80 * GB)], [(0, 500 * GB, 50.0)], beside=pts)[0] == pytest.approx(80 / 60)
    assert _run([(0, 1.0, 80 * GB)], [(0, 500 * GB, 50.0)], back=[(0, 500 * GB, 50.0)],
                beside=pts)[0] == pytest.approx(80 / 40)
    # between the points, on the line: 25 GB/s of copies leave 70
    assert _run([(0, 1.0, 80 * GB)], [(0, 500 * GB, 25.0)], beside=pts)[0] == pytest.approx(80 / 70)
    # beyond the last point along the last segment: 120 GB/s leave 32
    assert _run([(0, 1.0, 80 * GB)], [(0, 500 * GB, 60.0)], back=[(0, 500 * GB, 60.0)],
                beside=pts)[0] == pytest.approx(80 / 32)


def test_the_total_model_is_the_share_of_profiles_without_points():
    share = HostMemoryFigures({14: 110.0}, {14: 75.0}).share(14)
    assert [share.cpu_GBps(c) for c in (0, 50, 100, 110, 200)] == pytest.approx([110, 60, 10, 0, 0])


def test_a_point_above_its_neighbours_is_pooled_with_them():
    # 86 beside 49 GB/s of copies, over the 77 alone: noise, pooled to their mean
    share = HostMemoryFigures({16: 120.0}, {16: 77.0}, {16: ((49.0, 86.0), (53.0, 57.0))}).share(16)
    assert [v for pt in share.points for v in pt] == pytest.approx([0, 81.5, 49, 81.5, 53, 57])


@settings(max_examples=200, deadline=None)
@given(alone=st.floats(1, 200), pts=st.lists(st.tuples(st.floats(0.1, 300), st.floats(0, 300)), min_size=1, max_size=5),
       a=st.floats(0, 400), b=st.floats(0, 400))
def test_a_share_never_rises_with_the_copies_and_never_goes_negative(alone, pts, a, b):
    share = HostMemoryFigures({8: 100.0}, {8: alone}, {8: tuple(pts)}).share(8)
    lo, hi = sorted((a, b))
    assert share.cpu_GBps(hi) <= share.cpu_GBps(lo) + 1e-9
    assert share.cpu_GBps(hi) >= 0
    xs = [x for x, _ in share.points]
    assert xs == sorted(xs) and share.points[0][0] == 0


def test_a_copy_that_starts_mid_job_slows_the_rest():
    # alone until 0.5 s (half done), then at 50/80 for the other half
    assert _run([(0, 1.0, 80 * GB)], [(0.5, 500 * GB, 50.0)])[0] == pytest.approx(0.5 + 0.5 * 80 / 50)


def test_two_jobs_of_a_socket_do_not_slow_each_other():
    ends = _run([(0, 1.0, 80 * GB), (0.2, 1.0, 80 * GB)], [])
    assert ends == {0: pytest.approx(1.0), 1: pytest.approx(1.2)}


def test_adam_chunks_of_two_ranks_slow_each_other_only_while_both_run():
    # jobs: (start, seconds alone, bytes, slowdown beside another Adam chunk). Chunk 0 runs
    # alone for 0.5 s (half done), then both at 1/1.5 until chunk 0 ends at 0.5 + 0.5 * 1.5 =
    # 1.25; chunk 1 has done 0.75 / 1.5 = 0.5 by then and does the rest alone: 1.75
    ends = _run([(0, 1.0, 1 * GB, 1.5), (0.5, 1.0, 1 * GB, 1.5)], [])
    assert ends == {0: pytest.approx(1.25), 1: pytest.approx(1.75)}
    # a CPU expert beside an Adam chunk slows neither (different ranks' jobs: only Adam has a
    # figure for sharing)
    assert _run([(0, 1.0, 1 * GB, 1.5), (0, 1.0, 1 * GB)], []) == {0: pytest.approx(1.0), 1: pytest.approx(1.0)}
    # beside copies as well, both bounds: 80 GB/s of demand in the 50 left is 0.625 of its
    # speed, and 1 / 1.5 of that beside the other chunk (both end at 1.5 / 0.625 = 2.4); one
    # chunk beside the copies alone takes the copies' bound only (1.6)
    ends = _run([(0, 1.0, 80 * GB, 1.5), (0, 1.0, 80 * GB, 1.5)], [(0, 500 * GB, 50.0)])
    assert ends == {0: pytest.approx(2.4), 1: pytest.approx(2.4)}
    assert _run([(0, 1.0, 80 * GB, 1.5)], [(0, 500 * GB, 50.0)]) == {0: pytest.approx(1.6)}


def test_job_bytes():
    d, h, b = 2048, 8192, 4
    assert cpu_expert_bytes(d, h, b, 0, "fwd") == 2 * d * h * b
    assert cpu_expert_bytes(d, h, b, 0, "bwd") == 4 * d * h * b
    assert cpu_expert_bytes(d, h, b, 3, "fwd") > cpu_expert_bytes(d, h, b, 1, "fwd")
    assert adam_bytes(1000, 4) == 28_000


def test_profile_section_round_trips_and_is_checked(tmp_path):
    p = load_profile("a800-paper")
    assert p.host_memory is None
    cost = ProfileCost(p, moe_model("M", 8))
    assert cost.memory_share(14) is None
    assert any(f.startswith("host memory: not measured") for f in cost.fallbacks)
    q = p.with_(host_memory=HostMemoryFigures({14: 110.3, 16: 118.5}, {14: 75.6, 16: 85.2},
                                              {16: ((49.3, 70.0), (100.2, 40.5))}))
    again = load_profile(str(q.save(tmp_path / "h.json")))
    assert again.host_memory == q.host_memory
    cost = ProfileCost(again, moe_model("M", 8))
    assert cost.memory_share(14).points == ((0, 110.3), (110.3, 0))          # no points: the total model
    assert any("not measured, CPU work gets the measured total" in f for f in cost.fallbacks)
    assert cost.memory_share(13) == cost.memory_share(14)
    assert cost.memory_share(32).points == ((0, 85.2), (49.3, 70.0), (100.2, 40.5))
    assert cost.memory_share(32).cpu_alone_GBps == 85.2
    good = json.loads((tmp_path / "h.json").read_text())
    for change, named in [(lambda h: h["GBps"].update({"14": -1}), "host_memory.GBps.14"),
                          (lambda h: h["beside"].update({"15": [[1, 2]]}), "host_memory.beside.15"),
                          (lambda h: h["beside"].update({"16": [[1, 2, 3]]}), r"host_memory.beside.16\[0\]"),
                          (lambda h: h["beside"].update({"16": []}), "host_memory.beside.16"),
                          (lambda h: h.update({"beside": [1]}), "host_memory.beside"),
                          (lambda h: h["cpu_alone_GBps"].pop("16"), "host_memory.cpu_alone_GBps"),
                          (lambda h: h.update({"copies_beside_adam": {"15": {"1": {"h2d": 40.0}}}}),
                           "host_memory.copies_beside_adam.15"),
                          (lambda h: h.update({"copies_beside_adam": {"16": {"1": {"up": 40.0}}}}),
                           "host_memory.copies_beside_adam.16.1.up"),
                          (lambda h: h.update({"copies_beside_adam": {"16": {"1": {"h2d": -1}}}}),
                           "host_memory.copies_beside_adam.16.1.h2d"),
                          (lambda h: h.update({"copies_beside_adam": {"16": {"0": {"h2d": 40.0}}}}),
                           "host_memory.copies_beside_adam.16.0"),
                          (lambda h: h.update({"copies_beside_adam": {"16": {"h2d": 40.0}}}),
                           "host_memory.copies_beside_adam.16.h2d"),
                          (lambda h: h.update({"copies_beside_adam": {"16": [1]}}),
                           "host_memory.copies_beside_adam.16"),
                          (lambda h: h.update({"copies_beside_adam": [1]}), "host_memory.copies_beside_adam")]:
        d = json.loads(json.dumps(good))
        change(d["host_memory"])
        (tmp_path / "bad.json").write_text(json.dumps(d))
        with pytest.raises(ProfileError, match=named):
            load_profile(str(tmp_path / "bad.json"))


def test_the_copies_rate_beside_adam_is_kept_by_condition_and_round_trips(tmp_path):
    """calibration/host_memory.py times the copies while Adam chunks run, in each direction
    and both at once; the profile keeps each direction's rate, "duplex_" with both busy."""
    pytest.importorskip("torch")
    from aptmoe.calibration.host_memory import HostMemoryResult

    r = HostMemoryResult(14, 80.0, copy_beside_adam_GBps={
        1: {"h2d": {"h2d": 44.8}, "d2h": {"d2h": 54.5}, "duplex": {"h2d": 52.8, "d2h": 51.9}},
        2: {"h2d": {"h2d": 40.1}, "d2h": {"d2h": 47.0}, "duplex": {"h2d": 24.2, "d2h": 30.5}}})
    assert r.copies_beside_adam() == {1: {"h2d": 44.8, "d2h": 54.5, "duplex_h2d": 52.8, "duplex_d2h": 51.9},
                                      2: {"h2d": 40.1, "d2h": 47.0, "duplex_h2d": 24.2, "duplex_d2h": 30.5}}
    q = load_profile("a800-paper").with_(host_memory=HostMemoryFigures({14: 110.3}, {14: 75.6}, {},
                                                                       {14: r.copies_beside_adam()}))
    again = load_profile(str(q.save(tmp_path / "c.json")))
    assert again.host_memory == q.host_memory and again.host_memory.copies_beside_adam[14][2]["duplex_h2d"] == 24.2
    assert "copies_beside_adam" not in json.loads(
        load_profile("a800-paper").with_(host_memory=HostMemoryFigures({14: 1.0}, {14: 1.0})).to_json())["host_memory"]


def test_the_calibration_s_record_keeps_adam_beside_copies_for_every_count_of_ranks_updating():
    """calibration/host_memory.py times this rank's Adam alone and beside each condition's
    copies, with one rank updating and with every rank: the sources keep all of it, the check
    on the simulator's compounding of the two slowdowns (sim/host_memory.py)."""
    pytest.importorskip("torch")
    from aptmoe.calibration.host_memory import HostMemoryResult, host_memory_source

    r = HostMemoryResult(14, 80.0, {"h2d": 60.0, "d2h": 55.0}, {"h2d": 47.0, "d2h": 54.0},
                         adam_ns={1: {"alone": 0.302, "h2d": 0.35, "d2h": 0.433, "duplex": 0.5},
                                  2: {"alone": 0.417, "h2d": 0.52, "d2h": 0.56, "duplex": 0.64}},
                         copy_beside_adam_GBps={1: {"h2d": {"h2d": 44.8}}, 2: {"h2d": {"h2d": 37.07}}})
    text = host_memory_source({14: r})
    assert ("check: an Adam chunk (ns/param) alone and beside copies, 1 rank updating: alone 0.302, h2d 0.350, "
            "d2h 0.433, duplex 0.500; 2 ranks updating: alone 0.417, h2d 0.520, d2h 0.560, duplex 0.640; "
            "copies beside Adam (GB/s), 1 rank updating: h2d 44.8; 2 ranks updating: h2d 37.1") in text


def test_the_simulator_slows_cpu_work_beside_copies_where_the_profile_says():
    """The one-GPU H200 profile with and without its host_memory section: the same APTMoE
    step, whose CPU experts and Adam overlap the loads and offloads, only gets longer, and
    its CPU busy time with it; GPipe (no CPU work, no copies) does not move."""
    import shlex

    from aptmoe.flags import add_cluster_flags, add_seed_flags, config_from_args, make_parser
    from aptmoe.profile import cost_for
    from aptmoe.sim.simulate import simulate

    p = make_parser("t", "")
    add_seed_flags(p)
    add_cluster_flags(p)
    prof = load_profile("h200-1gpu")
    assert prof.host_memory is not None
    bare = prof.with_(host_memory=None)
    line = ("--is_moe=True --model_config=M --num_layers 4 --num_experts 8 --gini 0.6 "
            "--batch_size 32 --num_chunks 4 --seq_length 128 --gpus 1 --topo C1+G1 --num_training_steps 1 "
            "--num_warmup_steps 0")
    out = {}
    for pipe in ("APTMoE", "GPipe"):
        stages = "" if pipe == "GPipe" else " --num_stages 4"
        cfg = config_from_args(p.parse_args(shlex.split(f"{line}{stages} --pipeline {pipe}")),
                               **prof.cluster_defaults())
        out[pipe] = [simulate(cfg, cost_for(cfg, q)) for q in (prof, bare)]
    shared, alone = out["APTMoE"]
    assert shared.iteration_s > alone.iteration_s
    # busy/cpu is a share of the step: the CPU's busy seconds are what the sharing lengthens
    assert shared.metrics["busy/cpu"] * shared.iteration_s > alone.metrics["busy/cpu"] * alone.iteration_s
    assert out["GPipe"][0].iteration_s == pytest.approx(out["GPipe"][1].iteration_s)


def test_the_simulator_slows_an_adam_chunk_only_while_another_rank_updates():
    """Two ranks of the 2-GPU H200 profile, GPipeOffload: Adam chunks take the figure for
    ranks updating at once (0.42 against 0.31 ns per parameter alone, at 14 threads) only
    while another rank's chunk runs beside them."""
    import shlex

    from aptmoe.flags import add_cluster_flags, add_seed_flags, config_from_args, make_parser
    from aptmoe.profile import cost_for
    from aptmoe.sim.simulate import simulate
    from aptmoe.trace import Trace

    p = make_parser("t", "")
    add_seed_flags(p)
    add_cluster_flags(p)
    prof = load_profile("h200-2gpu")
    line = ("--is_moe=True --model_config=S --num_layers 8 --num_stages 4 --num_experts 8 --gini 0.3 "
            "--batch_size 32 --num_chunks 4 --seq_length 128 --gpus 2 --topo C1+G2 --num_training_steps 1 "
            "--num_warmup_steps 0 --pipeline GPipeOffload")
    cfg = config_from_args(p.parse_args(shlex.split(line)), **prof.cluster_defaults())
    cost, trace = cost_for(cfg, prof), Trace("predicted")
    simulate(cfg, cost, trace=trace)
    slow = cost.adam_shared_slowdown(cfg.cluster.worker_cores)
    assert slow > 1.2
    ups = [e for e in trace.events if e.cat == "update" and e.stream == "cpu"]
    assert {e.rank for e in ups} == {0, 1}

    def overlapped(e) -> bool:
        return any(o.rank != e.rank and o.start_s < e.end_s and e.start_s < o.end_s for o in ups)

    copies = [e for e in trace.events if e.stream in ("load", "offload") and e.end_s > e.start_s]

    def beside_copy(e) -> bool:
        return any(c.start_s < e.end_s and e.start_s < c.end_s for c in copies)

    kinds = {(o, c): [] for o in (True, False) for c in (True, False)}
    for e in ups:
        alone = cost.adam_cpu_alone_s(e.args["params"], cfg.cluster.worker_cores)
        kinds[(overlapped(e), beside_copy(e))].append(e.dur_s / alone)
    assert kinds[(True, False)] and kinds[(False, False)]
    # beside no copy: a chunk no other rank's overlaps takes its time alone, one overlapped all
    # through the figure for ranks at once, and none more than that; beside copies the memory
    # share may be the tighter bound (since session 22's timing a chunk beside both took 1.52x)
    assert all(r == pytest.approx(1.0, rel=1e-9) for r in kinds[(False, False)])
    assert max(kinds[(True, False)]) == pytest.approx(slow, rel=1e-9)
    assert all(1.0 - 1e-9 <= r for rs in kinds.values() for r in rs)
