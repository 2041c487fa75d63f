"""Host memory shared by CPU work and the links' copies (sim/host_memory.py, the profile's
`host_memory`): closed-form durations, and the profile section's round trip."""

from __future__ import annotations

import json

import pytest
import simpy

from aptmoe.costs import adam_bytes, cpu_expert_bytes
from aptmoe.profile import HostMemory as HostMemoryFigures
from aptmoe.profile import ProfileCost, ProfileError, load_profile
from aptmoe.config import moe_model
from aptmoe.sim.host_memory import HostMemory
from aptmoe.sim.links import SharedRoot

GB = 1e9


def _run(jobs, copies, total=100.0, cpu_alone=80.0, root=1000.0, back=()):
    """jobs: (start, seconds alone, bytes); copies and `back`: (start, bytes, cap GB/s) on the
    h2d and the d2h root. -> job end times."""
    env = simpy.Environment()
    h2d, d2h = SharedRoot(env, lambda n: root), SharedRoot(env, lambda n: root)
    mem = HostMemory(env, total, cpu_alone, [h2d, d2h])
    ends = {}

    def job(i, at, seconds, nbytes):
        yield env.timeout(at)
        yield from mem.work(seconds, nbytes)
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


def test_a_copy_that_starts_mid_job_slows_the_rest():
    # alone until 0.5 s (half done), then at 50/80 for the other half
    assert _run([(0, 1.0, 80 * GB)], [(0.5, 500 * GB, 50.0)])[0] == pytest.approx(0.5 + 0.5 * 80 / 50)


def test_two_jobs_of_a_socket_do_not_slow_each_other():
    ends = _run([(0, 1.0, 80 * GB), (0.2, 1.0, 80 * GB)], [])
    assert ends == {0: pytest.approx(1.0), 1: pytest.approx(1.2)}


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
    assert cost.host_memory_GBps(14) is None
    assert any(f.startswith("host memory: not measured") for f in cost.fallbacks)
    q = p.with_(host_memory=HostMemoryFigures({14: 110.3, 16: 118.5}, {14: 75.6, 16: 85.2}))
    again = load_profile(str(q.save(tmp_path / "h.json")))
    assert again.host_memory == q.host_memory
    cost = ProfileCost(again, moe_model("M", 8))
    assert cost.host_memory_GBps(14) == (110.3, 75.6)
    assert cost.host_memory_GBps(13) == (110.3, 75.6) and cost.host_memory_GBps(32) == (118.5, 85.2)
    d = json.loads((tmp_path / "h.json").read_text())
    d["host_memory"]["GBps"]["14"] = -1
    (tmp_path / "bad.json").write_text(json.dumps(d))
    with pytest.raises(ProfileError, match="host_memory.GBps.14"):
        load_profile(str(tmp_path / "bad.json"))


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
    assert shared.metrics["busy/cpu"] > alone.metrics["busy/cpu"]
    assert out["GPipe"][0].iteration_s == pytest.approx(out["GPipe"][1].iteration_s)
