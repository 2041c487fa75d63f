"""How long the executor's CPU jobs wait beyond their copies and their experts (`cpu_job`).

A CPU job (a layer's CPU experts in one pass, exec/runtime.py `_submit_cpu`) is handed to the
CPU worker thread, which waits for the job's inputs on the GPU, copies them down, runs the
experts, copies the outputs up and waits for them to land; then the issuing thread, which
waited for the job, wakes. Each hand-over is a Python thread woken. On the 2-GPU H200 (S8
G0.3, session 19) a job took 0.7-1.1 ms longer than its copies and experts: the worker took
it 150-280 us after the hand-over, the copies took 270-640 and 160-430 us for tens of KB (a
median job's 6-18 tokens), and the issuing thread resumed 240-730 us after the outputs landed.

Those waits are read here from the executor's own trace: `aptmoe-run` APTMoE on two GPUs
(one where there is one) with MoE-S's widths on a native link (its cold experts go to the CPU), each job's phases
(trace.CPU_JOB_PHASES) as the executor timed them:

* `take_s`: the median of the wait for the worker and for the inputs;
* `down_s`, `up_s`: the medians of the copies' phases (their bytes at this size take a few
  microseconds at the native rate, which the model adds again: left in);
* `resume_s`: the median time from a job's outputs landing to the issuing thread's next call,
  where the thread waited for them, less the median from a layer's last GPU expert to the
  next call where the layer had no job (the combine and the next launch, which the model
  already has in `dispatch`).

    python -m aptmoe.calibration.cpu_jobs [--repeats 1]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
from pathlib import Path

from aptmoe.adam_gaps import gaps_by_policy
from aptmoe.calibration.dispatch import _probe, run_on_gpus
from aptmoe.flags import whole_number
from aptmoe.profile import CpuJob
from aptmoe.trace import Trace, action_runs, block_kind, is_block_call

# G 0.6: its cold experts see few tokens, so the split sends them to the CPU in most layers
# (at G 0.3 on one H200 two of four runs had no forward job the issuing thread waited for).
# 12 layers, a depth no cell of the matrix has, so that the calibration's run stays apart from
# the runs it is checked on (until session 21 it was the 2-GPU grid's S8 G0.6 native APTMoE
# cell, of its fit set).
# Mobius beside it for the CPU worker's time between Adam chunks under the stage policy
# (`adam_gap_s`, aptmoe/adam_gaps.py); APTMoE's own run gives the aptmoe policy's.
SCHEDULES = ("APTMoE", "Mobius")
PROBE = _probe({"num_layers": 12, "num_stages": 4, "num_experts": 8, "gini": 0.6, "batch_size": 32, "num_chunks": 4,
                "seq_length": 128, "pipeline": ",".join(SCHEDULES), "num_warmup_steps": 1, "num_training_steps": 6})
MIN_JOBS = 5        # forward jobs waited for, and layers without one, that the medians need


def cpu_job_from_trace(trace: Trace) -> CpuJob:
    """The medians above from one APTMoE trace of the executor (source 'real')."""
    jobs = [e for e in trace.events if e.cat == "cpu-job"]
    if not jobs:
        raise ValueError("the CPU-job probe put no expert on the CPU: APTMoE's split sent every expert to the "
                         "GPU on this machine, so there is no job to time")
    phase = {k: [j.args[f"{k}_us"] * 1e-6 for j in jobs] for k in ("queue", "ready", "down", "up")}
    take = statistics.median(q + r for q, r in zip(phase["queue"], phase["ready"]))
    run_of = action_runs(trace)
    # forward jobs by (rank, action, its run, layer)
    job_of = {(j.rank, *run_of(j), j.args["layer"]): j for j in jobs if "F" in run_of(j)[0]}
    calls = sorted((e for e in trace.events if is_block_call(e) and e.cat == "forward"),
                   key=lambda e: (e.rank, e.start_s))
    waited, alone = [], []
    for x, y in zip(calls, calls[1:]):
        if x.rank != y.rank or block_kind(x.name) != "e" or x.args.get("layer") == y.args.get("layer"):
            continue
        if run_of(x) != run_of(y):
            continue                                 # the action's last layer: no next call in it
        j = job_of.get((x.rank, *run_of(x), x.args.get("layer")))
        if j is None:
            alone.append(y.start_s - x.end_s)
        elif j.end_s > x.end_s and y.start_s >= j.end_s:
            waited.append(y.start_s - j.end_s)
    if len(waited) < MIN_JOBS or len(alone) < MIN_JOBS:
        raise ValueError("the CPU-job probe's forwards need layers with a job the issuing thread waited for and "
                         f"layers without one; it had {len(waited)} and {len(alone)}")
    resume = max(0.0, statistics.median(waited) - statistics.median(alone))
    return CpuJob(take_s=take, down_s=statistics.median(phase["down"]), up_s=statistics.median(phase["up"]),
                  resume_s=resume)


def probe_traces(keep: Path | None = None) -> dict[str, Trace]:
    """The probe's traces by schedule, on two GPUs where there are (as the runs it stands for);
    `keep`: the folder to keep the run in."""
    traces = run_on_gpus(PROBE, "the CPU-job probe (aptmoe-run " + " and ".join(SCHEDULES) + " on MoE-S widths, "
                         "{gpus} GPU)", SCHEDULES, keep=keep)
    return dict(zip(SCHEDULES, traces))


def cpu_job_from_traces(traces: dict[str, Trace]) -> CpuJob:
    """The APTMoE trace's medians (`cpu_job_from_trace`) with the CPU worker's time between
    Adam chunks under each policy the traces have (aptmoe/adam_gaps.py)."""
    job = cpu_job_from_trace(traces["APTMoE"])
    return dataclasses.replace(job, adam_gap_s=gaps_by_policy(traces, "the CPU-job probe"))


def measure_cpu_job() -> CpuJob:
    """Runs the probe on the GPU and returns the medians of its jobs' waits."""
    return cpu_job_from_traces(probe_traces())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m aptmoe.calibration.cpu_jobs", description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=whole_number("run"), default=1, help="probe runs, each its own process (1)")
    ns = p.parse_args(argv)
    try:
        for i in range(ns.repeats):
            t = measure_cpu_job()
            print(f"run {i + 1}: take {t.take_s * 1e6:.0f} us, down {t.down_s * 1e6:.0f} us, up {t.up_s * 1e6:.0f} us, "
                  f"resume {t.resume_s * 1e6:.0f} us; between Adam chunks "
                  + ", ".join(f"{k} {v * 1e6:.1f} us" for k, v in t.adam_gap_s.items()))
    except (ValueError, RuntimeError) as e:
        print(f"cpu_jobs: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
