"""The executor on the CPU (gloo): reference equality of all four schedules with CPU experts
and the link cap on, its outputs, its launchers, its faults, and its parts (the stepwise
layer, the link cap, the CPU worker's priorities)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from exec_helpers import TINY, run_and_compare  # noqa: E402

from aptmoe.exec.cli import main as run_main  # noqa: E402
from aptmoe.exec.thread_clock import SCHEDSTAT  # noqa: E402
from aptmoe.plan.actions import Block  # noqa: E402
from aptmoe.trace import CPU_JOB_PHASES, Trace  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CPU = ["--device", "cpu", "--gpus", "2"]


@pytest.fixture(scope="module")
def capped_run(tmp_path_factory):
    """All four schedules on 2 gloo ranks with a slow link (so APTMoE puts experts on the CPU)."""
    tmp = tmp_path_factory.mktemp("capped")
    return tmp / "run", run_and_compare(tmp, [*CPU, "--pipeline", "all", "--link-bandwidth", "0.02"], cuda=False)


def test_every_schedule_equals_the_single_process_reference(capped_run) -> None:
    _, checked = capped_run
    assert set(checked) == {"GPipe", "GPipeOffload", "Mobius", "APTMoE"}
    for name, c in checked.items():
        a = c["agreement"]
        assert a.within(1e-5), f"{name}: loss {a.loss:.2e}, params {a.params:.2e} ({a.worst_param})"
    # the comparison means something: CPU experts ran, and training moved the loss
    assert checked["APTMoE"]["result"]["metrics"]["cpu/expert_share"] > 0
    losses = checked["Mobius"]["result"]["losses"]
    assert losses[0] != losses[-1]


def test_results_have_the_simulators_keys_and_a_trace_per_schedule(capped_run) -> None:
    out, checked = capped_run
    doc = json.loads((out / "results.json").read_text())
    assert doc["source"] == "real"
    for name, res in doc["schedules"].items():
        for key in ("iteration_s", "throughput_seq_per_s", "oom", "peak_gpu_bytes"):
            assert key in res
        assert res["iteration_s"] > 0 and not res["oom"]
        tr = Trace.load(out / f"trace-{name}.json")
        assert tr.source == "real" and tr.num_ranks == 2
        streams = {e.stream for e in tr.events}
        assert {"compute", "net"} <= streams
        if name != "GPipe":
            assert {"load", "offload", "cpu"} <= streams
        assert (out / f"timeline-{name}.png").stat().st_size > 0
    apt = Trace.load(out / "trace-APTMoE.json")
    assert any(e.cat == "cpu-expert" for e in apt.events)
    # each CPU job spans its experts' work, its phases adding up to its span
    jobs = [e for e in apt.events if e.cat == "cpu-job"]
    assert jobs and all(e.stream == "cpu-jobs" for e in jobs)
    for j in jobs:
        phases = sum(j.args[f"{k}_us"] for k in CPU_JOB_PHASES)
        assert abs(phases - j.dur_s * 1e6) < 1.0, (j.name, j.args)
        mine = [e for e in apt.events if e.stream == "cpu" and e.rank == j.rank and e.cat in ("cpu-expert", "recompute")
                and e.name.split("@")[0] == j.name.split("@")[0] and e.args["layer"] == j.args["layer"]
                and j.start_s <= e.start_s <= j.end_s]
        assert sorted(e.args["experts"][0] for e in mine) == sorted(j.args["experts"]), j.name
    # every block on the compute stream carries the host time of its call; on CPU ranks the
    # call is the whole block, so the host time is no shorter than a fraction of the span
    blocks = [e for e in apt.events if e.stream == "compute" and "@" in e.name]
    assert blocks and all(e.args["host_us"] > 0 for e in blocks)
    assert sum(e.args["host_us"] for e in blocks) > 0.5 * sum(e.dur_s for e in blocks) * 1e6
    # and what of that host time the issuing thread ran (no more than the call took), as
    # every CPU expert and Adam chunk carries its worker thread's, with its wait for a core
    # where Linux keeps it (exec/thread_clock.py)
    jobs = [e for e in apt.events if e.stream == "cpu"]
    assert jobs and all(0 <= e.args["run_us"] <= e.dur_s * 1e6 + 50 for e in jobs)
    assert all(0 <= e.args["queued_us"] <= e.dur_s * 1e6 + 50 for e in jobs) or not os.path.exists(SCHEDSTAT)
    assert all(0 <= e.args["run_us"] <= e.args["host_us"] + 50 for e in blocks)
    assert sum(e.args["run_us"] for e in blocks) > 0
    assert any(e.cat.startswith("load-inter-") for e in apt.events)
    assert (out / "results.csv").read_text().startswith("pipeline,")
    assert not list(out.glob("store-*.port"))      # how the ranks met is not an output


def test_a_spawned_run_says_where_its_wall_time_went(capped_run) -> None:
    """(And what the host memory streamed for it.) Every part from the parent's launch to the processes' exit, in order, adding up to
    the total, and the timed steps no shorter than the step times they hold."""
    out, _ = capped_run
    for name, res in json.loads((out / "results.json").read_text())["schedules"].items():
        wall = res["wall_s"]
        parts = [k for k in wall if k != "total"]
        assert parts == ["start", "imports", "prepare", "group", "build", "probes", "warmup", "steps", "finish",
                         "exit"], name
        assert all(wall[k] >= 0 for k in parts)
        assert sum(wall[k] for k in parts) == pytest.approx(wall["total"], abs=1e-3)
        assert wall["steps"] >= sum(res["step_s"]) * 0.999
        # the host memory stream beside the run, on the CPU worker of a plan that has CPU work
        if name == "GPipe":
            assert "host_stream_GBps" not in res
        else:
            s = res["host_stream_GBps"]
            assert len(s["before"]) == len(s["after"]) == 2 and min(s["before"] + s["after"]) > 0


def test_a_send_is_posted_before_its_rank_computes_anything_else(capped_run) -> None:
    """The thread that finishes a micro-batch posts its send before its next action: no send
    waits for the net thread to get the GIL and a core (it used to follow the next forward, or
    the stage's update, by up to 2 ms on the 2-core machine). On CPU ranks the trace's times
    are the host's, so the order is exact."""
    out, _ = capped_run
    for name in ("GPipe", "GPipeOffload", "Mobius", "APTMoE"):
        tr = Trace.load(out / f"trace-{name}.json")
        sends = [e for e in tr.events if e.cat == "send"]
        assert sends
        for e in sends:
            producer = e.name.replace("SF", "F").replace("SB", "B")          # 0SF1 -> 0F1, 1SB0 -> 1B0
            done = [p.end_s for p in tr.events if p.rank == e.rank and p.stream == "compute" and p.name == producer]
            end = max(t for t in done if t <= e.start_s + 1e-9)                 # this step's occurrence
            after = [c.start_s for c in tr.events
                     if c.rank == e.rank and c.stream == "compute" and c.start_s >= end and c.name != producer]
            assert not after or e.start_s <= min(after) + 1e-6, (name, e.name, e.start_s, min(after))


def _net_stub(program: list, deps: dict):
    """A rank's net plumbing without a process group: `_post_through` over `program`, with
    `deps` each send's producer, recording what it posts instead of calling gloo or NCCL."""
    from types import SimpleNamespace

    from aptmoe.exec.runtime import RankRuntime

    posted: list[str] = []
    rt = SimpleNamespace(net=program, net_index={a: i for i, a in enumerate(program)}, net_next=0,
                         net_lock=threading.Lock(), plan=SimpleNamespace(deps_of=lambda a: deps.get(a, ())),
                         done={a: threading.Event() for a in [*program, *(d for ds in deps.values() for d in ds)]},
                         _send=lambda a: posted.append(str(a)), _recv=lambda a: posted.append(str(a)))
    return rt, posted, lambda a: RankRuntime._post_through(rt, a)


def test_a_receive_is_posted_by_whoever_needs_it_in_the_net_programs_order() -> None:
    """The compute thread posts the receive its next action needs, and the net program's
    messages before it, itself; a send whose micro-batch is not yet computed stops it there
    (the producer's thread posts it when done); nothing is posted twice."""
    from aptmoe.plan.actions import Action, Kind

    f0, f1 = Action(0, Kind.FWD, 0), Action(0, Kind.FWD, 1)
    sf0, rb0, sf1, rb1 = (Action(0, Kind.SEND_F, 0), Action(0, Kind.RECV_B, 0),
                          Action(0, Kind.SEND_F, 1), Action(0, Kind.RECV_B, 1))
    rt, posted, post_through = _net_stub([sf0, rb0, sf1, rb1], {sf0: (f0,), sf1: (f1,)})
    post_through(rb0)                        # sf0's forward has not run: nothing may pass it
    assert posted == [] and rt.net_next == 0
    rt.done[f0].set()
    post_through(rb0)                        # the send, then the receive behind it
    assert posted == ["0SF0", "0RB0"] and rt.done[rb0].is_set() and not rt.done[sf1].is_set()
    post_through(rb1)                        # stops at sf1, its forward not run
    assert posted == ["0SF0", "0RB0"]
    rt.done[f1].set()
    post_through(sf1)                        # the producer's thread posts its send
    post_through(sf1)
    post_through(rb0)                        # already posted: nothing
    assert posted == ["0SF0", "0RB0", "0SF1"]
    post_through(rb1)
    assert posted == ["0SF0", "0RB0", "0SF1", "0RB1"] and all(rt.done[a].is_set() for a in rt.net)


def test_the_issuing_thread_waits_for_the_block_its_reach_back_only_when_that_has_not_run() -> None:
    """At most AHEAD_BLOCKS blocks beyond the GPU: the issuing thread blocks (GIL-free) on the
    end of the block that many back when the GPU has not passed it, and never otherwise."""
    from types import SimpleNamespace

    from aptmoe.config import AHEAD_BLOCKS
    from aptmoe.exec.runtime import RankRuntime

    waited: list[int] = []
    gpu_done = {"upto": -1}                 # the GPU has finished blocks 0..upto
    dev = SimpleNamespace(passed=lambda m: m <= gpu_done["upto"], block_on=waited.append)
    def rank(reach: int):
        return SimpleNamespace(ahead=deque(), dev=dev, cfg=SimpleNamespace(schedule=SimpleNamespace(ahead_blocks=reach)))

    unbounded = rank(0)
    for i in range(3 * AHEAD_BLOCKS):
        RankRuntime._keep_within_reach(unbounded, i)
    assert waited == [] and not unbounded.ahead           # --ahead-blocks 0: no bound
    rt = rank(AHEAD_BLOCKS)
    for i in range(AHEAD_BLOCKS):
        RankRuntime._keep_within_reach(rt, i)
    assert waited == []                      # within reach: nothing to wait for
    RankRuntime._keep_within_reach(rt, AHEAD_BLOCKS)
    assert waited == [0]                     # one too many: wait for the oldest
    gpu_done["upto"] = 5
    for i in range(AHEAD_BLOCKS + 1, AHEAD_BLOCKS + 6):
        RankRuntime._keep_within_reach(rt, i)
    assert waited == [0]                     # blocks 1-5 had run: no wait
    RankRuntime._keep_within_reach(rt, AHEAD_BLOCKS + 6)
    assert waited == [0, 6] and len(rt.ahead) == AHEAD_BLOCKS


def test_threads_racing_to_post_keep_the_net_programs_order_and_post_each_once() -> None:
    from aptmoe.plan.actions import Action, Kind

    program = [Action(s, k, m) for m in range(50) for s, k in ((0, Kind.RECV_F), (1, Kind.RECV_B))]
    rt, posted, post_through = _net_stub(program, {})
    threads = [threading.Thread(target=lambda ts=program[k::4]: [post_through(a) for a in ts]) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert posted == [str(a) for a in program]


def test_receives_left_to_the_net_thread_keep_the_reference_equality(tmp_path, capped_run) -> None:
    """--receives-by-net-thread (the A/B's other arm) trains the same numbers, and there the
    net thread posts every receive; by default the compute thread posts some itself. Each
    message's trace event says who posted it and how long the call took."""
    checked = run_and_compare(tmp_path, [*CPU, "--pipeline", "Mobius", "--receives-by-net-thread"], cuda=False)
    res = checked["Mobius"]
    assert res["agreement"].within(1e-5), res["agreement"]
    assert res["result"]["receives"] == "net thread"
    by_net = [e for e in Trace.load(tmp_path / "run" / "trace-Mobius.json").events if e.cat in ("send", "recv")]
    on_demand = [e for e in Trace.load(capped_run[0] / "trace-Mobius.json").events if e.cat in ("send", "recv")]
    assert by_net and all(e.args["post_us"] >= 0 for e in by_net + on_demand)
    assert {e.args["by"] for e in by_net if e.cat == "recv"} == {"net"}
    assert "compute" in {e.args["by"] for e in on_demand if e.cat == "recv"}
    assert {e.args["by"] for e in by_net + on_demand if e.cat == "send"} <= {"compute", "net"}


def test_send_delays_script_measures_send_start_after_its_producer(tmp_path, capsys) -> None:
    import importlib.machinery
    import importlib.util

    loader = importlib.machinery.SourceFileLoader("send_delays", str(ROOT / "scripts" / "send-delays"))
    script = importlib.util.module_from_spec(importlib.util.spec_from_loader("send_delays", loader))
    loader.exec_module(script)
    tr = Trace("real")
    for step in range(2):                          # the producer's occurrence in each step counts
        t = 10.0 * step
        tr.add("0F0", 0, "compute", t, t + 1.0, "forward")
        tr.add("0F0@0:a", 0, "compute", t, t + 0.5, "forward")
        tr.add("0SF0", 0, "net", t + 1.25, t + 1.3, "send")
        tr.add("1B0", 1, "compute", t + 2.0, t + 3.0, "backward")
        tr.add("1SB0", 1, "net", t + 3.5 + step, t + 3.6 + step, "send")
    tr.add("2SF0", 2, "net", 5.0, 5.1, "send")        # no producer in the trace: left out
    assert sorted(script.delays(tr)) == pytest.approx([0.25, 0.25, 0.5, 1.5])
    path = tmp_path / "trace-GPipe.json"
    tr.save(path)
    assert script.main([str(path)]) == 0
    assert "    4 " in capsys.readouterr().out
    assert script.main([str(tmp_path / "missing.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not exist" in err


def test_torchrun_launch_runs_the_seed_line(tmp_path) -> None:
    out = tmp_path / "tr"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "aptmoe.run", *TINY, "--device", "cpu", "--pipeline=APTMoE", "--num_training_steps", "1",
           "--out", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    doc = json.loads((out / "results.json").read_text())
    assert doc["schedules"]["APTMoE"]["iteration_s"] > 0
    wall = doc["schedules"]["APTMoE"]["wall_s"]     # under torchrun the clock starts at the schedule
    assert list(wall) == ["build", "probes", "warmup", "steps", "finish", "total"]
    assert (out / "plan-APTMoE.txt").read_text().startswith("APTMoE:")


@pytest.mark.parametrize("flags, says", [
    (["--pipeline", "Nope"], "Nope"),
    (["--gini", "1.5"], "gini"),
    (["--num_stages", "3"], "stages"),
])
def test_bad_flags_are_one_line_and_exit_2(tmp_path, capsys, flags, says) -> None:
    out = tmp_path / "bad"
    assert run_main([*TINY, *CPU, *flags, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("aptmoe-run: error:") and says in err[0]
    assert not out.exists()


def test_an_out_folder_it_cannot_make_is_refused_before_training(tmp_path, capsys) -> None:
    (tmp_path / "a-file").write_text("x")
    assert run_main([*TINY, *CPU, "--pipeline=Mobius", "--out", str(tmp_path / "a-file" / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("aptmoe-run: error: --out") and "not a folder" in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


@pytest.mark.parametrize("value", ["0", "2e5", "fast"])
def test_a_bad_gil_switch_interval_is_one_line_and_exit_2(tmp_path, capsys, value) -> None:
    with pytest.raises(SystemExit) as ex:
        run_main([*TINY, *CPU, "--gil-switch-us", value, "--out", str(tmp_path / "bad")])
    assert ex.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("aptmoe-run: error: argument --gil-switch-us") and not (tmp_path / "bad").exists()


def test_a_bad_ahead_blocks_count_is_one_line_and_exit_2(tmp_path, capsys) -> None:
    assert run_main([*TINY, *CPU, "--ahead-blocks=-1", "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--ahead-blocks -1 must be a whole number of blocks" in err[0], err
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("value, says", [("0", "outside the CUDA driver's 1..32"), ("33", "outside"),
                                         ("many", "not a whole number")])
def test_a_bad_cuda_connections_count_is_one_line_and_exit_2(tmp_path, capsys, value, says) -> None:
    with pytest.raises(SystemExit) as ex:
        run_main([*TINY, *CPU, "--cuda-connections", value, "--out", str(tmp_path / "bad")])
    assert ex.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("aptmoe-run: error: argument --cuda-connections") and says in err[-1]
    assert not (tmp_path / "bad").exists()


def test_cuda_connections_go_to_the_driver_before_cuda_starts_and_the_environment_stands_without(
        monkeypatch) -> None:
    from aptmoe.exec import cli

    monkeypatch.delenv("CUDA_DEVICE_MAX_CONNECTIONS", raising=False)       # restored after the test
    cli.set_cuda_connections(cli.make_run_parser().parse_args([]))
    assert "CUDA_DEVICE_MAX_CONNECTIONS" not in os.environ and cli.cuda_connections_in_use() == 8
    monkeypatch.setenv("CUDA_DEVICE_MAX_CONNECTIONS", "16")
    cli.set_cuda_connections(cli.make_run_parser().parse_args([]))
    assert cli.cuda_connections_in_use() == 16
    cli.set_cuda_connections(cli.make_run_parser().parse_args(["--cuda-connections", "32"]))
    assert os.environ["CUDA_DEVICE_MAX_CONNECTIONS"] == "32" and cli.cuda_connections_in_use() == 32


def test_the_ranks_run_at_the_gil_switch_interval_asked(tmp_path) -> None:
    before = sys.getswitchinterval()
    assert run_main([*TINY, *CPU, "--pipeline", "Mobius", "--num_training_steps", "1", "--gil-switch-us", "250",
                     "--no-plot", "-q", "--out", str(tmp_path / "r")]) == 0
    doc = json.loads((tmp_path / "r" / "results.json").read_text())
    assert doc["schedules"]["Mobius"]["gil_switch_us"] == pytest.approx(250)
    assert sys.getswitchinterval() == before


def test_gpu_ranks_default_to_100_us_and_cpu_ranks_keep_pythons_interval() -> None:
    from aptmoe.exec.cli import gil_switch_s

    assert gil_switch_s(None, on_gpu=True) == pytest.approx(100e-6)
    assert gil_switch_s(None, on_gpu=False) is None
    assert gil_switch_s(2000.0, on_gpu=False) == pytest.approx(2e-3)


def test_kernel_loading_sets_the_drivers_variable_only_when_asked(monkeypatch) -> None:
    """The ranks inherit CUDA_MODULE_LOADING from aptmoe-run, which sets it before anything
    starts CUDA; without the flag the environment's value stands (unset: lazy, torch's)."""
    from aptmoe.exec.cli import kernel_loading_in_use, make_run_parser, set_kernel_loading

    monkeypatch.delenv("CUDA_MODULE_LOADING", raising=False)
    set_kernel_loading(make_run_parser().parse_args([]))
    assert "CUDA_MODULE_LOADING" not in os.environ and kernel_loading_in_use() == "lazy"
    set_kernel_loading(make_run_parser().parse_args(["--kernel-loading", "eager"]))
    assert os.environ["CUDA_MODULE_LOADING"] == "EAGER" and kernel_loading_in_use() == "eager"
    set_kernel_loading(make_run_parser().parse_args([]))
    assert kernel_loading_in_use() == "eager"
    set_kernel_loading(make_run_parser().parse_args(["--kernel-loading=lazy"]))
    assert os.environ["CUDA_MODULE_LOADING"] == "LAZY"


def test_a_plan_that_cannot_fit_is_refused_before_launch(tmp_path, capsys) -> None:
    out = tmp_path / "small"
    assert run_main([*TINY, *CPU, "--pipeline", "GPipe", "--num_stages", "2", "--gpu-memory", "0.0001", "--out", str(out)]) == 3
    err = capsys.readouterr().err
    assert "GPipe refused" in err and "GB" in err
    res = json.loads((out / "results.json").read_text())["schedules"]["GPipe"]
    assert res["oom"] and res["iteration_s"] is None


def test_a_dead_rank_stops_the_others_with_a_clear_message(tmp_path, monkeypatch, capsys) -> None:
    from aptmoe.exec.runtime import FAULT_ENV

    monkeypatch.setenv(FAULT_ENV, "1:1")           # rank 1 dies as step 1 begins
    out = tmp_path / "dies"
    t = time.monotonic()
    code = run_main([*TINY, *CPU, "--pipeline", "Mobius", "--timeout", "20", "--out", str(out)])
    assert code == 1 and time.monotonic() - t < 120
    err = capsys.readouterr().err
    assert "rank 1" in err
    assert not out.exists()                        # no half-written output folder


# --------------------------------------------------------------------------- parts


@pytest.mark.parametrize("together", [True, False], ids=["experts-together", "expert-by-expert"])
def test_layer_in_steps_equals_autograd_of_the_module(together, monkeypatch) -> None:
    """A layer run as the executor runs it (explicit boundaries, experts one by one, gate,
    attention) gives the module's input and parameter gradients, with the combine and the
    output gradients done for all experts at once or (the fallback) one expert at a time."""
    from aptmoe.config import ModelConfig
    from aptmoe.exec.blocks import FlatParams, initial_flat, param_shapes
    from aptmoe.exec.layer import LayerRun, Routing
    from aptmoe.exec.model import MoELayer, routing_from_counts
    from aptmoe.plan.actions import BlockKind

    m = ModelConfig(embedding_dim=16, hidden_dim=32, num_heads=2, num_layers=1, num_experts=4, top_k=2,
                    seq_length=6)
    b, T = 2, 12
    ids = routing_from_counts([8, 6, 0, 10], T, 2, torch.Generator().manual_seed(3))
    x = torch.randn(b, m.seq_length, m.embedding_dim, generator=torch.Generator().manual_seed(4))
    dy = torch.randn_like(x)
    ref = MoELayer(16, 32, 2, 4, 2, layer=0, seed=7)
    xr = x.clone().requires_grad_(True)
    ref(xr, ids).backward(dy)

    flats = {blk: FlatParams(initial_flat(m, blk, 7), param_shapes(m, blk.kind)) for blk in Block.of_layer(0, 4)}
    for blk, fp in flats.items():
        if blk.kind is not BlockKind.EXPERT:       # autograd's blocks; experts write their own
            fp.ensure_grad()
    if not together:
        monkeypatch.setattr(LayerRun, "_all_experts", lambda self, outs: None)
    run = LayerRun(x.clone().requires_grad_(True), Routing.build(ids, 4, torch.device("cpu")), 2, True)
    run.attention(flats[Block.attn(0)].leaves)
    run.gate(flats[Block.gate(0)].leaves[0])
    for e in (3, 0, 1):                              # any order: experts arrive as they load
        run.gpu_expert(e, *flats[Block.expert_of(0, e)].flat_views())
    y = run.output()
    with torch.no_grad():
        assert torch.allclose(y, ref(x, ids), atol=1e-6)
    assert (run._all_experts(run._outputs()) == [0, 1, 3]) is together
    run.start_backward(dy)
    douts = run.output_grads()
    assert sorted(douts) == [0, 1, 3]
    for e in (0, 1, 3):
        run.gpu_expert_backward(e, douts[e], flats[Block.expert_of(0, e)])
    run.gate_backward()
    dx = run.attention_backward()
    assert torch.allclose(dx, xr.grad, atol=1e-6)
    for blk, flat in flats.items():
        want = torch.cat([p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel())
                          for p in ref_block(ref, blk).params()])
        got = flat.grad if flat.grad is not None else torch.zeros_like(flat.flat)   # e2 had no tokens
        assert torch.allclose(got, want, atol=1e-6), blk


def ref_block(layer, blk):
    from aptmoe.plan.actions import BlockKind

    return {BlockKind.ATTN: layer.attn, BlockKind.GATE: layer.gate}.get(blk.kind) or layer.experts[blk.expert]


@pytest.mark.parametrize("late", [0.0, 0.06], ids=["together", "after-the-first-passed"])
def test_capped_host_copies_take_bytes_over_cap_and_share_the_cap(late: float) -> None:
    from aptmoe.exec.link import Link

    src = torch.randn(5 << 20)                       # 20 MiB
    dst = torch.empty_like(src)
    cap = 0.5                                        # GB/s: 42 ms for 20 MiB
    want = src.numel() * 4 / (cap * 1e9)
    link = Link(cap)
    try:
        landing = link.copy(dst, src)
        assert not landing.done.is_set()             # it returns at once, as a CUDA copy does
        link.wait(landing)
        took = time.perf_counter() - landing.queued
        # its bytes pass in exactly one slot; the waiter hears of it after that, as soon as the
        # pacing thread runs. Half a slot (21 ms) bounds that wake on a busy 2-core machine
        # (7 ms seen with three spinning processes on the test's one core).
        assert landing.due - landing.queued == pytest.approx(want, abs=1e-6)
        assert want <= took < 1.5 * want, (took, want)
        assert torch.equal(dst, src)
        # two threads at once (two lanes) draw on one link and share its cap. Checked in closed
        # form from the queuing times, whenever the second thread gets to run: on the shared
        # 2-core CI machine its start-up once took longer than the first copy's 42 ms slot
        # (stop 27), and a link that is left idle must not count the idle time as passing.
        other, landings = torch.empty_like(src), []

        def lane() -> None:
            time.sleep(late)                         # 60 ms: after the first copy's 42 ms slot
            landings.append(link.copy(other, src))
            link.wait(landings[-1])

        th = threading.Thread(target=lane)
        th.start()
        landings.append(link.copy(dst, src))
        link.wait(landings[-1])
        th.join()
        a, b = sorted(landings, key=lambda x: x.queued)
        if b.queued < a.queued + want:
            # a passes alone until b comes, then each gets half: the link is busy 2 x want
            assert a.due == pytest.approx(2 * a.queued + 2 * want - b.queued, abs=1e-6)
            assert b.due == pytest.approx(a.queued + 2 * want, abs=1e-6)
        else:
            # b came after a had passed: each alone, the link idle between them
            assert a.due == pytest.approx(a.queued + want, abs=1e-6)
            assert b.due == pytest.approx(b.queued + want, abs=1e-6)
        took = time.perf_counter() - a.queued
        span = b.due - a.queued
        assert span <= took < span + 0.5 * want, (took, span)    # heard of after its bytes passed
        assert torch.equal(other, src)
    finally:
        link.close()
    with pytest.raises(ValueError, match="positive"):
        Link(0)


def test_a_capped_link_never_idles_while_a_copy_waits_and_never_beats_its_cap() -> None:
    """Copies queued in one lane go back to back, first in first out: each one's bytes have
    passed one slot after the later of its queuing and the one before it, whenever any thread
    runs (the link before 2026-11-29 lost 80-100 us a copy on this machine to its issuing
    thread's wake-up: 17% here). None is seen to land before then."""
    from aptmoe.exec.link import Link

    n, cap = 20, 0.5
    src = torch.randn((256 << 10) // 4)              # 256 KiB: a 0.52 ms slot
    dsts = [torch.empty_like(src) for _ in range(n)]
    slot = src.numel() * 4 / (cap * 1e9)
    link = Link(cap)
    try:
        landings = [link.copy(d, src) for d in dsts]
        seen = []
        for landing in landings:
            link.wait(landing)
            seen.append(time.perf_counter())
    finally:
        link.close()
    assert all(torch.equal(d, src) for d in dsts)
    before = None
    for i, (landing, at) in enumerate(zip(landings, seen)):
        begins = landing.queued if before is None else max(before, landing.queued)
        assert landing.due == pytest.approx(begins + slot, abs=1e-6), f"copy {i}"
        assert at >= landing.due and landing.end.host_s >= landing.due, f"copy {i} seen before its bytes passed"
        before = landing.due


def test_a_capped_link_is_a_fluid_shared_equally_and_wakes_per_copy_not_per_chunk() -> None:
    """Closed form of the fluid (sim/links.py's): a 1 MiB copy on a second lane, queued while an
    8 MiB copy passes at 0.05 GB/s, gets half the link, so its bytes have passed 2 x 21 ms after
    it was queued, and the 8 MiB copy's 21 ms later than alone (168 + 21 ms), whenever the
    threads run. And the pacing thread wakes about once per copy: six queued 16 MiB copies (four 4 MiB chunks each) take no more than two
    wakes a copy, where a thread that paced chunks woke at least 24 times."""
    from aptmoe.exec.link import Link

    cap = 0.05
    big, small = torch.randn(2 << 20), torch.randn(1 << 18)            # 8 MiB, 1 MiB
    slot = lambda t: t.numel() * 4 / (cap * 1e9)                       # noqa: E731
    link = Link(cap)
    try:
        seen = {}

        def second_lane():
            seen["small"] = link.copy(torch.empty_like(small), small)
            link.wait(seen["small"])

        th = threading.Thread(target=second_lane)
        landing = link.copy(torch.empty_like(big), big)
        th.start()
        link.wait(landing)
        th.join()
        a, b = landing, seen["small"]
        assert b.queued < a.queued + slot(big) - slot(small)          # it came while the big one passed
        assert b.due - b.queued == pytest.approx(2 * slot(small), abs=1e-6)
        assert a.due - a.queued == pytest.approx(slot(big) + slot(small), abs=1e-6)
    finally:
        link.close()
    link = Link(4.0)                                                   # 4.2 ms a 16 MiB copy
    try:
        part = torch.randn(4 << 20)
        landings = [link.copy(torch.empty_like(part), part) for _ in range(6)]
        for landing in landings:
            link.wait(landing)
        assert link.wakes <= 2 * len(landings), link.wakes
    finally:
        link.close()


def test_a_capped_copy_is_waited_for_behind_itself_not_behind_the_copies_queued_after_it() -> None:
    """A stage's offload queues all its blocks' copies on one stream at once. A landed copy's
    `end` is recorded when its bytes have passed the cap, so on a GPU it also waits for every
    copy queued behind it to run: waiting on it, the first block's gradient was handed to Adam
    only once the whole stage had run at the machine's rate (four H200s, capped L4: 79-91 ms
    after the backward, not 34). The waits take the marker recorded right behind the copy."""
    from aptmoe.exec.device import Device, Marker
    from aptmoe.exec.link import Link

    class Recording(Device):                         # the CPU's device, its markers in order
        def __init__(self) -> None:
            super().__init__("cpu")
            self.made: list[Marker] = []
            self.waited: list[Marker] = []

        def record(self, stream=None) -> Marker:
            self.made.append(super().record(stream))
            return self.made[-1]

        def block_on(self, marker) -> None:
            self.waited.append(marker)

    dev = Recording()
    link = Link(0.05, dev)                           # 4 MiB in 84 ms: the second is queued long before
    try:
        big, small = torch.randn(1 << 20), torch.randn(1 << 18)
        first, second = link.copy(torch.empty_like(big), big), link.copy(torch.empty_like(small), small)
        link.wait(first)
        assert dev.waited == [first.copied] and first.arrived is first.copied
        assert dev.made.index(first.copied) < dev.made.index(second.copied) < dev.made.index(first.end)
        link.wait(second)
        assert dev.waited[-1] is second.copied
    finally:
        link.close()
    plain = Link(None, dev)                          # uncapped: the copy's end is right behind it
    landing = plain.copy(torch.empty_like(small), small)
    assert landing.copied is None and landing.arrived is landing.end


def test_closing_a_capped_link_fails_the_copies_still_on_it() -> None:
    from aptmoe.exec.link import Link, LinkClosed

    src = torch.randn(1 << 20)                       # 4 MiB at 0.01 GB/s: 0.4 s
    link = Link(0.01)
    landing = link.copy(torch.empty_like(src), src)
    link.close("the rank stopped")
    with pytest.raises(LinkClosed, match="the rank stopped"):
        link.wait(landing, timeout=5)
    with pytest.raises(LinkClosed, match="closed"):
        link.copy(torch.empty_like(src), src)
    # without a cap a copy is one call, landed when it returns
    plain = Link(None)
    dst = torch.empty_like(src)
    assert plain.copy(dst, src).done.is_set() and torch.equal(dst, src)


def test_cpu_worker_runs_expert_work_before_queued_updates() -> None:
    from aptmoe.exec.cpu_worker import EXPERT, UPDATE, CpuWorker

    order, gate = [], threading.Event()
    w = CpuWorker()
    try:
        first = w.submit(UPDATE, gate.wait)            # holds the worker until released
        futs = [w.submit(UPDATE, order.append, "update"), w.submit(EXPERT, order.append, "expert")]
        gate.set()
        for f in [first, *futs]:
            f.result(timeout=10)
        assert order == ["expert", "update"]
        bad = w.submit(EXPERT, lambda: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            bad.result(timeout=10)
    finally:
        w.close()


def test_run_module_imports_no_torch_until_it_runs() -> None:
    code = "import sys, aptmoe.run; print('torch' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ}, timeout=60)
    assert res.stdout.strip() == "False", res.stderr


def test_split_host_cores_and_thread_binding() -> None:
    from aptmoe.exec.cores import bind_this_thread, split_host_cores

    assert split_host_cores([4, 5, 6, 7], 1) == ([4], [5, 6, 7])
    assert split_host_cores([4, 5], 0) == ([], [4, 5])
    with pytest.raises(ValueError, match="--host-cores 2"):
        split_host_cores([4, 5], 2)
    if not hasattr(os, "sched_getaffinity"):
        pytest.skip("no per-thread affinity on this OS")
    mine = sorted(os.sched_getaffinity(0))
    seen = {}

    def bound() -> None:
        seen["ok"] = bind_this_thread(mine[-1:])
        seen["cores"] = sorted(os.sched_getaffinity(0))

    t = threading.Thread(target=bound)
    t.start()
    t.join()
    assert seen == {"ok": True, "cores": mine[-1:]}
    assert sorted(os.sched_getaffinity(0)) == mine          # the caller's binding is its own


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2 if hasattr(os, "sched_getaffinity") else True,
                    reason="needs two cores to keep one for the host threads")
def test_host_cores_keep_the_reference_equality(tmp_path) -> None:
    """One rank of two cores with --host-cores 1: the CPU worker (experts, Adam) on one core,
    the issuing and copy threads on the other; the numbers do not change."""
    checked = run_and_compare(tmp_path, ["--device", "cpu", "--gpus", "1", "--pipeline", "APTMoE",
                                         "--link-bandwidth", "0.02", "--host-cores", "1"], cuda=False)
    res = checked["APTMoE"]
    a = res["agreement"]
    assert a.within(1e-5), f"loss {a.loss:.2e}, params {a.params:.2e} ({a.worst_param})"
    assert res["result"]["config"]["cluster"]["host_cores"] == 1
    assert res["result"]["metrics"]["cpu/expert_share"] > 0
    # every thread but the worker's team on the host core, gloo's among them
    (placed,) = res["result"]["threads"]
    assert placed["loose"] == 0 and placed["host"] >= 2 and placed["worker"] >= 1, placed


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2 if hasattr(os, "sched_getaffinity") else True,
                    reason="needs two cores to keep one for the host threads")
def test_without_confined_threads_the_process_groups_threads_stay_loose(tmp_path) -> None:
    """--no-confine-threads (the A/B's other arm): the rank binds its main thread after gloo
    has started its threads, which keep every core; the numbers are the same."""
    checked = run_and_compare(tmp_path, ["--device", "cpu", "--gpus", "1", "--pipeline", "APTMoE",
                                         "--link-bandwidth", "0.02", "--host-cores", "1", "--no-confine-threads"],
                              cuda=False)
    res = checked["APTMoE"]
    assert res["agreement"].within(1e-5)
    (placed,) = res["result"]["threads"]
    assert placed["loose"] >= 1, placed


def test_bind_threads_moves_other_threads_and_placement_counts_them() -> None:
    from aptmoe.exec.cores import bind_threads, process_threads, thread_placement

    if not hasattr(os, "sched_getaffinity") or not process_threads():
        pytest.skip("no per-thread affinity or thread list on this OS")
    mine = sorted(os.sched_getaffinity(0))
    started, stop = threading.Event(), threading.Event()
    tid = {}

    def idle() -> None:
        tid["t"] = threading.get_native_id()
        started.set()
        stop.wait(30)

    t = threading.Thread(target=idle)
    t.start()
    started.wait(30)
    try:
        assert tid["t"] in process_threads()
        assert bind_threads([tid["t"], 2**30], mine[-1:]) == 1      # a thread that is not there is left out
        assert sorted(os.sched_getaffinity(tid["t"])) == mine[-1:]
        assert sorted(os.sched_getaffinity(0)) == mine              # the caller stays where it was
        if len(mine) >= 2:
            placed = thread_placement(mine[:1], mine[1:])
            assert placed["worker"] >= 1 and placed["loose"] >= 1      # the idle thread; this one spans both
            assert sum(placed.values()) == len(process_threads())
    finally:
        stop.set()
        t.join()


def test_the_worker_keeps_its_thread_count_when_the_host_threads_take_fewer() -> None:
    """--host-cores: the CPU worker fixes its torch thread count when it starts; the main
    thread then lowers the process-wide count for itself and the threads it starts."""
    from aptmoe.exec.cores import start_worker_thread
    from aptmoe.exec.cpu_worker import EXPERT, CpuWorker

    before = torch.get_num_threads()
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else [0]
    w = CpuWorker("test-cpu", on_start=lambda: start_worker_thread(cores * 3))    # 3x: a count to see
    try:
        w.submit(EXPERT, lambda: None).result(timeout=30)
        torch.set_num_threads(1)
        fresh = {}
        t = threading.Thread(target=lambda: fresh.setdefault("n", torch.get_num_threads()))
        t.start()
        t.join()
        assert w.submit(EXPERT, torch.get_num_threads).result(timeout=30) == 3 * len(cores)
        assert torch.get_num_threads() == 1 and fresh["n"] == 1
    finally:
        w.close()
        torch.set_num_threads(before)


def test_thread_bench_puts_the_arrangements_side_by_side(capsys) -> None:
    from aptmoe.exec import thread_bench

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
    host = "1" if cores >= 2 else "0"
    assert thread_bench.main(["--calls", "8", "--pool-mib", "96", "--host-cores", host,
                              "--switch-us", "5000,200"]) == 0
    out = capsys.readouterr().out
    names = ["main", "two-teams", "worker", "host"][:4 if host == "1" else 3] + ["issuing", "issuing"] + \
        (["issuing-host", "issuing-host"] if host == "1" else [])
    rows = [line.split() for line in out.splitlines() if line.strip().split()[:1] in [[n] for n in names]]
    assert [r[0] for r in rows] == names
    plain, issuing = [r for r in rows if not r[0].startswith("issuing")], [r for r in rows if r[0].startswith("issuing")]
    assert all(float(x) > 0 for r in plain for x in r[2:5]) and all(r[5] == "-" for r in plain)
    assert [r[1] for r in issuing] == ["5000", "200"] * (len(issuing) // 2)
    assert all(float(x) > 0 for r in issuing for x in r[3:7])          # the main thread's rate as well


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2 if hasattr(os, "sched_getaffinity") else True,
                    reason="needs two cores to keep one for the host threads")
def test_a_rank_moves_its_other_threads_to_the_host_cores_for_the_run_and_back() -> None:
    """A thread the process had before the run (here one of the test's; on a GPU rank CUDA's
    and NCCL's) runs on the host cores during the steps, and where it was after them."""
    import subprocess
    import sys

    code = """
import os, sys, threading
import tempfile
from pathlib import Path
from aptmoe.exec.cli import make_run_parser, prepare
os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
port_file = Path(tempfile.mkdtemp()) / "store.port"
from aptmoe.exec.launch import init_rank, run_pipeline
from aptmoe.exec.runtime import ExecOptions
ns = make_run_parser().parse_args(["--is_moe=True", "--model_config=S", "--embedding_dim", "32", "--hidden_dim", "64",
    "--num_heads", "4", "--num_layers", "2", "--num_stages", "2", "--num_experts", "4", "--batch_size", "4",
    "--num_chunks", "2", "--seq_length", "8", "--gpus", "1", "--topo", "C1+G1", "--device", "cpu", "--host-cores", "1",
    "--pipeline", "APTMoE", "--num_warmup_steps", "0", "--num_training_steps", "2"])
cfg, cost, plan = prepare(ns, "APTMoE", False)
setup = init_rank(0, 1, 0, cfg, 60, use_cuda=False, port_file=port_file)
stop, tid = threading.Event(), []
t = threading.Thread(target=lambda: (tid.append(threading.get_native_id()), stop.wait(120)))
t.start()
while not tid:
    pass
before, during = sorted(os.sched_getaffinity(tid[0])), []
res = run_pipeline(setup, cfg, plan, cost, data=None, opts=ExecOptions(timeout_s=60),
                   progress=lambda *a: during.append(sorted(os.sched_getaffinity(tid[0]))))
after = sorted(os.sched_getaffinity(tid[0]))
stop.set()
print(before == setup.cores, during == [setup.cores[:1]] * 2, after == before, res["threads"][0]["loose"] == 0)
"""
    out = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["True", "True", "True", "True"]


def test_a_cpu_device_counts_no_driver_allocations() -> None:
    """`allocator_counts` (what the timed steps asked the driver for, per rank in a GPU run's
    results) is empty where there is no driver: a CPU run's results carry no `allocations`."""
    from aptmoe.exec.device import Device

    assert Device("cpu").allocator_counts() == {}


def test_torch_profile_writes_each_ranks_last_step_for_perfetto(tmp_path) -> None:
    """--torch-profile: one gzipped Chrome trace per rank and schedule, of the last timed step
    (its torch ops, each inside that step's time), and nothing half-written beside it."""
    import gzip

    out = tmp_path / "run"
    argv = [*TINY, "--gpus", "2", "--device", "cpu", "--pipeline", "APTMoE", "--torch-profile", "--no-plot",
            "--out", str(out)]
    assert run_main(argv) == 0
    names = sorted(f.name for f in out.iterdir() if f.name.startswith(("torch-", ".torch-")))
    assert names == ["torch-APTMoE-rank0.json.gz", "torch-APTMoE-rank1.json.gz"]
    doc = json.loads(gzip.decompress((out / "torch-APTMoE-rank0.json.gz").read_bytes()))
    ops = [e for e in doc["traceEvents"] if e.get("ph") == "X" and e.get("cat") == "cpu_op"]
    assert ops and any(e["name"] == "aten::linear" for e in ops)
    # the last of the three steps, marked, and no other
    marks = [e for e in doc["traceEvents"] if e.get("ph") == "X" and e.get("name", "").startswith("aptmoe step")]
    assert [e["name"] for e in marks] == ["aptmoe step 2"]
    start, end = marks[0]["ts"], marks[0]["ts"] + marks[0]["dur"]
    assert all(start <= e["ts"] and e["ts"] + e["dur"] <= end + 1 for e in ops if e["tid"] == marks[0]["tid"])
    script = Path(__file__).resolve().parents[1] / "scripts" / "torch-profile-summary"
    told = subprocess.run([sys.executable, str(script), str(out)], capture_output=True, text=True)
    assert told.returncode == 0, told.stderr
    assert told.stdout.count("== torch-APTMoE-rank") == 2 and "issuing thread's aten::linear" in told.stdout
    assert "(none: a CPU run" in told.stdout          # gloo ranks make no CUDA calls


def test_torch_profile_summary_lists_long_calls_with_the_gpu_work_pending_on_each_stream(tmp_path) -> None:
    """A record that blocked 40 ms while three kernels launched before it waited on stream 7
    (one launched before it had started already, one after it does not count)."""
    import gzip

    def rt(name, ts, dur, corr):
        return {"ph": "X", "cat": "cuda_runtime", "name": name, "ts": ts, "dur": dur, "tid": 1, "pid": 1,
                "args": {"correlation": corr}}

    def gpu(ts, corr, stream=7):
        return {"ph": "X", "cat": "kernel", "name": "k", "ts": ts, "dur": 5, "tid": stream, "pid": 0,
                "args": {"correlation": corr, "stream": stream}}

    events = [{"ph": "X", "cat": "cpu_op", "name": "aten::linear", "ts": 0, "dur": 3, "tid": 1, "pid": 1}]
    events += [rt("cudaLaunchKernel", 10 + i, 1, i) for i in range(4)]          # launched at 10..13
    events += [gpu(12, 0)] + [gpu(60_000 + i, i) for i in (1, 2, 3)]             # the first ran at once
    events += [rt("cudaEventRecordWithFlags", 20, 40_000, 9), rt("cudaLaunchKernel", 50_000, 1, 10),
               gpu(60_100, 10)]
    out = tmp_path / "run"
    out.mkdir()
    (out / "torch-Mobius-rank0.json.gz").write_bytes(gzip.compress(json.dumps({"traceEvents": events}).encode()))
    script = Path(__file__).resolve().parents[1] / "scripts" / "torch-profile-summary"
    told = subprocess.run([sys.executable, str(script), str(out)], capture_output=True, text=True)
    assert told.returncode == 0, told.stderr
    line = [x for x in told.stdout.splitlines() if "cudaEventRecordWithFlags" in x and "pending" in x]
    assert len(line) == 1 and "40.0 ms" in line[0] and "pending: 3 on stream 7" in line[0], told.stdout


def test_without_torch_profile_no_profile_is_written(tmp_path) -> None:
    from aptmoe.exec.launch import torch_profiled

    with torch_profiled(None, cuda=False):
        pass
    path = tmp_path / "t.json.gz"
    with torch_profiled(path, cuda=False):
        import torch
        torch.ones(3).add_(1)
    assert path.exists() and not list(tmp_path.glob(".*"))       # the raw export is gone
