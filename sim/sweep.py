"""``aptmoe-sim sweep``: a grid of simulations in parallel processes, one CSV row per point.

    aptmoe-sim sweep --grid gini=0.1,0.2,0.3,0.4 --grid pipeline=Mobius,APTMoE \\
        --grid link_bandwidth=8,16,25 --is_moe=True --model_config=S --num_experts=16 --jobs 8
    aptmoe-sim sweep --preset fig11          # the paper's Fig. 11 grid

Every point is the base command line (the seed's flags and ours) with the grid's fields
set, built through `aptmoe.flags.config_from_args` exactly as a single run would be. A
point whose config is impossible (`ConfigError`) becomes a row with an ``error`` column.
No traces are recorded (speed). Writes ``sweep.csv``, ``sweep.json`` and the plots
``throughput_vs_gini.png`` (the paper's Fig. 11 form, a panel per model when the model
varies) and ``speedup_vs_<field>.png`` (APTMoE over Mobius across each swept field).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime
import functools
import itertools
import math
import multiprocessing
import os
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

from aptmoe.sim.cli import PROG, UsageError, add_sim_flags, check_measured_steps, with_host_factor

from aptmoe.config import Pipeline
from aptmoe.flags import make_parser
from aptmoe.report import (
    StagedDir,
    first_line,
    fmt,
    format_table,
    progress_bar,
    progress_disabled,
    timestamp,
    write_csv,
)

# Fields a grid may name directly; any other flag's destination works too.
COMMON_FIELDS = ("gini", "num_experts", "model_config", "topo", "link_bandwidth", "batch_size", "num_chunks",
                 "cores_per_socket", "gpus", "nodes", "pipeline", "num_layers", "seq_length")
# Flags of the front end itself, not of the config.
NOT_SWEEPABLE = {"help", "calibration", "measured_steps", "no_plot", "no_trace", "quiet", "out", "grid", "jobs", "preset"}

# Paper Fig. 11: each model with its G values, the four schedules, 4 GPUs, C1+G2.
FIG11_GINI = {8: (0.2, 0.4, 0.6, 0.8), 16: (0.1, 0.2, 0.3, 0.4), 64: (0.05, 0.1, 0.15, 0.2)}
FIG11_MODELS = ("MoE-S-8", "MoE-S-16", "MoE-S-64", "MoE-M-8", "MoE-M-16", "MoE-L-8")
PRESETS = ("fig11",)
AXIS_LABELS = {"gini": "G (sum of squared expert shares)", "link_bandwidth": "host-link cap (GB/s per GPU)",
               "cores_per_socket": "CPU cores per socket", "num_experts": "experts per layer",
               "batch_size": "global batch (sequences)", "num_chunks": "micro-batches", "gpus": "GPUs per node",
               "host_factor": "host cost per block call (x the calibration's)"}

# Metrics copied into each row after the grid values.
ROW_METRICS = ("throughput/tok_per_s", "busy/compute", "busy/h2d", "busy/cpu", "busy/d2h",
               "cpu/expert_share", "link/h2d_bytes", "link/d2h_bytes", "popularity/G")
RESULT_KEYS = ("model", "num_stages", "iteration_s", "throughput_seq_per_s", "oom", "peak_gpu_bytes",
               "speedup_vs_mobius", *ROW_METRICS, "oom_detail", "error")


def make_sweep_parser() -> argparse.ArgumentParser:
    p = make_parser(f"{PROG} sweep", "Simulate the cartesian product of --grid values over a base command line, "
                                      "in parallel; write sweep.csv and plots.")
    p.add_argument("--grid", action="append", default=[], metavar="FIELD=V1,V2,...",
                   help=f"a swept field and its values (repeatable); fields include {', '.join(COMMON_FIELDS)} "
                        "(or any flag's name); pipeline=all means the four schedules")
    p.add_argument("--preset", choices=PRESETS, default=None,
                   help="fig11: the paper's Fig. 11 grid (six models with their G values x four schedules, "
                        "4 GPUs, C1+G2, is_moe, 1 measured step)")
    p.add_argument("--jobs", type=int, default=None, help="parallel processes (default: CPU count)")
    add_sim_flags(p)
    p.add_argument("--out", default=None, help="output folder (default: runs/sweep-<timestamp>)")
    return p


# --------------------------------------------------------------------------- the grid


def _actions_by_dest(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions if a.dest not in NOT_SWEEPABLE and a.dest != argparse.SUPPRESS}


def parse_grid(specs: Sequence[str], parser: argparse.ArgumentParser) -> dict[str, list]:
    """``["gini=0.1,0.2", "pipeline=all"]`` -> ``{"gini": [0.1, 0.2], "pipeline": [4 names]}``."""
    actions = _actions_by_dest(parser)
    grid: dict[str, list] = {}
    for spec in specs:
        name, sep, values = spec.partition("=")
        field = name.strip().lstrip("-").replace("-", "_")
        if not sep or not field or not values.strip():
            raise UsageError(f"--grid {spec!r} is not FIELD=V1,V2,...; e.g. --grid gini=0.1,0.2")
        if field not in actions:
            raise UsageError(f"--grid field {field!r} is unknown; use one of {', '.join(COMMON_FIELDS)} "
                             "or another flag's name")
        if field in grid:
            raise UsageError(f"--grid {field} is given twice; list all its values in one --grid")
        act = actions[field]
        raw = [v.strip() for v in values.split(",") if v.strip()]
        if field == "pipeline" and any(v.lower() == "all" for v in raw):
            raw = [p.value for p in Pipeline]
        conv = act.type if callable(act.type) else (lambda v: v)
        try:
            vals = [conv(v) for v in raw]
        except (ValueError, TypeError, argparse.ArgumentTypeError) as e:
            raise UsageError(f"--grid {field}: bad value in {values!r}: {e}") from None
        grid[field] = list(dict.fromkeys(vals))
    return grid


def preset_points(name: str, ns: argparse.Namespace) -> list[dict]:
    """The preset's points; also sets the preset's base flags where none was given."""
    assert name == "fig11"
    if ns.is_moe is None:
        ns.is_moe = True
    if ns.gpus is None:
        ns.gpus = 4
    if ns.topo is None:
        ns.topo = "C1+G2"
    if ns.measured_steps is None:
        ns.measured_steps = 1
    points = []
    for model in FIG11_MODELS:
        for g in FIG11_GINI[int(model.rsplit("-", 1)[1])]:
            for p in Pipeline:
                points.append({"model_config": model, "gini": g, "pipeline": p.value})
    return points


def expand(grid: dict[str, list], base_points: list[dict] | None = None) -> list[dict]:
    """Cartesian product of the grid, crossed with `base_points` (a preset's list) if any."""
    base_points = base_points or [{}]
    if base_points[0]:
        clash = set(grid) & set(base_points[0])
        if clash:
            raise UsageError(f"--grid {', '.join(sorted(clash))} is already set by the preset")
    keys = list(grid)
    return [{**bp, **dict(zip(keys, combo))} for bp in base_points for combo in itertools.product(*grid.values())]


# --------------------------------------------------------------------------- one point (in a worker)


@functools.lru_cache(maxsize=4)
def _profile(calibration: str):
    from aptmoe.profile import load_profile

    return load_profile(calibration)


def run_point(task: tuple) -> dict:
    """Simulate one point; any failure becomes the row's ``error``. Runs in a worker process."""
    from aptmoe.sim.simulate import simulate

    from aptmoe.flags import config_from_args

    index, point, base, calibration, measured_steps, hw = task
    ns = argparse.Namespace(**base)
    for k, v in point.items():
        if k != "pipeline":
            setattr(ns, k, v)
    row: dict[str, Any] = {"index": index, **point}
    try:
        # the point's schedule among the swept ones (base["pipeline"]), as `aptmoe-sim --pipeline
        # all` runs each: GPipe then takes one stage per GPU whatever --num_stages says
        cfg = config_from_args(ns, pipeline=point.get("pipeline"), **hw)
        row["model"] = cfg.model.name
        if "pipeline" not in point:
            row["pipeline"] = cfg.schedule.pipeline.value
        res = simulate(cfg, with_host_factor(_profile(calibration), ns.host_factor), measured_steps=measured_steps)
    except ValueError as e:                 # ConfigError, PlanError: an impossible point
        row["error"] = first_line(e)
        return row
    except Exception as e:                  # a simulator failure must not end a long sweep
        row["error"] = f"{type(e).__name__}: {first_line(e)}"
        return row
    row.update(num_stages=res.num_stages, iteration_s=res.iteration_s,
               throughput_seq_per_s=res.throughput_seq_per_s, oom=res.oom, peak_gpu_bytes=res.peak_gpu_bytes,
               oom_detail=res.oom_detail, fallbacks=list(res.fallbacks))
    for k in ROW_METRICS:
        if k in res.metrics:
            row[k] = res.metrics[k]
    return row


def run_points(points: list[dict], base: dict, calibration: str, measured_steps: int | None, hw: dict,
               jobs: int, quiet: bool) -> list[dict]:
    tasks = [(i, p, base, calibration, measured_steps, hw) for i, p in enumerate(points)]
    rows: list[dict] = []
    bar = progress_bar(total=len(tasks), desc="sweep", unit="point", disable=progress_disabled(quiet))
    with bar:
        if jobs <= 1 or len(tasks) <= 1:
            for t in tasks:
                rows.append(run_point(t))
                bar.update()
        else:
            # forkserver, not fork: a parent with threads (torch's, a test runner's) can deadlock
            # a forked child, and Python 3.12 warns about it.
            with cf.ProcessPoolExecutor(max_workers=min(jobs, len(tasks)),
                                        mp_context=multiprocessing.get_context("forkserver")) as pool:
                futures = [pool.submit(run_point, t) for t in tasks]
                for fut in cf.as_completed(futures):
                    rows.append(fut.result())
                    bar.update()
    rows.sort(key=lambda r: r["index"])
    return rows


# --------------------------------------------------------------------------- analysis


def swept_fields(points: list[dict]) -> list[str]:
    """Fields that take more than one value, in the order first seen."""
    fields: list[str] = []
    for p in points:
        for k in p:
            if k not in fields:
                fields.append(k)
    return [f for f in fields if len({repr(p.get(f)) for p in points}) > 1]


def add_speedups(rows: list[dict], fields: list[str]) -> None:
    """``speedup_vs_mobius``: a row's throughput over Mobius's at the same other values."""
    others = [f for f in fields if f != "pipeline"]
    ref = {}
    for r in rows:
        if r.get("pipeline") == Pipeline.MOBIUS.value and r.get("throughput_seq_per_s"):
            ref[tuple(repr(r.get(f)) for f in others)] = r["throughput_seq_per_s"]
    for r in rows:
        m = ref.get(tuple(repr(r.get(f)) for f in others))
        t = r.get("throughput_seq_per_s")
        r["speedup_vs_mobius"] = t / m if (m and t) else None


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _label(combo: tuple, names: list[str]) -> str:
    return ", ".join(f"{n}={v}" for n, v in zip(names, combo))


def _x_positions(values: list) -> tuple[dict, list | None]:
    """Numeric values stay numeric; anything else is placed at 0, 1, 2, ... in order."""
    if all(_is_number(v) for v in values):
        return {v: v for v in values}, None
    return {v: i for i, v in enumerate(values)}, [str(v) for v in values]


def _ticks(ax, values: list, labels: list | None) -> None:
    """Categorical values get their names; up to 8 numeric values get a tick each."""
    if labels:
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=30 if len(labels) > 4 else 0, fontsize=8)
    elif len(values) <= 8:
        ax.set_xticks(values)
        ax.set_xticklabels([f"{v:g}" for v in values], fontsize=8)


def plot_throughput(rows: list[dict], fields: list[str], path: Path, x: str) -> None:
    """Throughput against `x`, a line per schedule (and per other swept value), a panel per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from aptmoe.plot import PIPELINE_COLORS, save_png

    panel_field = "model_config" if ("model_config" in fields and x != "model_config") else None
    panels = list(dict.fromkeys(r.get(panel_field) for r in rows)) if panel_field else [None]
    rest = [f for f in fields if f not in (x, "pipeline", panel_field)]
    pipes = [p.value for p in Pipeline if any(r.get("pipeline") == p.value for r in rows)]
    pipes += sorted({str(r.get("pipeline")) for r in rows} - set(pipes) - {"None"})
    spare = iter(["#54a24b", "#f58518", "#b5aca6"])
    colors = {p: PIPELINE_COLORS.get(p) or next(spare, None) for p in pipes}
    styles = ["-", "--", ":", "-."]
    ncol = min(len(panels), 3)
    nrow = math.ceil(len(panels) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.6 * ncol, 3.4 * nrow), dpi=110, squeeze=False)
    for k, (ax, panel) in enumerate(zip(axes.flat, panels)):
        prow = [r for r in rows if panel_field is None or r.get(panel_field) == panel]
        xs_all = list(dict.fromkeys(r.get(x) for r in prow))
        if all(_is_number(v) for v in xs_all):
            xs_all.sort()
        pos, ticks = _x_positions(xs_all)
        combos = list(dict.fromkeys(tuple(r.get(f) for f in rest) for r in prow))
        for p in pipes:
            for ci, combo in enumerate(combos):
                pts = [r for r in prow if r.get("pipeline") == p and tuple(r.get(f) for f in rest) == combo]
                if not pts:
                    continue
                pts.sort(key=lambda r: pos[r.get(x)])
                xs = [pos[r.get(x)] for r in pts]
                ys = [r.get("throughput_seq_per_s") or math.nan for r in pts]
                label = p + (f" ({_label(combo, rest)})" if rest else "")
                ax.plot(xs, ys, styles[ci % len(styles)], marker="o", ms=3.5, color=colors.get(p), label=label)
                bad = [xv for xv, r in zip(xs, pts) if not r.get("throughput_seq_per_s")]
                if bad:
                    ax.plot(bad, [0] * len(bad), "x", color=colors.get(p), ms=6)
        if not any(r.get("throughput_seq_per_s") for r in prow):
            ax.text(0.5, 0.5, "no point fits or is feasible", ha="center", va="center", transform=ax.transAxes,
                    fontsize=9, color="#555555")
            ax.set_yticks([])
        _ticks(ax, xs_all, ticks)
        ax.set_xlabel(AXIS_LABELS.get(x, x))
        ax.set_ylabel("throughput (seq/s)")
        ax.set_ylim(bottom=0)
        ax.grid(linewidth=0.3, alpha=0.6)
        if panel is not None:
            ax.set_title(str(panel), fontsize=10)
        if k == 0:
            ax.legend(fontsize=7, frameon=False)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.suptitle("simulated throughput; x at 0 = out of memory or infeasible", fontsize=9)
    fig.tight_layout()
    save_png(fig, path)
    plt.close(fig)


def plot_speedup(rows: list[dict], fields: list[str], path: Path, x: str) -> bool:
    """APTMoE over Mobius against `x`: a line per combination of the other swept fields, or,
    with more than 8 combinations, their geometric mean with the min-max range shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from aptmoe.plot import save_png

    apt = [r for r in rows if r.get("pipeline") == Pipeline.APTMOE.value and r.get("speedup_vs_mobius")]
    if not apt:
        return False
    xs_all = list(dict.fromkeys(r.get(x) for r in rows if r.get("pipeline") == Pipeline.APTMOE.value))
    if all(_is_number(v) for v in xs_all):
        xs_all.sort()
    pos, ticks = _x_positions(xs_all)
    rest = [f for f in fields if f not in (x, "pipeline")]
    combos = list(dict.fromkeys(tuple(r.get(f) for f in rest) for r in apt))
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if len(combos) <= 8:
        for combo in combos:
            pts = sorted((r for r in apt if tuple(r.get(f) for f in rest) == combo), key=lambda r: pos[r.get(x)])
            ax.plot([pos[r.get(x)] for r in pts], [r["speedup_vs_mobius"] for r in pts], marker="o", ms=4,
                    label=_label(combo, rest) if rest else "APTMoE / Mobius")
        ax.legend(fontsize=7, frameon=False)
    else:
        by_x = defaultdict(list)
        for r in apt:
            by_x[pos[r.get(x)]].append(r["speedup_vs_mobius"])
        xv = sorted(by_x)
        gm = [math.exp(sum(map(math.log, by_x[v])) / len(by_x[v])) for v in xv]
        ax.fill_between(xv, [min(by_x[v]) for v in xv], [max(by_x[v]) for v in xv], alpha=0.25, color="#e0503f",
                        label=f"min-max over {', '.join(rest)}")
        ax.plot(xv, gm, marker="o", ms=4, color="#e0503f", label="geometric mean")
        ax.legend(fontsize=7, frameon=False)
    ax.axhline(1.0, color="#444444", linewidth=0.8, linestyle="--")
    _ticks(ax, xs_all, ticks)
    ax.set_xlabel(AXIS_LABELS.get(x, x))
    ax.set_ylabel("APTMoE speedup over Mobius")
    ax.grid(linewidth=0.3, alpha=0.6)
    fig.tight_layout()
    save_png(fig, path)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------- the subcommand


def run_sweep(ns: argparse.Namespace, argv: list[str]) -> int:
    from aptmoe.profile import load_profile
    from aptmoe.trace import write_json_atomic

    parser = make_sweep_parser()
    check_measured_steps(ns)
    if ns.jobs is not None and ns.jobs < 1:
        raise UsageError(f"--jobs must be at least 1, got {ns.jobs}")
    grid = parse_grid(ns.grid, parser)
    base_points = preset_points(ns.preset, ns) if ns.preset else None
    if not grid and not base_points:
        raise UsageError("nothing to sweep: give --grid FIELD=V1,V2,... or --preset fig11")
    if ns.pipeline is not None and ns.pipeline.strip().lower() == "all" and "pipeline" not in grid:
        grid["pipeline"] = [p.value for p in Pipeline]
    points = expand(grid, base_points)
    if "pipeline" in grid:
        ns.pipeline = ",".join(grid["pipeline"])     # the schedules compared, as --pipeline lists them
    profile = load_profile(ns.calibration)
    for factor in grid.get("host_factor", [ns.host_factor]):
        with_host_factor(profile, factor)           # a profile without dispatch costs: one line, now
    hw = profile.cluster_defaults()
    base = {k: v for k, v in vars(ns).items() if k not in NOT_SWEEPABLE}
    out = Path(ns.out or f"runs/sweep-{timestamp()}")
    staged = StagedDir(out)             # a folder it cannot write is refused before the sweep
    jobs = ns.jobs or os.cpu_count() or 1
    say = (lambda *a: None) if ns.quiet else print
    say(f"sweep: {len(points)} points over {', '.join(swept_fields(points)) or 'one point'}, "
        f"{min(jobs, len(points))} processes, calibration {profile.name}")
    with staged as tmp:
        rows = run_points(points, base, ns.calibration, ns.measured_steps, hw, jobs, ns.quiet)
        fields = swept_fields(points) or list(points[0])
        add_speedups(rows, fields)
        fallbacks = sorted({f for r in rows for f in r.pop("fallbacks", [])})
        grid_cols = list(dict.fromkeys(k for p in points for k in p))
        write_csv(tmp / "sweep.csv", rows, first=["index", *grid_cols, *RESULT_KEYS])
        write_json_atomic(tmp / "sweep.json", {
            "grid": {k: list(dict.fromkeys(p.get(k) for p in points)) for k in grid_cols},
            "preset": ns.preset, "calibration": profile.name, "calibration_arg": str(ns.calibration),
            "base": base, "command": [PROG, *argv], "fallbacks": fallbacks,
            "created": datetime.datetime.now().isoformat(timespec="seconds"), "rows": rows})
        plots = []
        if not ns.no_plot:
            xs = [f for f in fields if f != "pipeline"]
            x = "gini" if "gini" in xs else (xs[0] if xs else None)
            if x is not None:
                name = f"throughput_vs_{x}.png"
                plot_throughput(rows, fields, tmp / name, x)
                plots.append(name)
            for f in xs:
                name = f"speedup_vs_{f}.png"
                if plot_speedup(rows, fields, tmp / name, f):
                    plots.append(name)
    if not ns.quiet:
        cols = [*grid_cols]
        table = [[fmt(r.get(c)) for c in cols]
                 + [fmt(r.get("iteration_s"), ".3f"), fmt(r.get("throughput_seq_per_s"), ".2f"),
                    fmt((r.get("peak_gpu_bytes") or 0) / 1e9 if "peak_gpu_bytes" in r else None, ".1f"),
                    fmt(r.get("speedup_vs_mobius"), ".2f"),
                    "error" if r.get("error") else ("OOM" if r.get("oom") else "")] for r in rows]
        print(format_table([*cols, "s/step", "seq/s", "peak GB", "vs Mobius", ""], table,
                           right=[False] * len(cols) + [True] * 4 + [False]))
        errors = [r for r in rows if r.get("error")]
        for r in errors[:5]:
            print(f"  point {r['index']}: {r['error']}")
        if len(errors) > 5:
            print(f"  ... {len(errors) - 5} more errors in sweep.csv")
        print(f"wrote {out}/ (sweep.csv, sweep.json{''.join(', ' + p for p in plots)})")
    return 0
