"""``aptmoe-run``: train with the real executor, one process per GPU (or per CPU rank).

    aptmoe-run --is_moe=True --model_config=S --num_experts=16 --gini=0.3 --topo=C1+G2 --pipeline=APTMoE
    torchrun --nproc_per_node 4 -m aptmoe.run --is_moe=True --model_config=S ... --pipeline=APTMoE

Run plainly, it starts one process per rank itself (`--gpus`, default: every visible GPU, or 2
CPU ranks on a machine without one) and runs each schedule asked for (`--pipeline all`: the
four) in fresh processes, one after the other. Under torchrun it is one of the ranks. It
accepts the seed artifact's flags, prints what the seed printed (parameter count, time per
step, throughput, peak memory) as a table, and writes into ``--out``: results.json (the
simulator's keys), results.csv, a Chrome trace and its timeline PNG per schedule, and the
plan. A plan that cannot fit GPU or host memory is refused before launch with the numbers;
bad flags are one line on stderr and exit status 2; a failing rank makes the others stop.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
import time
from pathlib import Path

from aptmoe.exec import repeats
from aptmoe.config import ConfigError, RunConfig, auto_host_cores
from aptmoe.flags import (
    add_cluster_flags,
    add_kernel_loading_flag,
    add_seed_flags,
    config_from_args,
    make_parser,
    pipelines_of,
    whole_number,
)
from aptmoe.host import physical_cores
from aptmoe.memory import MemoryModel
from aptmoe.plan.builders import build_plan
from aptmoe.plan.plan import Plan, PlanError
from aptmoe.plan.validate import validate
from aptmoe.profile import ProfileError, cost_for, default_planning_profile, load_profile, machine_profile
from aptmoe.report import (
    OutputFolderError,
    StagedDir,
    first_line,
    flat_row,
    progress_bar,
    schedule_table,
    speedups,
    timestamp,
    write_csv,
)
from aptmoe.stored import PLAN_PROFILE
from aptmoe.trace import write_json_atomic

PROG = "aptmoe-run"


class UsageError(ValueError):
    pass


# A GPU rank's compute thread is in Python almost all the time and takes the GIL back after
# every torch call before a waiting thread has woken up: the others get it when the holder is
# forced to drop it, after sys.getswitchinterval(). At Python's 5 ms the CPU worker's Adam
# chunks took 1.6-2.3 ms for 1.1 ms of work beside it on the one-H200 runs of 2026-11-29, and
# at 100 us their median matched the profile (docs/validation-h200-v3-gil; one run each, not
# yet A/B'd over the matrix). A CPU rank's compute thread spends its time inside torch calls,
# without the GIL, and on the 2-core machine a busy issuing thread at 100 us slowed the worker
# more than at 5 ms (BENCHMARKS.md): CPU ranks keep Python's interval unless asked.
GIL_SWITCH_US_GPU = 100.0


def gil_switch_s(asked_us: float | None, on_gpu: bool) -> float | None:
    """The switch interval a rank runs at: --gil-switch-us, else 100 us on a GPU rank and
    Python's own (None: left alone) on a CPU rank."""
    if asked_us is not None:
        return asked_us * 1e-6
    return GIL_SWITCH_US_GPU * 1e-6 if on_gpu else None


def _ranged(convert, lo: float, hi: float, not_one: str, outside: str):
    """An argparse type: `convert(text)` within lo..hi; else one line, `not_one` or `outside`
    (each formatted with the flag's `text`)."""
    def parse(text: str):
        try:
            v = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(not_one.format(text=text)) from None
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(outside.format(text=text))
        return v
    return parse


_switch_us = _ranged(float, 1, 100_000, "{text!r} is not a number of microseconds",
                     "{text} us is outside 1..100000 (Python's default is 5000)")
_connections = _ranged(int, 1, 32, "{text!r} is not a whole number of work queues",
                       "{text} is outside the CUDA driver's 1..32 (its default is 8)")


def make_run_parser() -> argparse.ArgumentParser:
    p = make_parser(PROG, "Train with the real executor: GPipe, GPipeOffload, Mobius or APTMoE on this "
                          "machine's GPUs (NCCL), or on CPU ranks (gloo) where there is no GPU.")
    add_seed_flags(p)
    add_cluster_flags(p)
    g = p.add_argument_group("executor flags")
    g.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                   help="cuda: one GPU per rank; cpu: gloo ranks on the CPU (auto: cuda where present)")
    g.add_argument("--calibration", default=None,
                   help="calibration profile the APTMoE policy plans with (default: the built-in profile made on this "
                        "kind of machine, e.g. h200-2gpu on two H200s; else h200 on a GPU, a800-paper on the CPU)")
    g.add_argument("--data", default=None, help="train on the bytes of this text file (default: synthetic tokens)")
    g.add_argument("--lr", type=float, default=None, help="Adam learning rate (1e-4)")
    g.add_argument("--timeout", type=float, default=300.0,
                   help="seconds a rank waits for a block, a message or a peer before it gives up (300)")
    g.add_argument("--gil-switch-us", dest="gil_switch_us", type=_switch_us, default=None,
                   help="the ranks' GIL switch interval in microseconds (sys.setswitchinterval): how long the "
                        "CPU worker and the copy threads can wait for the GIL while the compute thread issues "
                        f"GPU work ({GIL_SWITCH_US_GPU:g} on GPU ranks; CPU ranks keep Python's 5000)")
    g.add_argument("--no-confine-threads", dest="confine_threads", action="store_false",
                   help="bind only each rank's main thread to its cores, after the process group has started "
                        "its threads, and leave those threads where they are (the executor before 2026-11-29; "
                        "for A/B runs)")
    g.add_argument("--receives-by-net-thread", dest="receives_on_demand", action="store_false",
                   help="leave every receive to the rank's net thread, which posts it once it has posted the "
                        "sends before it, and hands it to the compute thread (the executor before 2026-11-30; "
                        "for A/B runs). Default: the thread that needs a message posts its receive itself")
    add_kernel_loading_flag(g, None, "Default: the environment's CUDA_MODULE_LOADING, lazy where unset "
                                     "(aptmoe-sim validate runs eager: the simulator predicts steps without "
                                     "one-off loads)")
    g.add_argument("--cuda-connections", dest="cuda_connections", type=_connections, default=None,
                   help="the CUDA driver's work queues from the host to each GPU (CUDA_DEVICE_MAX_CONNECTIONS, "
                        "1-32). Default: the environment's, the driver's 8 where unset. Streams beyond the "
                        "queues share one, and work waiting in one can hold up the other's; one queue made the "
                        "regime's late loads 2.7x as many on two H200s, and 32 did not remove them (their cause "
                        "was the issuing thread's reach: --ahead-blocks; docs/measured/session29)")
    g.add_argument("--repeats", type=whole_number("run"), default=1,
                   help="run each schedule this many times, each in fresh processes, going round the schedules, "
                        "and keep the run of median step time (its result lists every run's): one process can "
                        "run the same work up to 2x slower than the next (1)")
    g.add_argument("--save-params", dest="save_params", action="store_true",
                   help="write every rank's parameters after training (params-<pipeline>-rank<r>.pt)")
    g.add_argument("--torch-profile", dest="torch_profile", action="store_true",
                   help="profile each rank's last timed step with torch.profiler: the issuing thread's "
                        "torch ops and, on a GPU, every thread's CUDA runtime calls and the kernels "
                        "(torch-<pipeline>-rank<r>.json.gz, for Perfetto; the profiler slows that step)")
    g.add_argument("--no-trace", dest="no_trace", action="store_true", help="write no trace or timeline")
    g.add_argument("--no-plot", dest="no_plot", action="store_true", help="write no timeline PNG")
    g.add_argument("--out", default=None, help="output folder (default: runs/run-<timestamp>)")
    g.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors; no progress bar")
    return p


# --------------------------------------------------------------------------- shared by parent and ranks


def set_kernel_loading(ns) -> None:
    """CUDA_MODULE_LOADING as --kernel-loading asks, before anything in this process starts
    CUDA (the driver reads it once, at its start) and before the ranks are spawned (they
    inherit it). Without the flag the environment's value stands."""
    if ns.kernel_loading is not None:
        os.environ["CUDA_MODULE_LOADING"] = ns.kernel_loading.upper()


def set_cuda_connections(ns) -> None:
    """CUDA_DEVICE_MAX_CONNECTIONS as --cuda-connections asks, before CUDA starts here and before
    the ranks are spawned (the driver reads it once). Without the flag the environment's stands."""
    if ns.cuda_connections is not None:
        os.environ["CUDA_DEVICE_MAX_CONNECTIONS"] = str(ns.cuda_connections)


def cuda_connections_in_use() -> int:
    """The work queues this GPU rank's driver was started with (8 where nothing was asked)."""
    return int(os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS", "8"))


def kernel_loading_in_use() -> str:
    """What this GPU rank's driver was started with: torch sets lazy where nothing was asked."""
    return os.environ.get("CUDA_MODULE_LOADING", "LAZY").lower()


def _use_cuda(ns) -> bool:
    import torch

    if ns.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: this machine has no CUDA GPU; use --device cpu")
    return ns.device != "cpu" and torch.cuda.is_available()


def _world(ns, use_cuda: bool) -> tuple[int, int]:
    """(GPUs per node, nodes): torchrun's world where it launched us, else --gpus / --nodes."""
    if "LOCAL_WORLD_SIZE" in os.environ and "WORLD_SIZE" in os.environ:
        local, world = int(os.environ["LOCAL_WORLD_SIZE"]), int(os.environ["WORLD_SIZE"])
        return local, world // local
    import torch

    if use_cuda:
        have = torch.cuda.device_count()
        gpus = ns.gpus or have
        if gpus > have:
            raise UsageError(f"--gpus {gpus}: this machine has {have} GPUs")
        return gpus, 1
    if (ns.nodes or 1) != 1:
        raise UsageError("--nodes > 1 needs torchrun on every node")
    return ns.gpus or 2, 1


def planning_profile(ns, use_cuda: bool):
    """The profile the APTMoE policy plans with (--calibration, else the built-in one made on
    this kind of machine, else `default_planning_profile`); the run keeps a copy beside its
    results (plan-profile.json), so that a prediction of it, now or with a later profile,
    takes the decisions the run took (aptmoe-sim validate)."""
    if ns.calibration:
        return load_profile(ns.calibration)
    name = None
    if use_cuda:
        import torch

        name = machine_profile(torch.cuda.get_device_name(0), torch.cuda.device_count(), physical_cores())
    return load_profile(name or default_planning_profile(use_cuda))


def prepare(ns, pipeline: str, use_cuda: bool) -> tuple[RunConfig, object, Plan]:
    """The config, cost source and plan of one schedule: every rank derives the same."""
    import torch

    gpus, nodes = _world(ns, use_cuda)
    ns.nodes = nodes
    profile = planning_profile(ns, use_cuda)
    hw = profile.cluster_defaults()
    if use_cuda:
        hw["gpu_memory_bytes"] = int(torch.cuda.get_device_properties(0).total_memory)
    cfg = config_from_args(ns, pipeline=pipeline, gpus=gpus, **hw)
    if ns.lr is not None:
        cfg = cfg.replace(train=dataclasses.replace(cfg.train, lr=ns.lr))
    # The cores each rank will be bound to (`bind_cores`): the topology's share, or an even
    # split of this machine's where it has fewer. The config says what runs, so that the
    # APTMoE policy plans with it and a simulation of this config models the same machine.
    from aptmoe.exec.launch import cores_per_rank

    per = cores_per_rank(cfg.cluster.cores_per_rank, gpus)
    host = auto_host_cores(per, use_cuda) if ns.host_cores == "auto" else ns.host_cores
    if (per, host) != (cfg.cluster.cores_per_rank, cfg.cluster.host_cores):
        cfg = cfg.replace(cluster=dataclasses.replace(cfg.cluster, cores_per_socket=per * cfg.cluster.gpus_per_socket,
                                                      host_cores=host))
    cost = cost_for(cfg, profile)
    return cfg, cost, build_plan(cfg, cost)


def preflight(cfg: RunConfig, plan: Plan) -> str | None:
    """Why this plan cannot run here (None if it fits): GPU memory by the plan's dry run,
    host memory by the parameters, gradients and Adam states the ranks keep there."""
    import psutil

    mem = MemoryModel(cfg.model, cfg.tokens_per_micro_batch, cfg.micro_batch_size)
    try:
        validate(plan, memory=mem, capacity_bytes=cfg.cluster.gpu_memory_bytes)
    except PlanError as e:
        return first_line(e)
    params = cfg.model.layer_params * cfg.model.num_layers
    per_param = 0 if plan.resident else cfg.model.dtype_bytes * 2 + 8     # master, pinned grad, Adam moments
    need = params * per_param
    if plan.policy == "aptmoe":      # the CPU experts' own gradient buffers, one per expert (RankRuntime)
        need += cfg.model.expert_params * cfg.model.num_experts * cfg.model.num_layers * cfg.model.dtype_bytes
    avail = psutil.virtual_memory().available
    if need > 0.9 * avail:
        return (f"the ranks need {need / 1e9:.1f} GB of host memory for parameters, gradients and Adam states; "
                f"{avail / 1e9:.1f} GB are available")
    return None


# --------------------------------------------------------------------------- one rank


def rank_main(ns, pipeline: str, prepared, setup, tmp: Path, marks: dict[str, float] | None = None) -> dict | None:
    """Everything one rank does for one schedule (the process group is up); rank 0 returns the
    result. `marks`: when the parts before this one ended (`run_pipeline`)."""
    from aptmoe.exec.launch import run_pipeline
    from aptmoe.exec.runtime import ExecOptions

    cfg, cost, plan = prepared
    bar = None
    if setup.rank == 0 and not ns.quiet and sys.stderr.isatty():
        bar = progress_bar(total=cfg.train.num_warmup_steps + cfg.train.num_training_steps, desc=pipeline,
                           unit="step")

    def progress(done, total, rep):
        if bar is not None:
            bar.set_postfix_str(f"{rep.step_s:.3f} s/step")
            bar.update()

    switch = sys.getswitchinterval()
    asked = gil_switch_s(ns.gil_switch_us, setup.device.cuda)
    if asked is not None:
        sys.setswitchinterval(asked)
    in_run = sys.getswitchinterval()
    try:
        res = run_pipeline(setup, cfg, plan, cost, data=ns.data,
                           opts=ExecOptions(timeout_s=ns.timeout, confine_threads=ns.confine_threads,
                                            receives_on_demand=ns.receives_on_demand),
                           trace_path=None if ns.no_trace else tmp / f"trace-{pipeline}.json",
                           params_dir=tmp if ns.save_params else None,
                           torch_profile=tmp / f"torch-{pipeline}-rank{setup.rank}.json.gz" if ns.torch_profile else None,
                           gpu_memory_cap=int(ns.gpu_memory * 1e9) if ns.gpu_memory else None, progress=progress,
                           marks={"start": time.time()} if marks is None else marks)
    finally:
        sys.setswitchinterval(switch)
    if bar is not None:
        bar.close()
    if ns.save_params:
        os.replace(tmp / f"params-rank{setup.rank}.pt", tmp / f"params-{pipeline}-rank{setup.rank}.pt")
    if res is not None:
        res["cores_rank0"] = setup.cores
        res["gil_switch_us"] = round(in_run * 1e6, 3)
        res["kernel_loading"] = kernel_loading_in_use() if setup.device.cuda else None
        res["cuda_connections"] = cuda_connections_in_use() if setup.device.cuda else None
        res["receives"] = "on demand" if ns.receives_on_demand else "net thread"
    return res


def _spawned(local_rank: int, world: int, argv: list[str], pipeline: str, tmp: str,
             use_cuda: bool, launched: float) -> None:
    """A rank started by `aptmoe-run` itself: one schedule, then exit. `launched`: when the
    parent started the processes (their start-up, imports included, is the first part timed).
    The ranks meet through a store whose port rank 0 publishes in `tmp` (`_port_file`)."""
    marks = {"launch": launched, "start": time.time()}
    import torch.distributed as dist
    from aptmoe.exec.launch import init_rank, report_failure
    marks["imports"] = time.time()

    os.environ.update(RANK=str(local_rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local_rank),
                      LOCAL_WORLD_SIZE=str(world))
    ns = make_run_parser().parse_args(argv)
    try:
        prepared = prepare(ns, pipeline, use_cuda)
        marks["prepare"] = time.time()
        setup = init_rank(local_rank, world, local_rank, prepared[0], ns.timeout, use_cuda=use_cuda,
                          confine_threads=ns.confine_threads, port_file=_port_file(Path(tmp), pipeline))
        marks["group"] = time.time()
        res = rank_main(ns, pipeline, prepared, setup, Path(tmp), marks)
        if res is not None:
            write_json_atomic(Path(tmp) / f"result-{pipeline}.json", res)
        dist.destroy_process_group()
    except Exception as e:          # one line per rank; the traceback goes to a log file
        report_failure(local_rank, e, Path(tmp))
        sys.exit(1)
    # Everything this rank writes is written (its result atomically, its trace and parameters
    # before that) and its process group is gone: skip the interpreter's teardown, which
    # frees every tensor one by one (on a GPU rank, gigabytes of pinned memory)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _port_file(tmp: Path, pipeline: str) -> Path:
    return tmp / f"store-{pipeline}.port"


def _launch(argv: list[str], pipeline: str, world: int, tmp: Path, use_cuda: bool) -> bool:
    import torch.multiprocessing as mp

    port_file = _port_file(tmp, pipeline)
    port_file.unlink(missing_ok=True)
    try:
        mp.start_processes(_spawned, args=(world, argv, pipeline, str(tmp), use_cuda, time.time()),
                           nprocs=world, join=True, start_method="spawn")
        return True
    except mp.ProcessExitedException as e:
        print(f"{PROG}: {pipeline}: rank {e.error_index} exited with status {e.exit_code}; the others were "
              "stopped", file=sys.stderr)
        return False
    except mp.ProcessRaisedException as e:
        print(f"{PROG}: {pipeline}: rank {e.error_index} failed: {str(e).strip().splitlines()[-1]}",
              file=sys.stderr)
        return False
    finally:
        port_file.unlink(missing_ok=True)           # not an output


# --------------------------------------------------------------------------- the command


def _refused(cfg: RunConfig, plan: Plan, why: str) -> dict:
    return {"pipeline": plan.pipeline, "iteration_s": None, "throughput_seq_per_s": None, "oom": True,
            "peak_gpu_bytes": 0, "num_stages": plan.num_stages, "oom_detail": f"refused before launch: {why}",
            "metrics": {}, "config": cfg.to_dict()}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ns = make_run_parser().parse_args(argv)
    torchrun = all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "LOCAL_WORLD_SIZE"))
    rank = int(os.environ.get("RANK", 0)) if torchrun else 0
    try:
        set_kernel_loading(ns)
        set_cuda_connections(ns)
        use_cuda = _use_cuda(ns)
        plans = {p: prepare(ns, p, use_cuda) for p in pipelines_of(ns)}
        out = Path(ns.out or f"runs/run-{timestamp()}")
        staged = StagedDir(out) if rank == 0 else None
    except (ConfigError, ProfileError, UsageError, OutputFolderError, ValueError) as e:
        if rank == 0:
            print(f"{PROG}: error: {first_line(e)}", file=sys.stderr)
        return 2
    say = (lambda *a: None) if ns.quiet or rank != 0 else print
    cfg0 = next(iter(plans.values()))[0]
    m = cfg0.model
    say(f"Number of parameters: {m.num_params / 1e9:.2f}B ({m.num_params:,}) in {m.name}, {m.num_layers} layers, "
        f"{m.num_experts} experts per layer; {cfg0.world_size} {'GPU' if use_cuda else 'CPU'} ranks")
    results: dict[str, dict] = {}
    if torchrun:
        if ns.repeats > 1:
            if rank == 0:
                print(f"{PROG}: error: --repeats needs aptmoe-run's own launch (under torchrun the ranks live for "
                      "one run); run it without torchrun, or once per torchrun", file=sys.stderr)
            return 2
        return _main_torchrun(ns, argv, plans, staged, use_cuda, say)
    try:
        with staged as tmp:
            runnable: dict[str, RunConfig] = {}
            for name, (cfg, _, plan) in plans.items():
                (tmp / f"plan-{name}.txt").write_text(plan.describe() + "\n")
                why = preflight(cfg, plan)
                if why is not None:
                    print(f"{PROG}: {name} refused: {why}", file=sys.stderr)
                    results[name] = _refused(cfg, plan, why)
                    continue
                runnable[name] = cfg
            runs: dict[str, list[dict]] = {name: [] for name in runnable}
            for rep in range(ns.repeats):           # round the schedules: a slow spell hits them all
                if ns.repeats > 1:
                    say(f"run {rep + 1} of {ns.repeats}")
                for name, cfg in runnable.items():
                    launched = time.time()
                    if not _launch(argv, name, cfg.world_size, tmp, use_cuda):
                        _keep_logs(tmp, out)
                        raise _RankFailed
                    res = json.loads((tmp / f"result-{name}.json").read_text())
                    _add_exit(res, time.time() - launched)
                    (tmp / f"result-{name}.json").unlink()
                    runs[name].append(res)
                    if ns.repeats > 1:
                        repeats.stash(tmp, name, rep)
            for name, rs in runs.items():
                results[name] = repeats.keep_median(tmp, name, rs) if ns.repeats > 1 else rs[0]
            results = {name: results[name] for name in plans}       # the order asked for
            _write_outputs(ns, argv, tmp, cfg0, results, use_cuda)
    except _RankFailed:
        return 1            # the staged folder is gone: no half-written output
    _print_results(say, results, out, ns)
    return 0 if any(not r["oom"] for r in results.values()) else 3


def _add_exit(res: dict, seconds: float) -> None:
    """The processes' exit (what the launch took beyond the ranks' last mark) into `wall_s`."""
    wall = res.get("wall_s")
    if wall:
        wall["exit"] = round(max(0.0, seconds - wall["total"]), 4)
        wall["total"] = round(seconds, 4)


class _RankFailed(Exception):
    pass


def _keep_logs(tmp: Path, out: Path) -> None:
    logs = sorted(tmp.glob("error-rank*.log"))
    if logs:
        dest = out.with_name(out.name + "-failed-logs")
        dest.mkdir(parents=True, exist_ok=True)
        for f in logs:
            os.replace(f, dest / f.name)
        print(f"{PROG}: tracebacks in {dest}/", file=sys.stderr)


def _main_torchrun(ns, argv, plans, staged, use_cuda, say) -> int:
    """One rank of a torchrun launch: the process group lives for all schedules asked for."""
    import torch.distributed as dist
    from aptmoe.exec.launch import init_rank, report_failure

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cfg0 = next(iter(plans.values()))[0]
    tmp = staged.__enter__() if staged is not None else None
    results: dict[str, dict] = {}
    try:
        setup = init_rank(rank, world, local_rank, cfg0, ns.timeout,
                          use_cuda=use_cuda, confine_threads=ns.confine_threads)
        box = [str(tmp) if tmp is not None else None]
        dist.broadcast_object_list(box, src=0)        # rank 0's staging folder, where every rank writes
        for name, (cfg, cost, plan) in plans.items():
            if tmp is not None:
                (tmp / f"plan-{name}.txt").write_text(plan.describe() + "\n")
            why = preflight(cfg, plan)
            if why is not None:
                if rank == 0:
                    print(f"{PROG}: {name} refused: {why}", file=sys.stderr)
                    results[name] = _refused(cfg, plan, why)
                continue
            res = rank_main(ns, name, (cfg, cost, plan), setup, Path(box[0]))
            if rank == 0:
                results[name] = res
        dist.destroy_process_group()
    except Exception as e:
        report_failure(rank, e, Path(tmp) if tmp is not None else None)
        if staged is not None:
            staged.__exit__(RuntimeError, None, None)
        return 1
    if rank != 0:
        return 0
    _write_outputs(ns, argv, tmp, cfg0, results, use_cuda)
    staged.__exit__(None, None, None)
    _print_results(say, results, staged.target, ns)
    return 0


def _write_outputs(ns, argv, tmp: Path, cfg0: RunConfig, results: dict[str, dict], use_cuda: bool) -> None:
    from aptmoe.plot import plot_trace_file

    for name, s in speedups(results).items():
        results[name]["speedup_vs_mobius"] = s
    if not ns.no_trace and not ns.no_plot:
        for name in results:
            trace = tmp / f"trace-{name}.json"
            if trace.exists():
                plot_trace_file(trace, tmp / f"timeline-{name}.png")
    profile = planning_profile(ns, use_cuda)
    profile.save(tmp / PLAN_PROFILE)
    write_json_atomic(tmp / "results.json", {
        "config": cfg0.to_dict(), "pipelines": list(results), "command": [PROG, *argv], "planned_with": profile.name,
        "created": datetime.datetime.now().isoformat(timespec="seconds"), "source": "real",
        "schedules": results})
    write_csv(tmp / "results.csv", [flat_row(r) for r in results.values()])


def _print_results(say, results: dict[str, dict], out: Path, ns) -> None:
    say(schedule_table(results))
    for name, r in results.items():
        if r.get("losses"):
            say(f"{name}: loss per step " + " ".join(f"{sum(x) / len(x):.4f}" for x in r["losses"]))
    say(f"wrote {out}/ (results.json, results.csv" + ("" if ns.no_trace else ", trace-*.json")
        + ("" if ns.no_trace or ns.no_plot else ", timeline-*.png") + (", torch-*.json.gz" if ns.torch_profile else "")
        + ", plan-*.txt, plan-profile.json)")


if __name__ == "__main__":
    raise SystemExit(main())
