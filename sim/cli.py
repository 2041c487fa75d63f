"""``aptmoe-sim``: predict a training step of any schedule on hardware a calibration describes.

    aptmoe-sim --is_moe=True --model_config=S --num_experts=16 --gini=0.3 --topo=C1+G2 --pipeline all
    aptmoe-sim plot runs/sim-.../trace-APTMoE.json [--out timeline.png]
    aptmoe-sim sweep --grid gini=0.1,0.2,0.3 --grid pipeline=Mobius,APTMoE --is_moe=True ...

Without a subcommand it simulates: it accepts the seed artifact's flags (DESIGN §5) with
their meaning and defaults, prints the parameter count and a comparison table, and writes
results.json, results.csv, a Chrome trace, its timeline PNG and the printed plan per
schedule into ``--out``. Bad input is one line on stderr and exit status 2; the output
folder then does not exist (it is written under a temporary name and renamed at the end).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import sys
from pathlib import Path

from aptmoe.config import Pipeline, RunConfig
from aptmoe.flags import (
    add_cluster_flags,
    add_seed_flags,
    config_from_args,
    make_parser,
    pipelines_of,
    positive_number,
)
from aptmoe.profile import load_profile
from aptmoe.report import (
    StagedDir,
    first_line,
    flat_row,
    progress_bar,
    progress_disabled,
    schedule_table,
    short_fallbacks,
    speedups,
    timestamp,
    write_csv,
)

PROG = "aptmoe-sim"
SUBCOMMANDS = ("plot", "sweep", "validate", "matrix", "compare", "floor")


class UsageError(ValueError):
    """Bad input found by the front end itself."""


# --------------------------------------------------------------------------- shared pieces


def add_sim_flags(p: argparse.ArgumentParser) -> None:
    """The seed's flags, ours, and the simulator's own (shared by the default action and sweep)."""
    add_seed_flags(p)
    add_cluster_flags(p)
    g = p.add_argument_group("simulator flags")
    g.add_argument("--calibration", default="a800-paper",
                   help="built-in calibration profile name or path to a calibration .json")
    g.add_argument("--measured-steps", dest="measured_steps", type=int, default=None,
                   help="steps to simulate (default: --num_training_steps)")
    g.add_argument("--host-factor", dest="host_factor", type=positive_number("a host factor"), default=None,
                   help="what if the host issuing kernels is slower or faster than when calibrated: its cost "
                        "per block call times this (0.7: a host 1.4x faster; the reports' host_speed). Needs a "
                        "profile with dispatch costs")
    g.add_argument("--no-plot", dest="no_plot", action="store_true", help="write no PNGs")
    g.add_argument("--no-trace", dest="no_trace", action="store_true",
                   help="record no trace (and so no PNG): large configs simulate several times faster")
    g.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors; no progress bar")


def check_measured_steps(ns: argparse.Namespace) -> None:
    if ns.measured_steps is not None and ns.measured_steps < 1:
        raise UsageError(f"--measured-steps must be at least 1, got {ns.measured_steps}")


def with_host_factor(profile, factor: float | None):
    """`profile` with the host cost of every block call times `factor` (`--host-factor`; None:
    as calibrated). Why a what-if: the issuing thread's speed moves from one process and lease
    to the next by more than anything else on the H200 machines (their dispatch probe read 0.48
    to 0.97x `h200-1gpu`'s figures on four leases, docs/measured/session32), and a small
    model's step follows it."""
    if factor is None:
        return profile
    if profile.dispatch is None:
        raise UsageError(f"--host-factor: the profile {profile.name} has no host cost per block call (dispatch) "
                         "to scale; use a profile calibrated on a machine (aptmoe-calibrate) or leave it out")
    return profile.with_host_speed(factor)


def fail(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 2


# --------------------------------------------------------------------------- simulate


def make_sim_parser() -> argparse.ArgumentParser:
    p = make_parser(PROG, "Simulate training steps of the GPipe, GPipeOffload, Mobius and APTMoE schedules "
                          "on the hardware a calibration profile describes.")
    p.epilog = ("--pipeline all runs the four schedules side by side. Subcommands: "
                f"'{PROG} plot TRACE.json [--out PNG]' draws a trace; "
                f"'{PROG} sweep --grid FIELD=V1,V2 ...' runs a grid (see '{PROG} sweep -h'); "
                f"'{PROG} validate --calibration PROFILE ...' runs the executor and compares; "
                f"'{PROG} matrix --calibration PROFILE --out DIR' does so over a matrix of configs; "
                f"'{PROG} compare BEFORE AFTER' puts two matrices side by side; "
                f"'{PROG} floor A B [...]' says how far apart the same cells measured more than once land.")
    add_sim_flags(p)
    p.add_argument("--out", default=None, help="output folder (default: runs/sim-<timestamp>)")
    return p


def run_simulate(ns: argparse.Namespace, argv: list[str]) -> int:
    from aptmoe.sim.simulate import cost_for, simulate

    from aptmoe.plan.builders import build_plan
    from aptmoe.plot import plot_trace_file
    from aptmoe.trace import Trace, write_json_atomic

    check_measured_steps(ns)
    profile = with_host_factor(load_profile(ns.calibration), ns.host_factor)
    hw = profile.cluster_defaults()
    configs: dict[str, RunConfig] = {p: config_from_args(ns, pipeline=p, **hw) for p in pipelines_of(ns)}
    first = next(iter(configs.values()))
    out = Path(ns.out or f"runs/sim-{timestamp()}")
    staged = StagedDir(out)             # a folder it cannot write is refused before anything is said
    say = (lambda *a: None) if ns.quiet else print
    m = first.model
    say(f"Number of parameters: {m.num_params / 1e9:.2f}B ({m.num_params:,}) in {m.name}, "
        f"{m.num_layers} layers, {m.num_experts} experts per layer")

    results: dict[str, dict] = {}
    fallbacks: set[str] = set()
    with staged as tmp:
        bar = progress_bar(total=len(configs), desc="simulating", unit="schedule", disable=progress_disabled(ns.quiet))
        with bar:
            for name, cfg in configs.items():
                bar.set_postfix_str(name)
                cost = cost_for(cfg, profile)
                plan = build_plan(cfg, cost)
                (tmp / f"plan-{name}.txt").write_text(plan.describe() + "\n")
                trace = None if ns.no_trace else Trace("sim", meta=dict(
                    pipeline=name, model=cfg.model.name, gini=cfg.popularity.gini, topo=cfg.cluster.topo,
                    calibration=profile.name))
                res = simulate(cfg, cost, trace=trace, measured_steps=ns.measured_steps, plan=plan, check_plan=False)
                results[name] = res.to_dict()
                fallbacks.update(res.fallbacks)
                if trace is not None:
                    trace_path = tmp / f"trace-{name}.json"
                    trace.save(trace_path)
                    if not ns.no_plot:
                        plot_trace_file(trace_path, tmp / f"timeline-{name}.png")
                bar.update()
        for name, s in speedups(results).items():
            results[name]["speedup_vs_mobius"] = s
        fb = sorted(fallbacks)
        write_json_atomic(tmp / "results.json", {
            "config": first.to_dict(), "calibration": profile.name, "calibration_arg": str(ns.calibration),
            "host_factor": ns.host_factor, "pipelines": list(results),
            "measured_steps": ns.measured_steps or first.train.num_training_steps, "command": [PROG, *argv],
            "created": datetime.datetime.now().isoformat(timespec="seconds"), "fallbacks": fb, "schedules": results})
        write_csv(tmp / "results.csv", [flat_row(r) for r in results.values()])
        (tmp / "fallbacks.txt").write_text("".join(f"{line}\n" for line in fb))
    say(schedule_table(results))
    say(f"calibration {profile.name}: {short_fallbacks(fb)}")
    if ns.host_factor is not None:
        say(f"host: every block call's host cost x {ns.host_factor:g} (--host-factor)")
    if first.cluster.host_cores == 0 and any(c.schedule.pipeline is not Pipeline.GPIPE for c in configs.values()):
        # The model gives a rank's host threads a core whenever they are ready; --host-cores
        # keeps them one. Shared cores made the offload schedules up to 1.46x slower than this
        # (docs/validation-h200-hostcores), and the simulator has no model of that wait.
        say("note: --host-cores 0: the CPU work shares every core with the threads that issue kernels and "
            "copies, a wait the simulator does not model (its prediction is a lower bound)")
    say(f"wrote {out}/ (results.json, results.csv" + ("" if ns.no_trace else ", trace-*.json")
        + ("" if ns.no_trace or ns.no_plot else ", timeline-*.png") + ", plan-*.txt)")
    return 0


# --------------------------------------------------------------------------- plot


def make_plot_parser() -> argparse.ArgumentParser:
    p = make_parser(f"{PROG} plot", "Draw a trace in the aptmoe schema (simulated or measured) as a timeline PNG.")
    p.add_argument("trace", help="Chrome trace JSON written by aptmoe-sim or aptmoe-run")
    p.add_argument("--out", default=None, help="PNG to write (default: the trace's name with .png)")
    p.add_argument("--title", default=None, help="plot title (default: from the trace)")
    p.add_argument("-q", "--quiet", action="store_true")
    return p


def run_plot(ns: argparse.Namespace) -> int:
    from aptmoe.plot import plot_trace_file

    out = plot_trace_file(ns.trace, ns.out, ns.title)
    if not ns.quiet:
        print(f"wrote {out}")
    return 0


# --------------------------------------------------------------------------- entry point


def need_simpy() -> None:
    """The simulator's one dependency beyond the core, checked before a command starts work:
    `validate` and `matrix` run the executor first (a minute or more on a GPU) and would
    only then find they cannot predict it."""
    if importlib.util.find_spec("simpy") is None:
        raise ValueError("the simulator needs simpy, which is not installed here (pip install simpy); nothing was run")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "plot":
            return run_plot(make_plot_parser().parse_args(argv[1:]))
        if not (argv and argv[0] in ("compare", "floor")) and not any(a in ("-h", "--help") for a in argv):
            need_simpy()
        if argv and argv[0] == "validate":
            from aptmoe.sim.validate import make_validate_parser, run_validate

            return run_validate(make_validate_parser(PROG).parse_args(argv[1:]), argv[1:], PROG)
        if argv and argv[0] == "matrix":
            from aptmoe.sim.matrix import make_matrix_parser, run_matrix

            return run_matrix(make_matrix_parser().parse_args(argv[1:]), argv[1:])
        if argv and argv[0] == "compare":
            from aptmoe.sim.matrix_compare import make_compare_parser, run_compare

            return run_compare(make_compare_parser(PROG).parse_args(argv[1:]))
        if argv and argv[0] == "floor":
            from aptmoe.sim.matrix_floor import make_floor_parser, run_floor

            return run_floor(make_floor_parser(PROG).parse_args(argv[1:]))
        if argv and argv[0] == "sweep":
            from aptmoe.sim.sweep import make_sweep_parser, run_sweep

            return run_sweep(make_sweep_parser().parse_args(argv[1:]), argv)
        return run_simulate(make_sim_parser().parse_args(argv), argv)
    except (ValueError, OSError) as e:        # ConfigError, ProfileError, PlanError, TraceError, ...
        return fail(first_line(e))
    except RuntimeError as e:                 # validate/matrix: the executor failed (its last line)
        from aptmoe.run_process import ExecutorFailed

        if not isinstance(e, ExecutorFailed):
            raise
        return fail(first_line(e))
    except SystemExit as e:                   # argparse: -h (0) or a bad flag (2, its one line printed)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
