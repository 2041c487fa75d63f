"""Process setup for the executor: one process per rank, under torchrun or spawned by us.

`run_pipeline` is what every rank runs for one schedule: set up the device, cores and
channels, train warm-up and timed steps, gather the reports on rank 0 and turn them into
the result the simulator also returns (the same four top-level keys and metric names,
docs/metrics.md). Rank 0 writes the measured trace.
"""

from __future__ import annotations

import contextlib
import gc
import gzip
import os
import shutil
import statistics
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import psutil
import torch
import torch.distributed as dist
from aptmoe.exec.comm import PeerChannels
from aptmoe.exec.cores import bind_threads, process_threads, rank_share
from aptmoe.exec.data import make_source
from aptmoe.exec.device import Device
from aptmoe.exec.runtime import ExecOptions, RankRuntime, StepReport
from aptmoe.exec.store import local_store

from aptmoe.config import RunConfig
from aptmoe.host import allowed_cores, python_loop_s
from aptmoe.costs import CostSource
from aptmoe.metrics import RESOURCES, shared_metrics
from aptmoe.plan.plan import Plan
from aptmoe.popularity import popularity_from_config
from aptmoe.trace import Trace

COMPUTE_CATS = ("forward", "backward", "recompute", "update")


@dataclass
class RankSetup:
    rank: int
    world: int
    local_rank: int
    device: Device
    cores: list[int] = field(default_factory=list)


def cores_per_rank(wanted: int, local_ranks: int) -> int:
    """The topology's share of cores per rank, or an even split where the machine has fewer."""
    return max(1, min(wanted, len(allowed_cores()) // max(1, local_ranks)))


def bind_cores(local_rank: int, per: int, *, main_threads: int | None = None, every_thread: bool = True) -> list[int]:
    """Bind this process to its `per` cores (`cores_per_rank`, which the config records) and
    size torch's thread pool to match, or to `main_threads` (a GPU rank: 1, so that its main
    thread never makes an OpenMP team; its CPU worker sizes its own, RankRuntime).

    Every thread the process has, not only the main one (affinity is per thread on Linux:
    aptmoe.exec.cores); `every_thread=False` binds the main thread alone, as before
    2026-11-29 (`--no-confine-threads`, for A/B runs)."""
    allowed = allowed_cores()
    cores = rank_share(local_rank, max(1, min(per, len(allowed))), allowed)
    if not (every_thread and bind_threads(process_threads(), cores)):
        try:
            psutil.Process().cpu_affinity(cores)
        except (AttributeError, psutil.Error):
            pass
    torch.set_num_threads(main_threads or len(cores))
    return cores


def init_rank(rank: int, world: int, local_rank: int, cfg: RunConfig, timeout_s: float,
              *, use_cuda: bool, confine_threads: bool = True, port_file: Path | None = None) -> RankSetup:
    """The process group up, this rank on its device and cores. With `confine_threads` the
    rank binds its threads to its cores before the group starts its own (CUDA's, NCCL's, the
    store's), which then stay on them; without, after, and the main thread alone.

    `port_file`: ranks spawned by us meet through `aptmoe.exec.store.local_store` (rank 0
    publishes its store's port there); without, the environment's rendezvous (torchrun's)."""
    backend = "nccl" if use_cuda else "gloo"
    main_threads = 1 if use_cuda else None
    if confine_threads:
        cores = bind_cores(local_rank, cfg.cluster.cores_per_rank, main_threads=main_threads)
    # Each direction between two ranks has its own group (aptmoe.exec.comm), so torch's
    # warning that unbatched p2p ops serialise within a group says nothing here.
    os.environ.setdefault("TORCH_NCCL_SHOW_EAGER_INIT_P2P_SERIALIZATION_WARNING", "false")
    device = Device(f"cuda:{local_rank}" if use_cuda else "cpu")
    kw = {"device_id": device.torch} if use_cuda else {}
    if port_file is not None:
        kw["store"] = local_store(rank, world, port_file, timeout_s)
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s), **kw)
    if not confine_threads:
        cores = bind_cores(local_rank, cfg.cluster.cores_per_rank, main_threads=main_threads, every_thread=False)
    return RankSetup(rank, world, local_rank, device, cores)


def _import_what_the_first_backward_imports() -> None:
    """`torch.autograd.backward` with explicit gradients, as every stage's backward calls it,
    imports torch.fx's symbolic shapes (with sympy and mpmath: 486 modules) on its first call,
    for a shape check (`torch.autograd._make_grads`). On the one-H200 grid that was 2.7 s of
    the warm-up step (docs/validation-h200-v9), after `gc.freeze()`, so their objects stayed
    in the collector's scans through the timed steps. Imported here, on a thread beside the
    build (whose torch calls release the GIL), and frozen with the rest."""
    try:
        import torch.fx.experimental.symbolic_shapes  # noqa: F401
    except Exception:                   # the first backward imports it then, and says what is wrong
        pass


def run_pipeline(setup: RankSetup, cfg: RunConfig, plan: Plan, cost: CostSource | None, *, data: str | None,
                 opts: ExecOptions, trace_path: Path | None = None, params_dir: Path | None = None,
                 gpu_memory_cap: int | None = None, progress=None,
                 marks: dict[str, float] | None = None, torch_profile: Path | None = None) -> dict | None:
    """Train `cfg` with `plan` on this rank; rank 0 returns the result dict, others None.
    `torch_profile`: where to write torch.profiler's trace of the last timed step.

    `marks` (name -> `time.time()`, in order) gets the end of each part of the run: build
    (model, buffers, threads), probes (the host's speed before the steps), warmup, steps,
    finish (the probes again, closing and gathering). Rank 0's
    result carries them as `wall_s`, so a run that takes long says where."""
    marks = {} if marks is None else marks
    preload = threading.Thread(target=_import_what_the_first_backward_imports, name="preload", daemon=True)
    preload.start()
    dev = setup.device
    if gpu_memory_cap is not None:
        dev.cap_memory(gpu_memory_cap)
    source = make_source(data, cfg.model.seq_length, vocab_size=cfg.model.vocab_size, seed=cfg.train.seed)
    peers = PeerChannels(plan, setup.rank, opts.timeout_s) if setup.world > 1 else None
    rt = RankRuntime(cfg, plan, setup.rank, dev, cost, peers, source, opts, cores=setup.cores)
    # Python's cyclic collector, left alone, runs full collections during the steps, each
    # scanning every object the process holds (torch's modules among them) with the GIL held:
    # on the 2-core machine they doubled a CPU rank's Mobius step (77 against 39 ms) once the
    # executor stopped importing torch._dynamo and sympy, whose objects had made full
    # collections rare by accident. What exists now lives to the end of the run: out of the
    # collector's scans with it.
    preload.join()
    gc.freeze()
    marks["build"] = time.time()
    pop = popularity_from_config(cfg)
    warm, steps = cfg.train.num_warmup_steps, cfg.train.num_training_steps
    reports: list[StepReport] = []
    try:
        # the issuing thread's speed around the steps (aptmoe.host): a run's host can be slower
        # or faster than the calibration's, and this says by how much; and the host memory's,
        # as the rank's CPU work sees it (exec/host_stream.py)
        loop_s = [python_loop_s()]
        stream = [rt.host_stream_GBps()]
        marks["probes"] = time.time()
        if warm == 0:
            marks["warmup"] = time.time()
        for i in range(warm + steps):
            if i == warm:
                allocs = dev.allocator_counts()
            with torch_profiled(torch_profile if i == warm + steps - 1 else None, dev.cuda, f"aptmoe step {i}"):
                rep = rt.run_step(i, pop.iteration(i))
            if i >= warm:
                reports.append(rep)
            if i + 1 == warm:
                marks["warmup"] = time.time()
            if progress is not None:
                progress(i + 1, warm + steps, rep)
        marks["steps"] = time.time()
        # what the timed steps asked the driver for (none, once the warm-up step has filled the
        # caching allocators): a call there can hold up the issuing thread's launches
        allocs = {k: round(v - allocs.get(k, 0.0), 6) for k, v in dev.allocator_counts().items()}
        loop_s.append(python_loop_s())
        stream.append(rt.host_stream_GBps())
        placement = rt.thread_placement()
        outside = dev.outside_allocator_bytes()
        if params_dir is not None:
            save_params(rt, params_dir / f"params-rank{setup.rank}.pt")
    finally:
        rt.close()
        gc.unfreeze()           # a torchrun rank goes on to its next schedule
    gathered = [None] * setup.world if setup.rank == 0 else None
    if setup.world > 1:
        dist.gather_object((reports, loop_s, stream, placement, allocs, outside), gathered, dst=0)
    else:
        gathered = [(reports, loop_s, stream, placement, allocs, outside)]
    if setup.rank != 0:
        return None
    measured = [pop.iteration(warm + j) for j in range(steps)]
    res = assemble(cfg, plan, [g[0] for g in gathered], measured, setup, trace_path,
                   host_loop_s=[g[1] for g in gathered], host_stream=[g[2] for g in gathered])
    # where each rank's threads could run after the steps: "loose" ones can stall its CPU
    # worker's OpenMP team (aptmoe.exec.cores)
    res["threads"] = [g[3] for g in gathered]
    if any(g[4] for g in gathered):
        res["allocations"] = [g[4] for g in gathered]       # per rank, over the timed steps
    if setup.device.cuda:
        # per rank, after the steps: what the CUDA context and its loaded kernels took beside
        # the model's memory (peak_gpu_bytes counts torch's allocator only)
        res["gpu_bytes_outside_allocator"] = [g[5] for g in gathered]
    marks["finish"] = time.time()
    res["wall_s"] = wall_parts(marks)
    return res


@contextlib.contextmanager
def torch_profiled(path: Path | None, cuda: bool, label: str = "aptmoe"):
    """torch.profiler over the `with` block, its Chrome trace gzipped to `path` (None: no
    profiling), the block marked `label` in it. It records the calling thread's torch ops,
    and on a GPU, from CUPTI, every thread's CUDA runtime calls and the kernels: how long each
    launch took, and what the copy, load and CPU threads asked the driver for meanwhile
    (session 16 read the issuing thread's launches off it). The trace is written uncompressed
    by torch, then gzipped here (torch's own .gz export is not in every version this runs on)."""
    if path is None:
        yield
        return
    from torch.profiler import ProfilerActivity, profile, record_function

    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        with record_function(label):
            yield
    raw, tmp = path.with_name(f".{path.name}.json"), path.with_name(f".{path.name}.tmp")
    try:
        prof.export_chrome_trace(str(raw))
        with open(raw, "rb") as src, gzip.open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.replace(tmp, path)
    finally:                            # nothing half-written stays beside the outputs
        raw.unlink(missing_ok=True)
        tmp.unlink(missing_ok=True)


def wall_parts(marks: dict[str, float]) -> dict[str, float]:
    """Seconds of each part from ordered marks (name -> when it ended): every part after
    the first mark, which is where the clock starts, plus their total."""
    names, at = list(marks), list(marks.values())
    parts = {n: round(b - a, 4) for n, a, b in zip(names[1:], at, at[1:])}
    parts["total"] = round(at[-1] - at[0], 4) if at else 0.0
    return parts


def save_params(rt: RankRuntime, path: Path) -> None:
    """This rank's parameters, flat per block (named as `Block` prints) plus the ends it holds."""
    out = {str(b): fp.flat.cpu().clone() for b, fp in rt.master.items()}
    out.update({k: v.detach().cpu().reshape(-1).clone() for k, v in rt.ends.items()})
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(out, tmp)
    os.replace(tmp, path)


def _union_s(spans: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(spans):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def busy_seconds(events: list[tuple]) -> dict[str, float]:
    """Per resource, the time some work held it (overlaps counted once)."""
    spans: dict[str, list] = {res: [] for res in RESOURCES}
    for name, stream, start, end, cat, _ in events:
        if stream == "compute" and cat in COMPUTE_CATS and ("@" in name or cat == "update"):
            spans["compute"].append((start, end))
        elif stream == "cpu" and cat in ("cpu-expert", "recompute", "update"):
            spans["cpu"].append((start, end))
        elif stream == "load" and cat.startswith("load-"):
            spans["h2d"].append((start, end))
        elif stream == "offload" and cat == "offload":
            spans["d2h"].append((start, end))
        elif stream == "net" and cat == "send":
            spans["net"].append((start, end))
    return {k: _union_s(v) for k, v in spans.items()}


def _summed(dicts) -> dict[str, float]:
    out: dict[str, float] = {}
    for d in dicts:
        for k, v in d.items():
            out[k] = out.get(k, 0) + v
    return out


def assemble(cfg: RunConfig, plan: Plan, per_rank: list[list[StepReport]], measured, setup: RankSetup,
             trace_path: Path | None, host_loop_s: list[list[float]] | None = None,
             host_stream: list[list[float | None]] | None = None) -> dict:
    """Rank 0's result dict from every rank's step reports; `host_loop_s`: per rank, the
    reference loop's seconds before and after the steps (aptmoe.host.python_loop_s);
    `host_stream`: per rank, the host memory stream's GB/s on its CPU worker before and after
    (exec/host_stream.py; None where the plan does no CPU work)."""
    steps = len(per_rank[0])
    G = len(per_rank)
    step_s = [max(per_rank[r][j].step_s for r in range(G)) for j in range(steps)]
    last = plan.rank_of(plan.num_stages - 1)
    losses = [per_rank[last][j].losses for j in range(steps)]
    steps_of = [[per_rank[r][j] for r in range(G)] for j in range(steps)]      # per step, every rank's report
    busy = [[busy_seconds(rep.events) for rep in reps] for reps in steps_of]
    m = shared_metrics(
        cfg, step_s, G, busy_s=[{res: sum(b[res] for b in bs) for res in bs[0]} for bs in busy],
        expert_tokens=(sum(rep.expert_tokens.get("cpu", 0) for reps in steps_of for rep in reps),
                       sum(rep.expert_tokens.get("gpu", 0) for reps in steps_of for rep in reps)),
        phase_bytes=[_summed(rep.bytes_by_phase for rep in reps) for reps in steps_of],
        phase_copies=[_summed(rep.copies_by_phase for rep in reps) for reps in steps_of], measured=measured)
    m.update({
        "mem/peak_gpu_bytes": max(rep.peak_gpu_bytes for reps in steps_of for rep in reps),
        "mem/peak_block_bytes": max(rep.peak_block_bytes for reps in steps_of for rep in reps),
        "loss/last": statistics.fmean(losses[-1]) if losses[-1] else float("nan"),
    })
    for key, name in (("load", "h2d"), ("d2h", "d2h")):
        m[f"link/{name}_bytes"] = statistics.fmean(sum(rep.bytes.get(key, 0.0) for rep in reps) for reps in steps_of)
    # The CPU update: its time per rank, and how much of the step is left after the rank's
    # last GPU work (the part of the update, and of the offload before it, nothing hides).
    upd = [sum(e[3] - e[2] for e in rep.events if e[4] == "update" and e[1] == "cpu")
           for reps in steps_of for rep in reps]
    tail = [s - max((e[3] for e in rep.events if e[1] == "compute" and e[4] != "marker"), default=s)
            for s, reps in zip(step_s, steps_of) for rep in reps]
    m["update/cpu_s"] = statistics.fmean(upd)
    m["time/after_last_compute_s"] = statistics.fmean(tail)
    calls = sum(rep.host_blocks for reps in steps_of for rep in reps)
    m["host/s_per_block_call"] = sum(rep.host_block_s for reps in steps_of for rep in reps) / calls if calls else 0.0
    if trace_path is not None:
        tr = Trace("real", meta={"pipeline": plan.pipeline, "model": cfg.model.name, "gini": cfg.popularity.gini,
                                 "topo": cfg.cluster.topo, "device": str(setup.device)})
        t0 = 0.0
        for j in range(steps):
            for r in range(G):
                for name, stream, start, end, cat, args in per_rank[r][j].events:
                    tr.add(name, r, stream, t0 + start, t0 + end, cat, **args)
            t0 += step_s[j]
        tr.save(trace_path)
    peak = int(m["mem/peak_gpu_bytes"])
    it = m["time/iteration_s"]
    return {"pipeline": plan.pipeline, "iteration_s": it, "throughput_seq_per_s": m["throughput/seq_per_s"],
            "oom": False, "peak_gpu_bytes": peak,
            "peak_gpu_bytes_per_rank": [max(rep.peak_gpu_bytes for rep in reps) for reps in per_rank],
            "num_stages": plan.num_stages, "losses": losses, "step_s": step_s, "metrics": m,
            "device": str(setup.device), "config": cfg.to_dict(),
            **({"host_loop_s": {"before": [r[0] for r in host_loop_s], "after": [r[-1] for r in host_loop_s]}}
               if host_loop_s else {}),
            **({"host_stream_GBps": {"threads": cfg.cluster.worker_cores, "before": [r[0] for r in host_stream],
                                     "after": [r[-1] for r in host_stream]}}
               if host_stream and all(v is not None for r in host_stream for v in r) else {})}


def report_failure(rank: int, e: BaseException, log_dir: Path | None) -> None:
    """One line on stderr per failing rank; the traceback goes to a log file where there is a folder."""
    line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    where = ""
    if log_dir is not None:
        try:
            log_dir.mkdir(parents=True, exist_ok=True)
            (log_dir / f"error-rank{rank}.log").write_text(traceback.format_exc())
            where = f" (traceback in {log_dir}/error-rank{rank}.log)"
        except OSError:
            pass
    print(f"aptmoe-run: rank {rank}: {line}{where}", file=sys.stderr, flush=True)


__all__ = ["RankSetup", "allowed_cores", "assemble", "bind_cores", "cores_per_rank", "busy_seconds", "init_rank", "report_failure", "run_pipeline", "wall_parts",
           "save_params"]
