"""aptmoe-calibrate: the CPU path end to end in quick mode, its file in the simulator, bad
input, the timing helpers, the profile assembly from synthetic GPU figures; the GPU path
where CUDA exists."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.resources
import io
import itertools
import json
import time
from pathlib import Path

import pytest
from unittest import mock

torch = pytest.importorskip("torch")

from aptmoe.calibration import cli, profiler  # noqa: E402
from aptmoe.calibration.timing import Reps, host_sample, median_of, samples  # noqa: E402
from aptmoe.config import (ClusterConfig, Pipeline, PopularityConfig, RunConfig, ScheduleConfig,  # noqa: E402
                           TrainConfig, moe_model)
from aptmoe.profile import Hardware, ProfileCost, load_profile  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
# The CPU path only: on a GPU machine the GPU parts are skipped by flag, so this stays quick.
CPU_ARGS = ["--quick", "--models", "S", "--dtypes", "fp32", "--threads", "1,2", "-q"] + \
           (["--skip", "links,gpu"] if HAS_CUDA else [])


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory: pytest.TempPathFactory):
    """Runs the CLI once: (file, stdout, stderr, exit status, seconds)."""
    out = tmp_path_factory.mktemp("cal") / "cpu.json"
    stdout, stderr = io.StringIO(), io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = cli.main(["--out", str(out), *CPU_ARGS])
    return out, stdout.getvalue(), stderr.getvalue(), code, time.perf_counter() - t0


def test_cpu_quick_profile_loads(cpu_run) -> None:
    out, stdout, stderr, code, seconds = cpu_run
    assert code == 0, stderr
    p = load_profile(str(out))
    assert p.name == "cpu"
    assert p.made_by.command.startswith("aptmoe-calibrate --out")
    assert p.made_by.tool.startswith("aptmoe ")
    assert p.hardware.torch_version == torch.__version__
    have = {(c.d, c.h, c.dtype, c.direction, c.threads) for c in p.cpu_expert}
    available = profiler.thread_counts((1, 2), len(profiler.allowed_cores()))
    assert have == {(1024, 4096, "fp32", d, t) for d in ("fwd", "bwd") for t in available}
    for c in p.cpu_expert:
        assert list(c.seconds) == sorted(c.seconds) and c.seconds[0] > 0
    assert set(p.adam.cpu_s_per_param) == set(available)
    assert set(p.adam.cpu_call_s) == set(available) and all(0 < s < 0.05 for s in p.adam.cpu_call_s.values())
    cores = len(profiler.allowed_cores())
    if cores >= 2:                  # two CPU ranks updating at once, each on its half of the cores
        assert p.adam.shared_ranks == 2 and (cores // 2) in p.adam.cpu_shared_s_per_param
        assert all(x > 0 for x in p.adam.cpu_shared_s_per_param.values())
    assert p.gpu == ()
    # the capped link's pacing is timed on any machine: a copy ends later than its slot, by
    # less than a scheduler tick's worth
    assert p.pacer is not None and 0 < p.pacer.late_s < 0.01 and p.sources["pacer"].startswith("measured:")
    assert "wrote" in stdout and "cpu expert curves" in stdout
    assert seconds < 60


def test_cpu_profile_lists_the_gpu_parts_as_skipped(cpu_run) -> None:
    out, stdout, *_ = cpu_run
    p = load_profile(str(out))
    parts = {s.part for s in p.skipped}
    assert {"gpu", "links.p2p.inter_node"} <= parts
    if not HAS_CUDA:
        assert {"links.h2d", "links.d2h", "links.root_GBps", "links.duplex_GBps", "links.p2p.intra_node",
                "adam.gpu", "host_memory", "issue_tolls", "recv_wait"} <= parts
        assert p.adam.gpu_s_per_param is None and p.host_memory is None and p.issue_tolls is None
        assert p.recv_wait is None
        assert p.hardware.gpu_count == 0
    assert p.sources["gpu"].startswith("roofline")
    # ... and says so on the terminal, before measuring and in the summary
    assert "not measured" in stdout and "skipped:" in stdout
    assert "  gpu: " in stdout


def test_simulator_runs_with_the_cpu_profile(cpu_run) -> None:
    from aptmoe.sim.simulate import simulate

    out = cpu_run[0]
    for pipeline in (Pipeline.MOBIUS, Pipeline.APTMOE):
        cfg = RunConfig(model=moe_model("S", 8, num_layers=4), cluster=ClusterConfig(gpus_per_node=2, topo="C1+G2"),
                        schedule=ScheduleConfig(pipeline=pipeline, num_stages=4))
        result = simulate(cfg, str(out))
        assert not result.oom and result.iteration_s > 0
        # the measured CPU expert curves match MoE-S fp32: no "no curve" fallback for them
        assert not any(f.startswith("cpu e") and "no curve" in f for f in result.fallbacks)


def test_cpu_curves_feed_the_cost_source(cpu_run) -> None:
    p = load_profile(str(cpu_run[0]))
    cost = ProfileCost(p, moe_model("S", 8))
    c = next(c for c in p.cpu_expert if c.direction == "fwd")
    assert cost.cpu_expert_s(c.tokens[-1], "fwd", c.threads) == pytest.approx(c.seconds[-1])


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("args, says", [
    (["--models", "X"], "--models: 'X' is neither"),
    (["--models", "64x0"], "--models: '64x0' is neither"),
    (["--models", "30x64", "--heads", "4"], "--heads 4 does not divide the model width 30"),
    (["--blocks-on", "tpu"], "invalid choice"),
    (["--block-threads", "0"], "--block-threads must be positive"),
    (["--dispatch-repeats", "0"], "--dispatch-repeats must be positive"),
    (["--dispatch-ranks", "0"], "--dispatch-ranks must be positive"),
    (["--dispatch-ranks", "3"], "--dispatch-ranks 3: the probe runs as C1+G<n>, n one of 1, 2, 4"),
    (["--threads", "0,2"], "--threads: '0' is not a positive integer"),
    (["--threads", "a"], "--threads: 'a'"),
    (["--threads", ","], "--threads needs"),
    (["--dtypes", "fp64"], "--dtypes: 'fp64' is unknown"),
    (["--skip", "disk"], "--skip: 'disk' is unknown"),
    (["--heads", "3"], "--heads 3 does not divide"),
    (["--bogus"], "unrecognized arguments"),
    (["--base", "nowhere.json"], "--base nowhere.json: nowhere.json: no such calibration file"),
    (["--base", "a800-paper", "--skip", ",".join(cli.PARTS)], "--base with every part skipped measures nothing"),
    (["--base", "a800-paper", "--quick"], "--base a800-paper is of another machine: its gpu_name is 'A800"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path: Path, capsys, args: list[str], says: str) -> None:
    out = tmp_path / "x.json"
    assert cli.main(["--out", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert says in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_more_dispatch_ranks_than_gpus_is_refused_before_measuring(tmp_path: Path, capsys, monkeypatch) -> None:
    hw = Hardware("NVIDIA H200", 2, 141 * 10**9, "test CPU", 1, 16, 10**11, torch.__version__)
    monkeypatch.setattr(profiler, "probe_machine",
                        lambda opts: profiler.Machine(gpus=(0, 1), cpus=tuple(range(16)), threads=(2,), hardware=hw))
    monkeypatch.setattr(profiler, "calibrate", lambda *a, **k: pytest.fail("measured before refusing"))
    assert cli.main(["--out", str(tmp_path / "x.json"), "--dispatch-ranks", "4", "--quick"]) == 2
    err = capsys.readouterr().err
    assert "--dispatch-ranks 4: this machine has 2 GPU(s) to run the probe on; give at most 2" in err
    assert len(err.strip().splitlines()) == 1 and list(tmp_path.iterdir()) == []


def test_a_failed_probe_run_is_one_line_and_no_file(tmp_path: Path, capsys, monkeypatch) -> None:
    from aptmoe.run_process import ExecutorFailed

    def fails(*a, **k):
        raise ExecutorFailed("the dispatch probe (aptmoe-run GPipe on a tiny model) failed: aptmoe-run failed (exit 1)")
    monkeypatch.setattr(profiler, "calibrate", fails)
    assert cli.main(["--out", str(tmp_path / "x.json"), "--quick"]) == 1
    err = capsys.readouterr().err
    assert "the dispatch probe" in err and "no file written" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and list(tmp_path.iterdir()) == []


def test_an_adam_timing_a_busy_cpu_made_impossible_is_refused_in_one_line(tmp_path: Path, capsys, monkeypatch) -> None:
    """A block's call no longer than the small call (what a CPU busy with other work made of
    them once) leaves no time per parameter: timed again, then one line and no file, where it
    had made the update free and then a division by zero."""
    tries = []

    def instant_pool(sizes):
        tries.append(1)
        return (lambda: None), 1 << 20          # a 1 Mi-parameter "call" that takes no time
    monkeypatch.setattr(profiler, "_adam_pool", instant_pool)
    out = tmp_path / "x.json"
    skip = "links,gpu,cpu,dispatch,memory,p2p,tolls,pacer,cpujob,policy"
    assert cli.main(["--out", str(out), "--quick", "--threads", "1", "--skip", skip, "-q"]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "CPU Adam at 1 threads" in err and "no file written" in err
    assert len(tries) == 1 and not out.exists()


def test_out_in_a_missing_folder_is_refused(tmp_path: Path, capsys) -> None:
    assert cli.main(["--out", str(tmp_path / "missing" / "x.json"), "--quick"]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "missing").exists()


# --------------------------------------------------------------------------- helpers


def test_samples_drop_the_warmup_and_take_the_median() -> None:
    values = iter([100.0, 3.0, 1.0, 2.0, 50.0])
    assert median_of(lambda: next(values), Reps(warmup=1, reps=3, min_reps=3, budget_s=0)) == 2.0
    # a spent budget stops after min_reps
    counter = itertools.count()
    assert len(samples(lambda: float(next(counter)), Reps(warmup=0, reps=10, min_reps=2, budget_s=0))) == 2


def test_host_sample_excludes_the_setup() -> None:
    s = host_sample(lambda: time.sleep(0.01), setup=lambda: time.sleep(0.05))
    assert 0.009 < median_of(s, Reps(0, 3, 3, 0)) < 0.04


def test_cli_knows_the_profiler_parts() -> None:
    assert cli.PARTS == profiler.PARTS and cli.MODEL_SIZES == profiler.MODEL_SIZES


def test_thread_counts_are_capped_at_the_machine() -> None:
    assert profiler.thread_counts((7, 14, 28), 64) == (7, 14, 28)
    assert profiler.thread_counts((7, 14, 28), 16) == (7, 14, 16)
    assert profiler.thread_counts((7, 14, 28), 2) == (2,)
    assert profiler.root_counts(4) == [1, 2, 4] and profiler.root_counts(3) == [1, 2, 3]


def test_monotone_and_link_fit() -> None:
    values, moved = profiler.monotone([1.0, 3.0, 2.0, 4.0])
    assert values == (1.0, 2.5, 2.5, 4.0) and moved == pytest.approx([0, 1 / 6, 0.25, 0])
    pts = [(b, 8e-6 + b / 50e9) for b in (1 << 16, 1 << 20, 1 << 24, 1 << 28)]
    fit, how = profiler.link_fit(pts)
    assert fit.GBps == pytest.approx(50, rel=1e-3) and fit.latency_s == pytest.approx(8e-6, rel=1e-3)
    assert "least-squares" in how and "fit error max 0%" in how and len(fit.points) == 4
    # an unphysical least-squares fit falls back to the two-point line
    fit, how = profiler.link_fit([(10**6, 1e-5), (10**8, 1e-2), (10**9, 0.1)])
    assert fit.GBps > 0 and fit.latency_s >= 0 and "two-point" in how


def test_attention_block_takes_whole_sequences() -> None:
    block = profiler.AttentionBlock(64, 4, 8, torch.float32, torch.device("cpu"))
    x = block.inputs(32)
    assert x.shape == (4, 8, 64) and block.forward(x).shape == x.shape
    assert sum(p.numel() for p in block.params) == moe_model("S", 8).with_(embedding_dim=64).attn_params


def test_expert_curves_on_a_gpu_are_measured_every_32_tokens_up_to_1024() -> None:
    full = profiler.sizes_for(profiler.Options())
    assert set(range(32, 1025, 32)) | set(full.gpu_tokens) == set(full.expert_tokens)
    assert list(full.expert_tokens) == sorted(full.expert_tokens) and full.expert_tokens[-1] == 16384
    quick = profiler.sizes_for(profiler.Options(quick=True))
    assert quick.expert_tokens == quick.gpu_tokens                 # --quick: the powers alone
    capped = profiler.sizes_for(profiler.Options(gpu_max_tokens=100))
    assert capped.expert_tokens == (1, 2, 4, 8, 16, 32, 64, 96)


def test_an_expert_pool_makes_its_gradient_buffers_before_any_timed_backward() -> None:
    """Made at an expert's first backward, they put an allocation (pinned, with a GPU) into the
    first timed samples of a pool; the backward sample must find them and write into them."""
    pool = profiler.ExpertPool(16, 32, torch.float32, torch.device("cpu"), pool_bytes=3 * 2 * 16 * 32 * 4)
    assert len(pool.blocks) == 3
    assert all(g is not None for b in pool.blocks for g in (b.module.w1.grad, b.module.w2.grad))
    made = [b.grads() for b in pool.blocks]
    run = profiler.expert_samplers(pool, 4, lambda fn, setup: (lambda: (setup(), fn())))["bwd"]
    for _ in range(2 * len(pool.blocks)):
        run()
    for b, (g1, g2) in zip(pool.blocks, made):
        assert b.grads()[0] is g1 and b.grads()[1] is g2
        assert g1.abs().sum() > 0 and g2.abs().sum() > 0         # the backwards wrote into them


def test_a_pool_times_each_backward_on_an_expert_whose_forward_ran_a_pool_ago() -> None:
    """A step's backward finds its expert's weights in memory, not in the cache its forward
    left them in. Timed right after an untimed forward of the same expert, an MoE-M expert
    (128 MiB) came from the H200 host's 300 MiB cache. The sampler must take the next expert
    each time, with what its own forward kept: the gradients it writes are that forward's."""
    pool = profiler.ExpertPool(16, 32, torch.float32, torch.device("cpu"), pool_bytes=3 * 2 * 16 * 32 * 4)
    forwards: list[int] = []
    real_forward = profiler.exec_model.expert_forward

    def counting(x, w1, w2, keep):
        forwards.append(next(i for i, b in enumerate(pool.blocks) if b.weights()[0].data_ptr() == w1.data_ptr()))
        return real_forward(x, w1, w2, keep)

    run = profiler.expert_samplers(pool, 4, lambda fn, setup: (lambda: (setup(), fn())))["bwd"]
    with mock.patch.object(profiler.exec_model, "expert_forward", counting):
        used = []
        for _ in range(2 * len(pool.blocks)):
            run()
            used.append(pool.at)
    assert forwards == [0, 1, 2]                      # one forward each, all before the first backward
    assert used == [0, 1, 2, 0, 1, 2]                 # each backward on the next expert
    x, hidden, g = pool.backward_state(4)             # expert 0 again: its kept forward is exact
    w1, w2 = pool.weights()
    assert torch.equal(hidden, x @ w1.t())
    warm = profiler.expert_samplers(pool, 4, lambda fn, setup: (lambda: (setup(), fn())), warm_backward=True)["bwd"]
    with mock.patch.object(profiler.exec_model, "expert_forward", counting):
        forwards.clear()
        warm()
    assert forwards == [pool.at]                      # the old way: the same expert's forward first


def test_the_full_mode_times_cpu_experts_at_dense_counts_below_128() -> None:
    full = profiler.sizes_for(profiler.Options()).cpu_tokens
    assert list(full) == sorted(set(full)) and full[-1] == 4096
    assert {1, 2, 4, 8, 16, 32, 64, 128} | set(profiler.CPU_DENSE_TOKENS) <= set(full)
    assert sum(t < 128 for t in full) >= 20
    assert profiler.sizes_for(profiler.Options(quick=True)).cpu_tokens == (1, 16, 256)


def test_profile_from_synthetic_gpu_figures() -> None:
    """The GPU half of the assembly, without a GPU: links, root, duplex, p2p and curves as
    the measurements would leave them; the H200 preset is chosen and overridden."""
    opts = profiler.Options(models=("S",), dtypes=("bf16",), threads=(1,), quick=True)
    sizes = profiler.sizes_for(opts)
    hw = Hardware("NVIDIA H200", 2, 141 * 10**9, "test CPU", 1, 2, 10**11, torch.__version__)
    machine = profiler.Machine(gpus=(0, 1), cpus=(0, 1), threads=(1,), hardware=hw)
    m = profiler.Measured()
    for g in (0, 1):
        for direction in ("h2d", "d2h"):
            for memory, rate in (("pinned", 50e9), ("pageable", 8e9)):
                m.copies[(direction, memory, g)] = [(b, 1e-5 + b / rate) for b in sizes.copy_bytes]
    m.root = {"h2d": {1: 50.0, 2: 100.0}, "d2h": {1: 50.0, 2: 90.0}}
    m.duplex = (45.0, 47.0)
    m.p2p = [(b, 1e-5 + b / 380e9) for b in sizes.copy_bytes]
    m.gpu.append(profiler.GpuCurve("e", 1024, 4096, None, None, None, "bf16", "fwd", (1, 2048), (4e-5, 1e-4)))
    m.adam_gpu, m.adam_gpu_impl = 1e-11, "fused"
    p = profiler.build_profile(opts, sizes, machine, m, profiler.skipped_parts(opts, machine),
                               name="synthetic", command="aptmoe-calibrate --out x.json").validate()
    assert p.links.h2d_pinned.GBps == pytest.approx(50, rel=1e-2)
    assert p.links.h2d_pageable.GBps == pytest.approx(8, rel=1e-2)
    assert p.links.p2p_intra.GBps == pytest.approx(380, rel=1e-2)
    assert p.links.root_h2d_GBps == {1: 50.0, 2: 100.0}
    assert p.roofline["name"] == "H200+measured" and p.roofline["root_GBps"] == 100.0
    assert p.roofline["gpu_tflops_bf16"] == pytest.approx(4 * 2048 * 1024 * 4096 / 1e-4 / 1e12, rel=1e-3)
    assert p.roofline["p2p_inter"] == {"latency_s": 15e-6, "GBps": 50.0}      # the preset's
    assert all(v.startswith("measured") for k, v in p.sources.items() if k.startswith("links."))
    assert {s.part for s in p.skipped} == {"links.p2p.inter_node"}
    json.loads(p.to_json())


@pytest.mark.parametrize("gpus", [(), (0,), (0, 1, 2, 3)])
def test_planned_tasks_measure_shared_adam_with_the_host_ranks(gpus, monkeypatch) -> None:
    """Every task runs with the arguments it was planned with. On one GPU the dispatch probe's
    single rank once leaked into the shared-Adam tasks (a closure read `ranks` after it was
    reassigned), and the profile they made was refused: 'cpu_shared.ranks ... got 1'."""
    calls: list[tuple[int, int]] = []
    monkeypatch.setattr(profiler, "measure_adam_cpu_shared", lambda t, r, *a: calls.append((t, r)))
    opts = profiler.Options(models=("S",), dtypes=("fp32",), threads=(2,), quick=True,
                            skip=frozenset({"links", "gpu", "cpu"}))
    hw = Hardware("NVIDIA H200", len(gpus), 141 * 10**9, "test CPU", 1, 16, 10**11, torch.__version__)
    machine = profiler.Machine(gpus=gpus, cpus=tuple(range(16)), threads=(2,), hardware=hw)
    tasks = profiler.plan_tasks(opts, profiler.sizes_for(opts), machine, profiler.Measured())
    for task in tasks:
        if task.label.startswith("adam cpu ") and "x" in task.label:
            task.run()
    ranks = max(2, len(gpus))
    assert calls and all(r == ranks for _, r in calls)
    assert sorted(t for t, _ in calls) == sorted({2, 16 // ranks})


@pytest.mark.parametrize("ranks, blocks_on, gpus, expect", [(None, "auto", (0, 1, 2, 3), ("cuda", 1)),
                                                            (4, "auto", (0, 1, 2, 3), ("cuda", 4)),
                                                            (None, "cpu", (), ("cpu", 2)),
                                                            (4, "cpu", (), ("cpu", 4))])
def test_the_dispatch_probe_runs_on_the_ranks_it_is_given(ranks, blocks_on, gpus, expect, monkeypatch) -> None:
    """--dispatch-ranks: the probe on as many ranks as the runs it stands for (one GPU, or two
    CPU ranks, without it); more ranks than GPUs is refused when the tasks are planned."""
    calls = []
    monkeypatch.setattr(profiler, "measure_dispatch", lambda device, r, repeats: calls.append((device, r)))
    opts = profiler.Options(models=("S",), dtypes=("fp32",), threads=(2,), quick=True, blocks_on=blocks_on,
                            skip=frozenset(profiler.PARTS) - {"dispatch"}, dispatch_ranks=ranks)
    hw = Hardware("NVIDIA H200", len(gpus), 141 * 10**9, "test CPU", 1, 16, 10**11, torch.__version__)
    machine = profiler.Machine(gpus=gpus, cpus=tuple(range(16)), threads=(2,), hardware=hw)
    tasks = profiler.plan_tasks(opts, profiler.sizes_for(opts), machine, profiler.Measured())
    [task] = [t for t in tasks if t.label.startswith("dispatch")]
    task.run()
    assert calls == [expect]
    if gpus:
        with pytest.raises(ValueError, match="--dispatch-ranks 5: this machine has 4 GPU"):
            profiler.plan_tasks(dataclasses.replace(opts, dispatch_ranks=5), profiler.sizes_for(opts), machine,
                                profiler.Measured())


# --------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_gpu_quick_path_on_one_gpu(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    code = cli.main(["--out", str(out), "--quick", "--gpus", "1", "--models", "S", "--dtypes", "fp32,bf16",
                     "--threads", "1", "--skip", "cpu", "-q"])
    assert code == 0
    p = load_profile(str(out))
    kinds = {(c.kind, c.dtype, c.direction) for c in p.gpu}
    assert kinds == {(k, t, d) for k in "eag" for t in ("fp32", "bf16") for d in ("fwd", "bwd")}
    for c in p.gpu:
        assert list(c.seconds) == sorted(c.seconds) and c.seconds[0] > 0
        assert c.tokens == tuple(sorted(c.tokens))
    assert p.links.h2d_pinned.GBps > 1 and p.links.h2d_pinned.points
    assert p.links.root_h2d_GBps.keys() == {1}
    assert p.adam.gpu_s_per_param is not None
    # host memory shared with copies: both rates under load are real, and their sum is the figure
    assert p.host_memory is not None and p.host_memory.GBps.keys() == {1}
    assert p.host_memory.GBps[1] > p.links.h2d_pinned.GBps / 2 and p.host_memory.cpu_alone_GBps[1] > 0
    assert p.sources["host_memory"].startswith("measured:")
    # the CPU stream beside h2d, d2h and both at once: the last with the most copies
    beside = p.host_memory.beside[1]
    assert len(beside) == 3 and max(beside)[0] > min(beside)[0] * 1.3
    assert "beside duplex copies" in p.sources["host_memory"]
    # and the copies' own rate beside Adam, each direction alone and both at once
    copies = p.host_memory.copies_beside_adam[1]
    assert copies.keys() == {1} and copies[1].keys() == {"h2d", "d2h", "duplex_h2d", "duplex_d2h"}
    assert min(copies[1].values()) > 1          # one GPU: no other rank to update beside it
    assert "copies beside Adam (GB/s)" in p.sources["host_memory"]
    # the issuing thread's tolls: slowdowns >= 1, tolls >= 0, the copy engine's from its traces
    t = p.issue_tolls
    assert t is not None and t.dma_factor >= 1 and t.memory_factor >= 1 and min(t.copy_s, t.chunk_s, t.cpu_job_s) >= 0
    assert t.adam_factor is not None and t.adam_factor >= 1
    # the executor's own calls beside its Adam and a copy with it (calibration/own_calls.py)
    assert "the executor's own calls" in p.sources["issue_tolls"]
    assert (t.copy_adam_factor is not None and t.copy_adam_factor >= 1) or \
        "the executor's own calls: not measured" in p.sources["issue_tolls"]
    assert "the executor's copy engine" in p.sources["issue_tolls"] and "Adam chunks" in p.sources["issue_tolls"]
    assert "links.p2p.intra_node" in {s.part for s in p.skipped}
    assert p.hardware.gpu_count == 1


# --------------------------------------------------------------------------- merge


def test_merge_takes_a_section_with_its_sources_and_records_every_command(tmp_path):
    from aptmoe.calibration.merge import main as merge_main
    from aptmoe.profile import load_profile

    base = load_profile("a800-paper")
    other = base.to_dict()
    other["name"] = "other"
    other["made_by"] = {**other["made_by"], "command": "aptmoe-calibrate --out other.json"}
    other["adam"] = {"cpu_s_per_param": {"4": 3e-10}, "gpu_s_per_param": 2e-11}
    other["sources"]["adam"] = "measured: a test figure"
    other["roofline"]["gpu_adam_params_per_s"] = 1.0e11
    other_path = tmp_path / "other.json"
    other_path.write_text(json.dumps(other))
    out = tmp_path / "merged.json"
    assert merge_main([str(Path(importlib.resources.files("aptmoe") / "profiles" / "a800-paper.json")),
                       "--take", f"adam={other_path}", "--name", "m", "--out", str(out)]) == 0
    merged = load_profile(str(out))
    assert merged.adam.cpu_s_per_param == {4: 3e-10} and merged.adam.gpu_s_per_param == 2e-11
    assert merged.sources["adam"] == "measured: a test figure"
    assert merged.roofline["gpu_adam_params_per_s"] == 1.0e11
    assert merged.links == base.links and merged.cpu_expert == base.cpu_expert       # the rest is the base's
    cmd = merged.made_by.command
    assert base.made_by.command in cmd and "aptmoe-calibrate --out other.json" in cmd and "merge" in cmd
    # merged again, the adam section's entry is the command that measured it, not the whole history
    again = tmp_path / "again.json"
    assert merge_main([str(Path(importlib.resources.files("aptmoe") / "profiles" / "a800-paper.json")),
                       "--take", f"adam={out}", "--take", f"gpu={out}", "--out", str(again)]) == 0
    entries = load_profile(str(again)).made_by.command.split(" | ")
    adam = [e for e in entries if e.startswith("adam from: ")]
    gpu = [e for e in entries if e.startswith("gpu from: ")]
    assert len(adam) == 1 and adam[0].startswith("adam from: aptmoe-calibrate --out other.json (")
    measured = f"{base.made_by.command} ({base.hardware.gpu_count}x {base.hardware.gpu_name}, {base.made_by.date})"
    assert entries[0] == measured                       # the base, with where and when it was measured
    assert gpu == [f"gpu from: {measured}"]             # the base of `out` measured it
    assert sum(e.startswith("python -m aptmoe.calibration.merge") for e in entries) == 1    # this merge; none nested


def test_merge_rejects_an_unknown_section(tmp_path, capsys):
    from aptmoe.calibration.merge import main as merge_main

    out = tmp_path / "m.json"
    assert merge_main(["a800-paper", "--take", "memory=a800-paper", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--take" in err[0] and not out.exists()


def test_the_builtin_h200_profile_loads_and_drives_the_simulator():
    from aptmoe.profile import load_profile
    from aptmoe.sim.simulate import simulate

    prof = load_profile("h200")
    assert prof.hardware.gpu_name == "NVIDIA H200" and prof.hardware.gpu_count == 4
    assert prof.gpu and prof.cpu_expert and prof.links.root_h2d_GBps[4] > prof.links.root_h2d_GBps[1]
    cfg = RunConfig(model=moe_model("S", 8, num_layers=4), cluster=ClusterConfig(gpus_per_node=2, topo="C1+G2"),
                    train=TrainConfig(batch_size=8, num_chunks=2, num_training_steps=1),
                    schedule=ScheduleConfig(pipeline=Pipeline.APTMOE, num_stages=4),
                    popularity=PopularityConfig(gini=0.3))
    r = simulate(cfg, prof)
    assert not r.oom and r.iteration_s > 0


# --------------------------------------------------------------------------- p2p


def test_p2p_through_the_process_group_times_each_size_on_cpu_ranks() -> None:
    """Two gloo ranks, one group per direction, as the executor sends: a ping-pong per size."""
    from aptmoe.calibration.p2p import measure_p2p_group

    from aptmoe.calibration.p2p import Width

    measured = measure_p2p_group("gloo", [4096, 1 << 20], reps=3, widths=[Width(64, 128, 4, 16)])
    assert [b for b, _ in measured.points] == [4096, 1 << 20]
    assert all(0 < s < 1.0 for _, s in measured.points)
    # the executor's blocks beside gloo's waiting receive: ratios of two medians of the same
    # work (gloo waits in a thread of its own; on this 2-core machine it may share a core)
    assert set(measured.recv_slowdown) == {("a", 64), ("e", 64), ("g", 64)}
    assert all(0.3 < x < 5.0 for x in measured.recv_slowdown.values())


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA or torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_p2p_through_nccl_is_a_link() -> None:
    from aptmoe.calibration.p2p import measure_p2p_group
    from aptmoe.calibration.reference import fit_link

    from aptmoe.calibration.p2p import Width

    measured = measure_p2p_group("nccl", [1 << 16, 1 << 20, 1 << 24, 1 << 26], reps=5,
                                 widths=[Width(2048, 8192, 32, 128)])
    points = measured.points
    latency, GBps = fit_link(points)
    assert points[-1][1] > points[0][1] and GBps > 5 and latency < 1e-3
    assert set(measured.recv_slowdown) == {("a", 2048), ("e", 2048), ("g", 2048)}
    assert all(0.5 < x < 10.0 for x in measured.recv_slowdown.values())


def test_the_wake_probe_measures_a_toll_and_a_slowdown() -> None:
    """calibration/wake.py on the CPU: a cost per wake (finite: the waker woke), the waker's
    latency beside the issuing loop and with the GIL free (at least nothing: each is timed from
    when its sleep was due), and a ratio."""
    from aptmoe.calibration.wake import MemoryStream, measure_wake_cost, slowdown

    r = measure_wake_cost("cpu", switch_us=100, period_us=200, ops=3000, rounds=2)
    assert r.wakes_per_s > 100 and r.issue_us > 0 and abs(r.cost_us) < 10_000
    assert 0 < r.latency_us < 100_000 and 0 < r.latency_idle_us < 100_000
    assert 0.2 < slowdown(lambda: MemoryStream(None), "cpu", ops=3000, rounds=2) < 50


def test_the_gpu_only_benches_say_so_on_a_cpu_machine_and_flags_are_checked(capsys) -> None:
    from aptmoe.calibration import p2p, pinned_bench, wake

    if not HAS_CUDA:
        assert pinned_bench.main(["--rounds", "1"]) == 2
        assert "needs a CUDA GPU" in capsys.readouterr().err
    for main, bad in ((p2p.main, ["--sizes", "4096,x"]), (wake.main, ["--switch-us", "100,fast"])):
        with pytest.raises(SystemExit) as e:
            main(bad)
        assert e.value.code == 2 and "comma-separated" in capsys.readouterr().err


def test_base_takes_what_the_run_measured_and_keeps_the_rest(cpu_run, tmp_path: Path) -> None:
    """--base: the CPU experts at one of the base's two thread counts timed again; the other
    count's curves, Adam and every skipped part stay the base's (calibration/refresh.py)."""
    base_path = cpu_run[0]
    out = tmp_path / "lease.json"
    others = ",".join(p for p in cli.PARTS if p != "cpu")
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        code = cli.main(["--out", str(out), "--base", str(base_path), "--quick", "--models", "S", "--dtypes", "fp32",
                         "--threads", "1", "--skip", others, "-q"])
    assert code == 0
    base, lease = json.loads(base_path.read_text()), json.loads(out.read_text())
    assert lease["name"] == "lease" and lease["adam"] == base["adam"] and lease["links"] == base["links"]
    assert [s["part"] for s in lease["skipped"]] == [s["part"] for s in base["skipped"]]

    def by_threads(doc, t):
        return [c for c in doc["cpu_expert"] if c["threads"] == t]

    assert by_threads(lease, 2) == by_threads(base, 2) and len(by_threads(base, 2)) == 2
    assert len(by_threads(lease, 1)) == 2 and by_threads(lease, 1) != by_threads(base, 1)   # timed again
    assert len(lease["cpu_expert"]) == len(base["cpu_expert"])
    assert "cpu_expert from: aptmoe-calibrate --out" in lease["made_by"]["command"]
    assert "2 curves this run did not measure kept from the base cpu" in lease["sources"]["cpu_expert"]
    load_profile(str(out))
