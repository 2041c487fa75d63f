"""``aptmoe-sim validate``: run the executor, predict the same config, and compare (issue 6).

    aptmoe-sim validate --calibration h200 --is_moe=True --model_config=S ... --pipeline all --out runs/val

1. `aptmoe-run` (a subprocess: the simulator never imports torch) trains the config with
   the flags given, writing its results and measured traces.
2. For each schedule the simulator predicts the config the executor *ran* (its
   results.json records it, cores per rank and GPU memory included) with the calibration
   profile, over as many steps, from the same seed and popularity, on the same plan and with
   the same decisions: the executor plans with the profile given here and keeps a copy
   (plan-profile.json), and a stored run is predicted with the decisions of the profile it
   planned with (`planning_profile`), whatever profile times it.
3. The comparison: predicted against measured step time, busy fraction of each resource,
   and per-action timing error (an action is matched by rank, stream, name and occurrence), by
   category; an overlay timeline per schedule (prediction above, measurement below).
4. Where the run and the profile's dispatch probe both timed the host's reference loop
   (aptmoe.host.python_loop_s), a second prediction with the block calls' host cost scaled by
   their ratio (`host_speed`, `error_host`). It is not the prediction: it needs the run's own
   host, which a what-if does not have. It says how much of an error is the host being faster
   or slower than when it was calibrated, which on the one-GPU H200 moved 1.6x between minutes.

Written into ``--out``: validation.json, validation.csv, actions-<schedule>.csv, the
executor's folder (``real/``), the predicted traces and the overlay PNGs.
"""

from __future__ import annotations

import argparse
import bisect
import csv
import itertools
import statistics
import sys
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path

from aptmoe.config import RunConfig
from aptmoe.cpu_jobs_alike import cpu_jobs_alike
from aptmoe.run_process import launch_executor
from aptmoe.flags import add_cluster_flags, add_kernel_loading_flag, add_seed_flags, make_parser, whole_number
from aptmoe.host import physical_cores, run_loop_s, run_stream_GBps
from aptmoe.metrics import RESOURCES
from aptmoe.plot import plot_overlay
from aptmoe.profile import default_planning_profile, load_profile
from aptmoe.replayed_placements import run_placements
from aptmoe.report import StagedDir, fmt, format_table, short_fallbacks, timestamp
from aptmoe.stalls import load_stalls, stalls
from aptmoe.stored import PLAN_PROFILE, RESULTS, VALIDATION, drop_packed, read_json, stored_file
from aptmoe.trace import Trace, by_occurrence, run_trace, write_json_atomic

# Categories whose durations are compared action by action (work, not markers or waits).
# Not sends: NCCL runs a send on its own stream, so the executor's event around it on the net
# stream spans only its enqueue, where the simulator's spans the transfer (the 2-GPU grids
# reported "errors" of -80% to +2354% for it, docs/validation-h200-2gpu-v2).
TIMED = ("forward", "backward", "recompute", "cpu-expert", "load-inter-stage", "load-inter-layer",
         "load-inter-expert", "load-stage", "offload", "update")


# passed to aptmoe-run by validate and the matrix
KERNEL_LOADING_WHY = ("Passed to aptmoe-run (eager): the simulator predicts steps without one-off kernel loads, "
                      "and a run of a few steps would meet them in its timed steps")


def make_validate_parser(prog: str) -> argparse.ArgumentParser:
    p = make_parser(f"{prog} validate", "Run the executor on a config, predict it with the simulator, and report "
                                        "the prediction's error: step time, per-resource busy time, per-action "
                                        "timing, and an overlay timeline.")
    add_seed_flags(p)
    add_cluster_flags(p)
    g = p.add_argument_group("validation flags")
    g.add_argument("--calibration", required=True, help="profile of THIS machine (built-in name or .json)")
    g.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto", help="passed to aptmoe-run")
    g.add_argument("--timeout", type=float, default=300.0, help="passed to aptmoe-run (300)")
    g.add_argument("--repeats", type=whole_number("run"), default=1,
                   help="passed to aptmoe-run: runs of each schedule, the median kept and predicted (1)")
    add_kernel_loading_flag(g, "eager", KERNEL_LOADING_WHY)
    g.add_argument("--no-plot", action="store_true",
                   help="draw no timelines: passed to aptmoe-run, and no overlays (the matrix records its "
                        "cells' commands with it)")
    add_replay_flag(g)
    g.add_argument("--out", default=None, help="output folder (default: runs/validate-<timestamp>)")
    g.add_argument("-q", "--quiet", action="store_true")
    return p


def add_replay_flag(g) -> None:
    g.add_argument("--replay-placements", action="store_true",
                   help="predict APTMoE with each run's own CPU placements instead of the policy's "
                        "(aptmoe/replayed_placements.py): the error left is what the work costs, not "
                        "which experts the prediction chose")


def executor_argv(argv: list[str]) -> list[str]:
    """The flags aptmoe-run shares with us: all but ours (--calibration, --out, -q) and
    --kernel-loading, whose default is ours (`run_executor` passes it)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        name = a.split("=", 1)[0]
        if name in ("--calibration", "--out", "--kernel-loading"):
            skip = "=" not in a
            continue
        if name in ("-q", "--quiet", "--replay-placements"):
            continue
        out.append(a)
    return out


def run_executor(argv: list[str], out: Path, calibration: str | Path | None = None, *,
                 kernel_loading: str = "eager") -> None:
    """The executor on our flags, its APTMoE policy planning with `calibration` (the profile
    the prediction uses: one plan, one set of decisions), its kernels loaded as
    `kernel_loading` says; exit 3 (every schedule refused) still writes its results."""
    plan_with = [] if calibration is None else ["--calibration", str(calibration)]
    launch_executor([*executor_argv(argv), *plan_with, "--kernel-loading", kernel_loading, "-q"], out, ok=(0, 3))


def planning_profile(real_dir: Path, real: dict):
    """The profile the executor planned a run with: the copy it wrote beside its results
    (PLAN_PROFILE, xz-compressed where the run is stored); for runs from before it wrote one,
    the --calibration of its command, else aptmoe-run's default of the time (h200 on a GPU,
    a800-paper on the CPU)."""
    if (kept := stored_file(real_dir / PLAN_PROFILE)) is not None:
        return load_profile(kept)
    cmd = real.get("command", [])
    for i, a in enumerate(cmd):
        if a == "--calibration" and i + 1 < len(cmd):
            return load_profile(cmd[i + 1])
        if a.startswith("--calibration="):
            return load_profile(a.split("=", 1)[1])
    # a schedule's "device" is the GPU's name on a GPU rank (exec/device.py), "cpu" on the CPU
    cuda = any(s.get("device", "cpu") != "cpu" for s in real.get("schedules", {}).values())
    return load_profile(default_planning_profile(cuda))


def _key_events(trace: Trace) -> dict[tuple[int, str, str, int], object]:
    # The stream is part of the key: the APTMoE policy places experts from the times it has
    # seen, so a run and its prediction can compute one expert of one slot on different
    # sides (the GPU in one, the CPU in the other), and those are not the same action.
    return by_occurrence((e for e in trace.events if e.cat in TIMED), lambda e: (e.rank, e.stream, e.name))


# What can slow a rank's compute blocks, by the label the report gives it: the streams whose
# work can slow the thread that issues the blocks (their threads wake for the GIL; their
# copies and CPU work stream host memory), and a receive posted and not yet matched. NCCL's
# receive kernel waits on the GPU from its post until the peer's send: on the 2-GPU H200 grid
# (docs/validation-h200-2gpu) MoE-M attention blocks ran 1.6x their time alone beside one.
NEIGHBOURS = ("load", "offload", "cpu", "recv")


def _neighbour(e) -> str | None:
    """The label of a measured event in NEIGHBOURS, or None where it is none of them."""
    if e.dur_s <= 0:
        return None
    if e.cat == "recv":
        return "recv"
    return e.stream if e.stream in NEIGHBOURS and e.cat in TIMED else None


class _Busy:
    """When each of a rank's neighbours had work in flight, in the measured trace."""

    def __init__(self, trace: Trace) -> None:
        spans: dict[tuple[int, str], list[tuple[float, float]]] = defaultdict(list)
        for e in trace.events:
            label = _neighbour(e)
            if label is not None:
                spans[(e.rank, label)].append((e.start_s, e.end_s))
        self.starts, self.reach = {}, {}
        for k, v in spans.items():
            v.sort()
            self.starts[k] = [a for a, _ in v]
            self.reach[k] = list(itertools.accumulate((b for _, b in v), max))   # latest end so far

    def beside(self, rank: int, start: float, end: float) -> str:
        """The neighbours with work overlapping [start, end), joined by '+', or 'alone'."""
        out = []
        for label in NEIGHBOURS:
            starts = self.starts.get((rank, label))
            if starts:
                i = bisect.bisect_left(starts, end)          # spans that start before `end`
                if i and self.reach[(rank, label)][i - 1] > start:
                    out.append(label)
        return "+".join(out) or "alone"


def is_block(stream: str, name: str) -> bool:
    """A single block on the compute stream (`0F0@1:e3`), not a whole stage's span (`0F0`)."""
    return stream == "compute" and ":" in name


def action_errors(predicted: Trace, measured: Trace) -> tuple[dict[str, dict], list[dict]]:
    """Per category: matched actions, median relative duration error, summed predicted and
    measured seconds; and one row per matched action, with what ran beside a compute block
    in the measurement (`beside`: the neighbour streams busy during it, or 'alone') and the
    host time of its call where the executor kept it."""
    p, m = _key_events(predicted), _key_events(measured)
    busy = _Busy(measured)
    rows, by_cat = [], defaultdict(list)
    for key in sorted(set(p) & set(m)):
        pe, me = p[key], m[key]
        if me.dur_s <= 0:
            continue
        err = (pe.dur_s - me.dur_s) / me.dur_s
        rows.append({"rank": key[0], "stream": key[1], "action": key[2], "occurrence": key[3], "cat": me.cat,
                     "predicted_s": pe.dur_s, "measured_s": me.dur_s, "error": err,
                     "beside": busy.beside(me.rank, me.start_s, me.end_s) if is_block(key[1], key[2]) else "",
                     # the executor's host time of the call (blocks, since 9e13ae7): host- or GPU-held
                     "measured_host_s": me.args["host_us"] / 1e6 if "host_us" in me.args else ""})
        by_cat[me.cat].append((pe.dur_s, me.dur_s, err))
    summary = {cat: {"actions": len(v), "median_error": statistics.median(x[2] for x in v),
                     "predicted_s": sum(x[0] for x in v), "measured_s": sum(x[1] for x in v)}
               for cat, v in sorted(by_cat.items())}
    return summary, rows


def beside_errors(rows: list[dict]) -> dict[str, dict]:
    """Compute blocks by what ran beside them: blocks and their median error per label."""
    by: dict[str, list[float]] = defaultdict(list)
    for r in rows:
        if r["beside"]:
            by[r["beside"]].append(r["error"])
    return {k: {"blocks": len(v), "median_error": statistics.median(v)} for k, v in sorted(by.items())}


def validate_schedule(name: str, real: dict, real_dir: Path, profile, tmp: Path, plot: bool = True,
                      plan_with=None, replay: bool = False) -> dict:
    """One schedule of a run, predicted with `profile` on the decisions of `plan_with` (the
    profile the run planned with; default `profile`); with `replay`, on the run's own CPU
    placements (from its trace)."""
    from aptmoe.sim.simulate import simulate

    if real.get("oom") or real.get("iteration_s") is None:
        return {"pipeline": name, "measured_s": None, "predicted_s": None, "error": None,
                "note": real.get("oom_detail", "did not run")}
    cfg = RunConfig.from_dict(real["config"])
    steps = len(real["step_s"])
    measured_trace = run_trace(real_dir, name)
    mt = None if measured_trace is None else Trace.load(measured_trace)
    placements = None
    if replay:
        if mt is None:
            raise ValueError(f"--replay-placements needs the run's trace: {real_dir} has no trace of {name}")
        placements = run_placements(mt)
    trace = Trace("sim", meta={"pipeline": name, "model": cfg.model.name, "calibration": profile.name})
    pred = simulate(cfg, profile, trace=trace, measured_steps=steps, plan_with=plan_with, placements=placements)
    trace.save(tmp / f"trace-{name}-predicted.json")
    row = {"pipeline": name, "steps": steps, "measured_s": real["iteration_s"], "predicted_s": pred.iteration_s,
           "error": _error(pred.iteration_s, real["iteration_s"]),
           "predicted_oom": pred.oom, "replayed_placements": replay,
           # cost figures the profile had no measurement for (threads or tokens outside its
           # points, parts it skipped): where a prediction leans on them, its error is theirs
           "fallbacks": sorted(pred.fallbacks)}
    for r in RESOURCES:
        row[f"busy/{r}/measured"] = real["metrics"].get(f"busy/{r}")
        row[f"busy/{r}/predicted"] = pred.metrics.get(f"busy/{r}")
    speed = host_speed(real, profile)
    if speed is not None and pred.iteration_s is not None:
        at = simulate(cfg, profile.with_host_speed(speed), measured_steps=steps, plan_with=plan_with,
                      placements=placements)
        row.update(host_speed=speed, predicted_host_s=at.iteration_s,
                   error_host=_error(at.iteration_s, real["iteration_s"]))
    mem = memory_speed(real, profile)
    if mem is not None:
        row["memory_speed"] = mem
    if mt is not None and not pred.oom:
        summary, rows = action_errors(trace, mt)
        row["actions"] = summary
        # one-off stalls of single calls (aptmoe/stalls.py): the longest rank's time over the
        # prediction in them, a step's worth, beside the error they are a part of
        st = stalls(mt, trace)
        row["stalls"], row["stall_s_per_step"] = st.calls, st.excess_s / steps
        # loads far over the run's copy rate (aptmoe/stalls.py), most of them ending with a
        # receive of their rank: a step's worth of the most-stalled rank's time over
        ls = load_stalls(mt)
        row["load_stalls"], row["load_stall_s_per_step"] = ls.stalled, ls.worst_rank_s / steps
        # the experts each put on the CPU (aptmoe/cpu_jobs_alike.py): where they differ, the
        # prediction's timing changed its decisions, and per-action errors compare the rest
        jobs = cpu_jobs_alike(mt, trace)
        if jobs.alike is not None:
            row["cpu_jobs"] = asdict(jobs)
            row["cpu_jobs_alike"] = jobs.alike
            # the same run on its own placements: what is left is what the work costs
            # (aptmoe/replayed_placements.py; --replay-placements makes it the prediction). Where
            # the prediction made the run's jobs already, that is the prediction itself.
            again = pred if replay or jobs.alike == 1 else simulate(
                cfg, profile, measured_steps=steps, plan_with=plan_with, placements=run_placements(mt))
            row["predicted_replayed_s"] = again.iteration_s
            row["error_replayed"] = _error(again.iteration_s, real["iteration_s"])
        row["beside"] = beside_errors(rows)
        with open(tmp / f"actions-{name}.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["rank", "stream", "action", "occurrence", "cat", "predicted_s", "measured_s",
                                              "error", "beside", "measured_host_s"])
            w.writeheader()
            w.writerows(rows)
        if plot:
            plot_overlay(trace, mt, tmp / f"overlay-{name}.png",
                         title=f"{name}: predicted ({profile.name}) above, measured below")
    return row


def _error(predicted: float | None, measured: float) -> float | None:
    """(predicted - measured) / measured; None where the simulator predicts no step (OOM)."""
    return None if predicted is None else (predicted - measured) / measured


def host_speed(real: dict, profile) -> float | None:
    """How many times slower the run's issuing thread was than the dispatch probe's (the ratio
    of their reference loops), or None where either did not time it."""
    run = run_loop_s(real.get("host_loop_s"))
    cal = None if profile.dispatch is None else profile.dispatch.loop_s
    return None if run is None or cal is None else run / cal


def memory_speed(real: dict, profile) -> float | None:
    """How many times slower the host memory streamed for the run's CPU worker than for the
    calibration's stream alone at the nearest thread count (`host_memory.cpu_alone_GBps`), or
    None where either did not measure it. A diagnostic: the prediction does not use it."""
    run = run_stream_GBps(real.get("host_stream_GBps"))
    hm = profile.host_memory
    if run is None or hm is None or not hm.cpu_alone_GBps or run[1] <= 0:
        return None
    near = min(hm.cpu_alone_GBps, key=lambda t: (abs(t - run[0]), -t))
    return hm.cpu_alone_GBps[near] / run[1]


def compare_run(real_dir: Path, profile, dest: Path, command: list[str], plot: bool = True,
                replay: bool = False) -> list[dict]:
    """Predict every schedule of the executor's run in `real_dir` and write the comparison
    (validation.json, validation.csv, actions-*.csv, predicted traces, overlays) into `dest`.
    Reads only the run's files, so a stored run can be predicted again by a newer model.
    `replay`: with each run's own CPU placements (`validate_schedule`)."""
    real = read_json(real_dir / RESULTS)
    planned = planning_profile(real_dir, real)
    rows = [validate_schedule(name, res, real_dir, profile, dest, plot, plan_with=planned, replay=replay)
            for name, res in real["schedules"].items()]
    write_json_atomic(dest / VALIDATION, {"command": command, "calibration": profile.name,
                                          "planned_with": planned.name, "schedules": rows})
    drop_packed(dest / VALIDATION)           # a stored cell's packed one, which this supersedes
    flat = [{k: v for k, v in r.items() if k not in ("actions", "beside", "fallbacks", "cpu_jobs")} for r in rows]
    with open(dest / "validation.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in flat for k in r)))
        w.writeheader()
        w.writerows(flat)
    return rows


def other_machine(profile, prog: str) -> str | None:
    """A warning where `profile` cannot describe this machine (None where it may): a run takes
    its cores per rank from the profile it plans with, so runs planned for another machine's
    cores run here at thread counts this machine's figures may lack. Session 13's 2-GPU grid
    planned with h200-1gpu's 16 cores on a 32-core host: 8 cores per rank, CPU work at 6
    threads, Adam scaled from 14 and predicted 1.8x too slow (docs/validation-h200-2gpu)."""
    here, there = physical_cores(), profile.hardware.cpu_cores
    if here == there:
        return None
    return (f"{prog}: warning: --calibration {profile.name} was measured on {there} cores and this machine has "
            f"{here}: the runs plan for {there} cores (each rank its topology's share of them) and are predicted "
            f"with another machine's figures; for a prediction of this machine, calibrate it (aptmoe-calibrate)")


def run_validate(ns, argv: list[str], prog: str) -> int:
    profile = load_profile(ns.calibration)
    out = Path(ns.out or f"runs/validate-{timestamp()}")
    staged = StagedDir(out)             # a folder it cannot write is refused before the run
    say = (lambda *a: None) if ns.quiet else print
    if (warning := other_machine(profile, f"{prog} validate")) is not None:
        print(warning, file=sys.stderr)
    with staged as tmp:
        say("running the executor ...")
        run_executor(argv, tmp / "real", ns.calibration, kernel_loading=ns.kernel_loading)
        rows = compare_run(tmp / "real", profile, tmp, [prog, "validate", *argv], plot=not ns.no_plot,
                           replay=ns.replay_placements)
        fallbacks = sorted({f for r in rows for f in r.get("fallbacks", [])})
        (tmp / "fallbacks.txt").write_text("".join(f"{line}\n" for line in fallbacks))
    say(validation_table(rows))
    say(f"calibration {profile.name}: {short_fallbacks(fallbacks)}")
    say(f"wrote {out}/ (validation.json, validation.csv, fallbacks.txt, actions-*.csv"
        f"{'' if ns.no_plot else ', overlay-*.png'}, real/)")
    return 0


def validation_table(rows: list[dict]) -> str:
    host = any(r.get("host_speed") is not None for r in rows)
    mem = any(r.get("memory_speed") is not None for r in rows)
    stall = any(r.get("stall_s_per_step") is not None for r in rows)
    loads = any(r.get("load_stall_s_per_step") for r in rows)
    jobs = any(r.get("cpu_jobs_alike") is not None for r in rows)
    headers = (["pipeline", "measured s", "predicted s", "error"] + (["stalls ms/step"] if stall else [])
               + (["load stalls ms/step"] if loads else [])
               + (["CPU jobs alike", "error on run's placements"] if jobs else [])
               + [f"{r} busy m/p" for r in RESOURCES]
               + (["host x", "error at run's host"] if host else []) + (["memory x"] if mem else []))
    body = []
    for r in rows:
        busy = [f"{fmt(_pct(r.get(f'busy/{x}/measured')), '.0f')}/{fmt(_pct(r.get(f'busy/{x}/predicted')), '.0f')}%"
                for x in RESOURCES]
        extra = ([fmt(r.get("host_speed"), ".2f"), _signed(r.get("error_host"))] if host else []) \
            + ([fmt(r.get("memory_speed"), ".2f")] if mem else [])
        body.append([r["pipeline"], fmt(r.get("measured_s"), ".3f"), fmt(r.get("predicted_s"), ".3f"),
                     _signed(r.get("error")), *([ms_cell(r.get("stall_s_per_step"))] if stall else []),
                     *([ms_cell(r.get("load_stall_s_per_step"))] if loads else []),
                     *([alike_cell(r.get("cpu_jobs_alike")), _signed(r.get("error_replayed"))] if jobs else []),
                     *busy, *extra])
    return format_table(headers, body)


def alike_cell(alike) -> str:
    """`cpu_jobs_alike` as a table shows it: the share of CPU expert jobs both made ('-': none)."""
    return "-" if alike is None else f"{100 * alike:.0f}%"


def ms_cell(seconds) -> str:
    """Seconds as a table's milliseconds ("-": none)."""
    return "-" if seconds is None else f"{seconds * 1e3:.1f}"


def _signed(x) -> str:
    return fmt(_pct(x), "+.1f") + ("%" if x is not None else "")


def _pct(x):
    return None if x is None else 100 * x
