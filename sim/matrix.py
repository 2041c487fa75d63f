"""``aptmoe-sim matrix``: the simulator against the executor over a matrix of configs (issue 6).

    aptmoe-sim matrix --calibration h200-1gpu --out docs/validation-h200 \\
        --models S:8:4,M:4:4,L:2:2:4 --gini 0.3,0.6 --links native,8 --gpus 1

Each cell is one config (model size x G x link x GPUs); the executor trains it with the
four schedules (`aptmoe-sim validate`'s comparison, one subprocess per cell) and the
simulator predicts what it ran. Cells are written whole or not at all, under
``OUT/cells/<cell>/``, so a matrix can be run in parts (``--max-seconds``, ``--only``) and a
later call goes on where the last one stopped. ``--repredict`` runs no executor: it predicts
the stored runs again with the current simulator and profile, which is how a change of the
model is judged against measurements already taken.

Each cell keeps the profile it was predicted with (``OUT/cells/<cell>/profile.json.xz``). The
host-bound figures of a profile (the dispatch probe's cost per block, CPU Adam) came out up to
1.8x apart on different device calls, so a matrix run over several calls can calibrate those
parts at the start of each; ``--repredict --cell-profiles`` then predicts each cell with the
profile of its own call, and plain ``--repredict`` with the one profile of ``--calibration``
(what a user with one calibration file sees).

A cell is known by its name (size, layers, experts, G, link, GPUs): a later call with other
per-run flags (--steps, --batch_size, --extra) reuses the stored cells, so give those
another --out.

Held-back cells (issue 6, §3): of each block of k consecutive cells (``--held-back-every k``),
the one on the diagonal (block b holds back its cell b mod k) is kept out of the fit set. The
diagonal spreads the held-back cells over models, G and links rather than one corner of the
grid. Model fixes are judged on the fit set; the held-back set reports the final figure.

A cell is stored as the repository keeps it (aptmoe.stored): its measured traces and its two
profiles (``profile.json``, ``real/plan-profile.json``) xz-compressed (``real/trace-*.json.xz``:
``Trace.load`` reads them as they are; for Perfetto, ``xz -dk`` one first), and the folder a
``.gitignore`` of what ``--repredict`` writes again (predicted traces, per-action CSVs,
overlays): a cell's raw traces are 2-4 MB each, so a 48-run matrix kept raw is 40 MB, a tenth
of that gzip-compressed and 70% of that again with xz. Cells stored before, with gzip traces
and plain profiles, read the same (``scripts/pack-stored-runs`` packs them).

Writes OUT/matrix.json, OUT/matrix.csv, OUT/matrix.png (predicted against measured, a point
per run) and OUT/matrix.md (one row per run, then the summary:
median and worst absolute step-time error and the configs whose schedule ranking is right,
for the fit set, the held-back set and all; and the measurements' own noise, `noise`).
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import shlex
import shutil
import statistics
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from aptmoe.config import ConfigError
from aptmoe.flags import (add_cluster_flags, add_kernel_loading_flag, add_seed_flags, config_from_args,
                          make_parser, pipelines_of)
from aptmoe.profile import load_profile
from aptmoe.report import StagedDir, fmt, format_table, progress_bar, progress_disabled
from aptmoe.sim import matrix_ratios
from aptmoe.sim.cell_time import expected_s, stored_cell_times
from aptmoe.sim.cli import PROG, UsageError
from aptmoe.run_process import ExecutorFailed
from aptmoe.stored import (CORRUPT, MATRIX, PLAN_PROFILE, PROFILE, RESULTS, VALIDATION, drop_packed,
                           measured_traces, pack, read_json, stored_file)
from aptmoe.sim.validate import (KERNEL_LOADING_WHY, add_replay_flag, alike_cell, compare_run, ms_cell, other_machine,
                                 run_executor)
from aptmoe.trace import write_json_atomic

MODEL_SIZES = ("S", "M", "L")        # Table I's widths, the sizes a cell's model can have

SETS = ("fit", "held-back", "all")
# What --repredict writes again from the stored runs: the matrix folder's .gitignore keeps it out
# of git (a matrix's predicted traces alone are tens of MB).
DERIVED = ("cells/*/actions-*.csv", "cells/*/overlay-*.png", "cells/*/trace-*-predicted.json")
CELL_PROFILE = PROFILE              # beside each cell: the profile it was predicted with when it ran
# Two schedules whose measured step times are closer than this are a tie for the ranking:
# the order of a tie is run-to-run noise, not something a model can be right or wrong about.
TIE = 0.03


@dataclass(frozen=True)
class Cell:
    model: str              # Table I width: S, M or L
    layers: int
    stages: int             # of the offload schedules (GPipe: one per GPU)
    experts: int
    gini: float
    link_GBps: float | None  # per-GPU host-link cap; None: the link as it is
    gpus: int

    @property
    def name(self) -> str:
        link = "native" if self.link_GBps is None else f"cap{self.link_GBps:g}"
        return f"{self.model}{self.layers}x{self.experts}-G{self.gini:g}-{link}-{self.gpus}gpu"

    def argv(self, common: list[str]) -> list[str]:
        a = ["--is_moe=True", f"--model_config={self.model}", "--num_layers", str(self.layers),
             "--num_stages", str(self.stages), "--num_experts", str(self.experts), "--gini", f"{self.gini:g}",
             "--gpus", str(self.gpus), "--topo", f"C1+G{self.gpus}", "--pipeline", "all", *common]
        if self.link_GBps is not None:
            a += ["--link-bandwidth", f"{self.link_GBps:g}"]
        return a


def parse_models(text: str, experts: int) -> list[tuple[str, int, int, int]]:
    """SIZE:LAYERS:STAGES[:EXPERTS] items; EXPERTS defaults to --experts."""
    out = []
    for item in text.split(","):
        parts = item.strip().split(":")
        if len(parts) not in (3, 4) or parts[0] not in MODEL_SIZES or not all(p.isdigit() for p in parts[1:]):
            raise UsageError(f"--models item {item!r} is not SIZE:LAYERS:STAGES[:EXPERTS] such as S:8:4 "
                             "(SIZE of S, M, L)")
        size, layers, stages = parts[0], int(parts[1]), int(parts[2])
        if layers < 1 or (len(parts) == 4 and int(parts[3]) < 1):
            raise UsageError(f"--models {item}: layers and experts are positive counts")
        if stages < 1 or layers % stages:
            raise UsageError(f"--models {item}: {layers} layers do not split into {stages} stages")
        out.append((size, layers, stages, int(parts[3]) if len(parts) == 4 else experts))
    return out


def _floats(text: str, flag: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise UsageError(f"{flag} takes comma-separated numbers, not {text!r}") from None


def parse_links(text: str) -> list[float | None]:
    out = []
    for x in text.split(","):
        x = x.strip()
        if x == "native":
            out.append(None)
            continue
        v = _floats(x, "--links")[0]
        if v <= 0:
            raise UsageError(f"--links {x}: a cap is a positive GB/s figure (or 'native')")
        out.append(v)
    return out


def _unique(values: list, flag: str) -> list:
    if len(set(values)) != len(values):
        raise UsageError(f"{flag} names a value twice: each cell must be run once")
    return values


def cells_of(ns: argparse.Namespace) -> list[Cell]:
    gpus = _floats(ns.gpus, "--gpus")
    if any(g < 1 or g != int(g) for g in gpus):
        raise UsageError(f"--gpus takes whole GPU counts of 1 or more, not {ns.gpus!r}")
    if ns.experts < 1:
        raise UsageError("--experts is a positive count")
    models = _unique(parse_models(ns.models, ns.experts), "--models")
    return [Cell(m, layers, stages, experts, g, link, n)
            for n, (m, layers, stages, experts), g, link in itertools.product(
                _unique([int(g) for g in gpus], "--gpus"), models, _unique(_floats(ns.gini, "--gini"), "--gini"),
                _unique(parse_links(ns.links), "--links"))]


def held_back(index: int, every: int) -> bool:
    """The diagonal of each block of `every` cells (see the module docstring); every cell
    where `every` is 1 (a matrix of configs no fix has seen: all of it the held-back figure)."""
    return every > 0 and index % every == (index // every) % every


def make_matrix_parser() -> argparse.ArgumentParser:
    p = make_parser(f"{PROG} matrix", "Run the executor over a matrix of configs, predict each run with the "
                                      "simulator, and report the step-time error and the schedule ranking.")
    p.add_argument("--calibration", required=True, help="profile of THIS machine (built-in name or .json)")
    p.add_argument("--out", required=True, help="matrix folder; cells already in it are kept and skipped")
    g = p.add_argument_group("the matrix")
    g.add_argument("--models", default="S:8:4,M:4:4,L:2:2:4", help="SIZE:LAYERS:STAGES[:EXPERTS] items (S:8:4,M:4:4,L:2:2:4)")
    g.add_argument("--experts", type=int, default=8, help="experts per layer (8)")
    g.add_argument("--gini", default="0.3,0.6", help="G values (0.3,0.6)")
    g.add_argument("--links", default="native,8", help="per-GPU link caps in GB/s, or native (native,8)")
    g.add_argument("--gpus", default="1", help="GPU counts, each run as C1+G<n> (1)")
    g.add_argument("--held-back-every", type=int, default=4, help="hold back one cell in k (4; 1: all, 0: none)")
    g.add_argument("--only", choices=SETS, default="all", help="run only this set's cells (all)")
    g.add_argument("--max-seconds", type=float, default=None,
                   help="start no new cell after this many seconds (the rest: a later call)")
    g.add_argument("--budget-s", type=float, default=None,
                   help="start a cell only where it would end within this many seconds of the matrix's start, "
                        "by the longest stored cell like it (the same run but for G and the profile, in this "
                        "matrix or --expect-from), 10%% over; a cell with none like it starts (sim/cell_time.py)")
    g.add_argument("--expect-from", nargs="+", type=Path, default=[], metavar="DIR",
                   help="with --budget-s: matrix folders whose stored cells say how long a cell takes")
    g.add_argument("--repredict", action="store_true",
                   help="run nothing: predict the stored runs again and rewrite the report")
    add_replay_flag(g)
    g.add_argument("--cell-profiles", action="store_true",
                   help="with --repredict: predict each cell with the profile stored beside it (its "
                        "profile.json, written when it ran); cells without one use --calibration")
    r = p.add_argument_group("each run")
    r.add_argument("--batch_size", type=int, default=32, help="global batch in sequences (32)")
    r.add_argument("--num_chunks", type=int, default=4, help="micro-batches (4)")
    r.add_argument("--seq_length", type=int, default=128, help="tokens per sequence (128)")
    r.add_argument("--warmup", type=int, default=1, help="untimed steps (1)")
    r.add_argument("--steps", type=steps_by_size, default="2",
                   help="timed steps: N for every run, or per model size, e.g. 3,S=6 (S runs 6, the others 3; "
                        "S's steps are short and its runs the noisiest) (2)")
    r.add_argument("--repeats", type=repeats_by_size, default="1",
                   help="runs of each schedule, the median kept (aptmoe-run --repeats): N, or per model size, "
                        "e.g. 1,S=3 (S8's runs differed up to 2x from one process to the next) (1)")
    r.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto", help="passed to aptmoe-run")
    r.add_argument("--timeout", type=float, default=300.0, help="passed to aptmoe-run (300)")
    add_kernel_loading_flag(r, "eager", KERNEL_LOADING_WHY)
    r.add_argument("--extra", default="", help="more aptmoe-run flags for every run, one quoted string")
    p.add_argument("--no-plot", action="store_true",
                   help="draw no timelines (the executor's and the overlays; --repredict draws them later)")
    p.add_argument("-q", "--quiet", action="store_true")
    return p


def counts_by_size(flag: str, default: int, unit: str):
    """An argparse `type` for `flag`: "3" (every run), or "3,S=6" / "S=6,M=3,L=3" (by model
    size; a size not named takes the bare number, `default` without one) -> {None: default,
    size: count}."""
    def parse(text: str) -> dict[str | None, int]:
        out: dict[str | None, int] = {None: default}
        for item in (t.strip() for t in str(text).split(",")):
            size, _, n = item.rpartition("=")
            size = size.strip().upper() or None
            if size is not None and size not in MODEL_SIZES:
                raise argparse.ArgumentTypeError(f"{flag}: {size!r} is no model size; use {', '.join(MODEL_SIZES)}")
            try:
                out[size] = int(n)
            except ValueError:
                raise argparse.ArgumentTypeError(f"{flag}: {item!r} is not N or SIZE=N") from None
            if out[size] < 1:
                raise argparse.ArgumentTypeError(f"{flag}: {item!r} must be at least 1 {unit}")
        return out
    return parse


steps_by_size = counts_by_size("--steps", 2, "step")
repeats_by_size = counts_by_size("--repeats", 1, "run")


def common_argv(ns: argparse.Namespace, model: str) -> list[str]:
    """The flags every run of `model`'s size shares."""
    steps = ns.steps.get(model, ns.steps[None])
    runs = ns.repeats.get(model, ns.repeats[None])
    return [*(["--repeats", str(runs)] if runs > 1 else []), "--batch_size", str(ns.batch_size),
            "--num_chunks", str(ns.num_chunks), "--seq_length",
            str(ns.seq_length), "--num_warmup_steps", str(ns.warmup), "--num_training_steps", str(steps),
            "--device", ns.device, "--timeout", f"{ns.timeout:g}", "--kernel-loading", ns.kernel_loading,
            *(["--no-plot"] if ns.no_plot else []),
            *shlex.split(ns.extra)]


def check_cells(cells: list[Cell], ns: argparse.Namespace, profile) -> None:
    """Every cell's config built as its aptmoe-run will build it (the shared flags; the
    executor's own are skipped), before anything runs: an impossible cell (a G outside what its
    experts allow, a flag in --extra that no run takes) is one line now, not a failed executor
    after the cells before it have run."""
    parser = make_parser(f"{PROG} matrix", "a cell's run flags")
    add_seed_flags(parser)
    add_cluster_flags(parser)
    hw = profile.cluster_defaults()
    for cell in cells:
        run, _ = parser.parse_known_args(cell.argv(common_argv(ns, cell.model)))
        for pipeline in pipelines_of(run):
            try:
                config_from_args(run, pipeline=pipeline, **hw)
            except ConfigError as e:
                raise UsageError(f"cell {cell.name} ({pipeline}): {e}") from None


def run_matrix(ns: argparse.Namespace, argv: list[str]) -> int:
    profile = load_profile(ns.calibration)
    if ns.held_back_every < 0:
        raise UsageError("--held-back-every is a count of cells (0: hold none back)")
    if ns.cell_profiles and not ns.repredict:
        raise UsageError("--cell-profiles goes with --repredict (a new run is predicted with --calibration)")
    cells = cells_of(ns)
    if not ns.repredict:
        check_cells(cells, ns, profile)
    if not ns.repredict and (warning := other_machine(profile, f"{PROG} matrix")) is not None:
        print(warning, file=sys.stderr)
    out = Path(ns.out)
    (out / "cells").mkdir(parents=True, exist_ok=True)
    write_gitignore(out)
    say = (lambda *a: None) if ns.quiet else print
    todo = [(i, c) for i, c in enumerate(cells)
            if ns.only == "all" or (ns.only == "held-back") == held_back(i, ns.held_back_every)]
    t0 = time.monotonic()
    bar = progress_bar(total=len(todo), desc="matrix", unit="cell", disable=progress_disabled(ns.quiet))
    skipped, failed, own, stored = 0, [], 0, 0
    over_budget: list[str] = []
    times = stored_cell_times([out, *ns.expect_from]) if ns.budget_s is not None else {}
    for i, cell in todo:
        folder = out / "cells" / cell.name
        bar.update(1)
        if ns.repredict:
            if stored_file(folder / "real" / RESULTS) is not None:
                stored += 1
                use = profile
                if ns.cell_profiles and (kept := stored_file(folder / CELL_PROFILE)) is not None:
                    use, own = load_profile(kept), own + 1
                compare_run(folder / "real", use, folder, _cell_doc(folder)["command"], plot=not ns.no_plot,
                            replay=ns.replay_placements)
            continue
        if stored_file(folder / VALIDATION) is not None:     # done (a stored cell keeps it packed)
            continue
        if folder.exists():
            # Cells are written whole, so this is what is left of one: its derived files after a
            # copy of the tree that dropped the rest (the device's, for files git does not ignore)
            # or a cell folder of an older layout. It is run again.
            say(f"{cell.name}: an incomplete cell folder (no validation.json), run again")
            shutil.rmtree(folder)
        if ns.max_seconds is not None and time.monotonic() - t0 > ns.max_seconds:
            skipped += 1
            continue
        cmd = cell.argv(common_argv(ns, cell.model))
        if ns.budget_s is not None and (expect := expected_s(cmd, times)) is not None \
                and time.monotonic() - t0 + expect > ns.budget_s:
            over_budget.append(f"{cell.name} ({expect:.0f} s)")
            continue
        started = time.monotonic()
        command = [PROG, "validate", "--calibration", ns.calibration,
                   *(["--replay-placements"] if ns.replay_placements else []), *cmd]
        try:
            with StagedDir(folder) as tmp:
                profile.save(tmp / CELL_PROFILE)
                run_executor(cmd, tmp / "real", tmp / CELL_PROFILE, kernel_loading=ns.kernel_loading)
                compare_run(tmp / "real", profile, tmp, command, plot=not ns.no_plot, replay=ns.replay_placements)
                pack_cell(tmp)
                write_json_atomic(tmp / "cell.json", {
                    "cell": asdict(cell), "name": cell.name, "index": i, "held_back": held_back(i, ns.held_back_every),
                    "command": command, "wall_s": time.monotonic() - started})
        except ExecutorFailed as e:          # no folder is left: a later call runs the cell again
            failed.append(cell.name)
            print(f"{PROG}: {cell.name}: {e}", file=sys.stderr)
            continue
        if not ns.quiet:
            bar.write(f"{cell.name}: {time.monotonic() - started:.0f} s")
    bar.close()
    calibration = profile.name
    if ns.cell_profiles:
        rest = f"; the rest {profile.name}" if own < stored else ""
        calibration = f"each cell's own profile.json ({own} of {stored} cells{rest})"
    if ns.replay_placements:
        calibration += ", APTMoE on each run's own CPU placements (--replay-placements)"
    report = collect(out, cells, ns.held_back_every, calibration, [PROG, "matrix", *argv])
    write_report(out, report)
    from aptmoe.plot import plot_predicted_vs_measured

    s = report["summary"]["all"]
    plot_predicted_vs_measured(report["runs"], out / "matrix.png",
                               title=f"{'own profiles' if ns.cell_profiles else profile.name}: {s['runs']} runs, median |error| "
                                     f"{_pct(s['median_abs_error'], '.1f')}, worst {_pct(s['worst_abs_error'], '.1f')}")
    say(matrix_table(report["runs"]))
    say(summary_table(report["summary"]))
    if (line := matrix_ratios.summary_line(report["over_gpipe"])) is not None:
        say(line)
    if skipped:
        say(f"{skipped} cells left for a later call (--max-seconds {ns.max_seconds:g})")
    if over_budget:
        say(f"{len(over_budget)} cells left for a later call, each expected to end past --budget-s "
            f"{ns.budget_s:g}: {', '.join(over_budget)}")
    say(f"wrote {out}/ (matrix.json, matrix.csv, matrix.md, matrix.png, cells/)")
    if failed:
        say(f"{len(failed)} cells failed and were left out: {', '.join(failed)}")
    return 1 if failed else 0


def pack_cell(folder: Path) -> None:
    """Store a cell as the repository keeps it: its measured traces (``real/trace-*.json``), its
    profiles (``profile.json``, ``real/plan-profile.json``) and its run's ``real/results.json``
    each replaced by its ``.xz``. Called once all that reads them in the cell has run; what
    reads them later (``collect``, ``--repredict``) takes the packed files as they are."""
    for path in [*measured_traces(folder / "real"), folder / CELL_PROFILE, folder / "real" / PLAN_PROFILE,
                 folder / "real" / RESULTS]:
        if path.exists():
            pack(path)


def write_gitignore(out: Path) -> None:
    """The matrix folder's .gitignore: what --repredict writes again (``DERIVED``)."""
    path = out / ".gitignore"
    if not path.exists():
        path.write_text("# Rewritten by `aptmoe-sim matrix --repredict` from the stored runs: not kept in git (size).\n"
                        + "".join(f"{p}\n" for p in DERIVED))


def _cell_doc(folder: Path) -> dict:
    return json.loads((folder / "cell.json").read_text())


# --------------------------------------------------------------------------- the report


def ranking(times: dict[str, float]) -> list[str]:
    return sorted(times, key=lambda k: times[k])


def _orders_agree(measured: dict[str, float], predicted: dict[str, float], same_plans: list[list[str]],
                  judged) -> bool:
    """Every pair of schedules that `judged(a, b)` lets the measurement order, but the runs of
    one plan (their order is the machine's noise), is ordered the same way by the prediction;
    schedules not predicted are left out."""
    names = [n for n in measured if n in predicted]
    for a, b in itertools.combinations(names, 2):
        if any(a in g and b in g for g in same_plans) or not judged(a, b):
            continue
        if (measured[a] < measured[b]) != (predicted[a] < predicted[b]):
            return False
    return True


def ranking_right(measured: dict[str, float], predicted: dict[str, float], tie: float = TIE,
                  same_plans: list[list[str]] = ()) -> bool:
    """Every pair of schedules the measurement separates by more than `tie` (relative) is
    ordered the same way by the prediction, but for pairs of one group of `same_plans`: runs
    of one plan did the same work, and which measured faster is the machine's noise."""
    return _orders_agree(measured, predicted, same_plans,
                         lambda a, b: abs(measured[a] - measured[b]) > tie * min(measured[a], measured[b]))


def runs_apart(a: list[float], b: list[float]) -> bool:
    """Every run of one schedule faster than every run of the other: the measurement orders them."""
    return max(a) < min(b) or max(b) < min(a)


def ranking_right_where_runs_apart(measured: dict[str, float], predicted: dict[str, float],
                                   repeats: dict[str, list[float]], same_plans: list[list[str]] = ()) -> bool | None:
    """Every pair of schedules whose repeated runs do not interleave (`runs_apart`) is ordered
    the same way by the prediction, but for one plan's runs; None where a schedule of the
    config ran once. The tie rule's fixed 3% is narrower than these runs' own spread: S8 on two
    GPUs ran GPipe at 0.145, 0.191 and 0.213 s/step in three processes one after another
    (docs/validation-h200-2gpu-v14-fresh), and M6's APTMoE and Mobius at 0.518-0.566 and
    0.514-0.555 (-v11-again); of two schedules whose runs interleave, the runs cannot say which
    is faster, so no prediction of their order is right or wrong."""
    names = [n for n in measured if n in predicted]
    if not names or any(len(repeats.get(n) or ()) < 2 for n in names):
        return None
    return _orders_agree(measured, predicted, same_plans, lambda a, b: runs_apart(repeats[a], repeats[b]))


def same_plans(real: Path, names) -> list[list[str]]:
    """The groups (of two or more) of a run's schedules whose plans are one plan: their
    plan-<name>.txt alike but for the schedule's name that heads it. Mobius on as many stages
    as GPUs is GPipeOffload's plan (each rank one stage, loaded whole, no other stage to
    prefetch): v7-fresh's L2x8 native measured Mobius 0.875 and GPipeOffload 0.694 s in one
    cell, and 0.744-0.787 and 0.720-0.797 s in three runs each on the same lease."""
    by_plan: dict[tuple[str, str], list[str]] = {}
    for name in names:
        try:
            head, _, rest = (real / f"plan-{name}.txt").read_text().partition("\n")
        except OSError:
            continue
        by_plan.setdefault((head.split(":", 1)[-1], rest), []).append(name)
    return [group for group in by_plan.values() if len(group) > 1]


def collect(out: Path, cells: list[Cell], every: int, calibration: str, command: list[str]) -> dict:
    runs, configs = [], []
    fallbacks: Counter[str] = Counter()          # cost figures not measured, by the runs that used each
    for i, cell in enumerate(cells):
        folder = out / "cells" / cell.name
        if stored_file(folder / VALIDATION) is None:
            continue
        doc = read_json(folder / VALIDATION)
        s = "held-back" if held_back(i, every) else "fit"
        stored = _stored_schedules(folder / "real" / RESULTS)
        steps, repeated = _step_spreads(stored), _run_spreads(stored)
        twins = same_plans(folder / "real", [row["pipeline"] for row in doc["schedules"]])
        measured, predicted = {}, {}
        for row in doc["schedules"]:
            fallbacks.update(row.get("fallbacks", []))
            err = row.get("error")
            acts = row.get("actions") or {}
            runs.append({"cell": cell.name, "set": s, "pipeline": row["pipeline"], "model": cell.model,
                         "gini": cell.gini, "link": "native" if cell.link_GBps is None else cell.link_GBps,
                         "gpus": cell.gpus, "measured_s": row.get("measured_s"),
                         "predicted_s": row.get("predicted_s"), "error": err,
                         "host_speed": row.get("host_speed"), "error_host": row.get("error_host"),
                         "memory_speed": row.get("memory_speed"), "stall_s_per_step": row.get("stall_s_per_step"),
                         "load_stall_s_per_step": row.get("load_stall_s_per_step"),
                         "cpu_jobs_alike": row.get("cpu_jobs_alike"),
                         "error_replayed": row.get("error_replayed"),     # on the run's own CPU placements
                         **{f"err/{c}": a["median_error"] for c, a in sorted(acts.items())},
                         **{f"total/{c}": a["predicted_s"] / a["measured_s"] - 1 for c, a in sorted(acts.items())
                            if a.get("measured_s") and a.get("predicted_s") is not None},
                         **{f"beside/{k}": b["median_error"] for k, b in sorted((row.get("beside") or {}).items())},
                         "step_spread": steps.get(row["pipeline"]), "run_spread": repeated.get(row["pipeline"]),
                         "same_plan": next(("=".join(g) for g in twins if row["pipeline"] in g), ""),
                         "note": row.get("note", "")})
            if row.get("measured_s") is not None and row.get("predicted_s") is not None:
                measured[row["pipeline"]] = row["measured_s"]
                predicted[row["pipeline"]] = row["predicted_s"]
        repeats = {n: (stored.get(n, {}).get("repeats") or {}).get("iteration_s") or [] for n in measured}
        configs.append({"cell": cell.name, "set": s, "measured": measured, "predicted": predicted,
                        "order_measured": ranking(measured), "order_predicted": ranking(predicted),
                        "ranking_strict": ranking(measured) == ranking(predicted),
                        "ranking_right": ranking_right(measured, predicted, same_plans=twins),
                        "ranking_apart": ranking_right_where_runs_apart(measured, predicted, repeats, twins),
                        "same_plans": twins})
    return {"calibration": calibration, "command": command, "tie": TIE, "runs": runs, "configs": configs,
            "fallbacks": dict(sorted(fallbacks.items())),
            "summary": {s: summarize([r for r in runs if s == "all" or r["set"] == s],
                                     [c for c in configs if s == "all" or c["set"] == s]) for s in SETS},
            "categories": {s: by_category([r for r in runs if r["set"] == s]) for s in ("fit", "held-back")},
            "beside": {s: by_category([r for r in runs if r["set"] == s], "beside/") for s in ("fit", "held-back")},
            "totals": {s: by_category([r for r in runs if r["set"] == s], "total/") for s in ("fit", "held-back")},
            "noise": noise(runs),
            "over_gpipe": matrix_ratios.over_gpipe(configs, {r["cell"]: r["model"] for r in runs})}


def _stored_schedules(results: Path) -> dict[str, dict]:
    """The schedules of a stored run's results.json, plain or packed (none where it is missing
    or unreadable)."""
    try:
        return read_json(results)["schedules"]
    except (OSError, ValueError, KeyError, *CORRUPT):
        return {}


def step_spreads(results: Path) -> dict[str, float]:
    """Per schedule of a stored run, (max - min) / median of its timed steps: how far one
    run's own steps disagree (nothing where the run or its steps are not stored)."""
    return _step_spreads(_stored_schedules(results))


def _step_spreads(sched: dict[str, dict]) -> dict[str, float]:
    return {name: (max(s["step_s"]) - min(s["step_s"])) / statistics.median(s["step_s"])
            for name, s in sched.items() if len(s.get("step_s") or []) >= 2}


def _run_spreads(sched: dict[str, dict]) -> dict[str, float]:
    """Per schedule run more than once (`aptmoe-run --repeats`), (max - min) / median of its
    runs' step times: how far runs of the same work in fresh processes disagree."""
    out = {}
    for name, s in sched.items():
        times = (s.get("repeats") or {}).get("iteration_s") or []
        if len(times) >= 2:
            out[name] = (max(times) - min(times)) / statistics.median(times)
    return out


def replicate_pairs(runs: list[dict]) -> list[dict]:
    """Runs of the same work, two by two: the GPipe runs of cells that differ only in the
    host-link cap (GPipe keeps every parameter on its GPU and never uses the host link; the
    simulator predicts the two alike), and the schedules of one cell whose plans are one plan
    (`same_plans`, the runs' "same_plan"). Their difference is the machine's run-to-run noise,
    a floor under any step-time error a model can reach on these runs."""
    by_work: dict[tuple, list[dict]] = {}
    for r in runs:
        if not r["measured_s"]:
            continue
        if r["pipeline"] == "GPipe":
            by_work.setdefault(("link", r["cell"].rsplit("-", 2)[0], r["gpus"]), []).append(r)
        if r.get("same_plan"):
            by_work.setdefault(("plan", r["cell"], r["same_plan"]), []).append(r)
    out = []
    for group in by_work.values():
        for a, b in itertools.combinations(group, 2):
            lo, hi = sorted((a["measured_s"], b["measured_s"]))
            out.append({"model": a["model"], "cells": [a["cell"], b["cell"]],
                        "pipelines": [a["pipeline"], b["pipeline"]],
                        "measured_s": [a["measured_s"], b["measured_s"]], "difference": hi / lo - 1})
    return out


def noise(runs: list[dict]) -> dict[str, dict]:
    """Per model size: the spread of a run's own steps and the difference between runs of the
    same work (`replicate_pairs`), medians and worst."""
    pairs = replicate_pairs(runs)
    out = {}
    for m in sorted({r["model"] for r in runs}, key="SML".find):
        spreads = [r["step_spread"] for r in runs if r["model"] == m and r.get("step_spread") is not None]
        diffs = [p["difference"] for p in pairs if p["model"] == m]
        out[m] = {"runs": len(spreads),
                  "step_spread_median": statistics.median(spreads) if spreads else None,
                  "step_spread_worst": max(spreads) if spreads else None,
                  "pairs": len(diffs), "pair_difference_median": statistics.median(diffs) if diffs else None,
                  "pair_difference_worst": max(diffs) if diffs else None}
        repeated = [r["run_spread"] for r in runs if r["model"] == m and r.get("run_spread") is not None]
        if repeated:
            out[m].update(repeated=len(repeated), run_spread_median=statistics.median(repeated),
                          run_spread_worst=max(repeated))
    return out


def by_category(runs: list[dict], prefix: str = "err/") -> dict[str, dict[str, float]]:
    """Per action category (or, with prefix 'beside/', per neighbour label of compute blocks;
    with 'total/', the error of each run's total time per category) and model size: the
    median over runs of each run's figure (which resource's model is short, and where)."""
    cells: dict[str, dict[str, list[float]]] = {}
    for r in runs:
        for k, v in r.items():
            if k.startswith(prefix) and v is not None:
                cells.setdefault(k[len(prefix):], {}).setdefault(r["model"], []).append(v)
    return {cat: {m: statistics.median(v) for m, v in sorted(models.items())} for cat, models in sorted(cells.items())}


def summarize(runs: list[dict], configs: list[dict]) -> dict:
    errs = [(abs(r["error"]), r) for r in runs if r["error"] is not None]
    worst = max(errs, key=lambda x: x[0]) if errs else None
    return {"runs": len(errs), "median_abs_error": statistics.median(e for e, _ in errs) if errs else None,
            "worst_abs_error": worst[0] if worst else None,
            "worst_run": f"{worst[1]['cell']} {worst[1]['pipeline']}" if worst else None,
            "signed_median_error": statistics.median(r["error"] for _, r in errs) if errs else None,
            "configs": len(configs), "ranking_right": sum(c["ranking_right"] for c in configs),
            "ranking_strict": sum(c["ranking_strict"] for c in configs),
            # configs whose every schedule ran more than once, and those ranked right where their runs are apart
            "configs_repeated": sum(c.get("ranking_apart") is not None for c in configs),
            "ranking_apart": sum(bool(c.get("ranking_apart")) for c in configs),
            **host_summary(runs)}


def host_summary(runs: list[dict]) -> dict:
    """The errors of the prediction at each run's own host speed (validate's `error_host`),
    over the runs that have it: how much of the error the host's speed explains."""
    errs = [abs(r["error_host"]) for r in runs if r.get("error_host") is not None]
    return {"host_runs": len(errs), "median_abs_error_host": statistics.median(errs) if errs else None,
            "worst_abs_error_host": max(errs) if errs else None}


def write_report(out: Path, report: dict) -> None:
    write_json_atomic(out / MATRIX, report)
    drop_packed(out / MATRIX)                 # a stored matrix's packed one, which this supersedes
    fields = list(dict.fromkeys(k for r in report["runs"] for k in r))
    tmp = out / ".matrix.csv.partial"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(report["runs"])
    tmp.replace(out / "matrix.csv")
    # the per-category tables read the fit set, which model fixes are judged on; a matrix of
    # configs no fix has seen (--held-back-every 1) has none, and shows its held-back set
    part = "fit" if report["summary"]["fit"]["runs"] or not report["summary"]["held-back"]["runs"] else "held-back"
    md = ["# Simulator against executor: the matrix", "",
          f"Calibration `{report['calibration']}`. Command:", "", "    " + shlex.join(report["command"]), "",
          "## Summary", "", "```", summary_table(report["summary"]), "```", "",
          *(["At run's host: each run predicted again with the host cost of every block call scaled by its "
             "reference loop over the dispatch probe's (`aptmoe-sim validate`, step 4). Not a prediction (a "
             "what-if has no run to time): it shows how much of the error is the host running faster or slower "
             "than when it was calibrated.", ""]
            if any(v.get("host_runs") for v in report["summary"].values()) else []),
          *(["Ranking right where runs apart (configs whose every schedule ran more than once, --repeats): "
             "every pair of schedules whose runs do not interleave, each run of one faster than every run of "
             "the other, is ordered so by the prediction; a pair whose runs interleave is one the measurement "
             "cannot order, whatever its medians say.", ""]
            if any(v.get("configs_repeated") for v in report["summary"].values()) else []),
          *placements_lines(report["runs"]),
          *(["## Cost figures not measured", "",
             ("Where the profile had no measurement, the simulator fell back on these (runs that used each). "
              "A prediction that leans on them is only as right as they are."), "", "```",
             *(f"{n:3d}  {f}" for f, n in report["fallbacks"].items()), "```", ""]
            if report.get("fallbacks") else []),
          f"## Per-action error by category and model size ({part} set; median of each run's median)", "", "```",
          category_table(report["categories"][part]), "```", "",
          f"## Total time per category and model size ({part} set; median over runs of each run's "
          "(predicted - measured) / measured of the category's summed time)", "",
          "Where this is far below the median above, a few actions took far longer than the rest.", "",
          "```", category_table(report.get("totals", {}).get(part, {})), "```", "",
          f"## Compute blocks by what ran beside them in the measurement ({part} set; median of each run's median)",
          "", ("Neighbours: the rank's load, offload and cpu streams with work in flight during the block, "
               "and recv: a receive of the rank posted and not yet matched by its peer's send."), "",
          "```", category_table(report.get("beside", {}).get(part, {}), "beside"), "```", "",
          *matrix_ratios.lines(report.get("over_gpipe", [])),
          "## Measurement noise (all runs)", "",
          "Step spread: (max - min) / median of one run's timed steps. Run spread (where a schedule ran more than "
          "once, --repeats): the same over its runs' step times, the median run being the one measured. "
          "Same-work pairs: the GPipe runs of two cells "
          "that differ only in the host-link cap, which GPipe never uses, and two schedules of one cell whose "
          "plans are one plan (Mobius on as many stages as GPUs is GPipeOffload; the ranking does not judge "
          "their order); the difference is slower / faster - 1. "
          "Where these are as large as the step-time errors, the runs cannot tell the model's error from the "
          "machine's noise.", "",
          "```", noise_table(report.get("noise", {})), "```", "",
          "## Runs", "",
          "Stalls: a step's worth of the longest rank's time over the prediction in block calls that took 3x it "
          "and 2 ms more (aptmoe/stalls.py). Load stalls, where a run has any: a step's worth of the most-stalled "
          "rank's time in loads that took 5x their bytes at the run's copy rate and 20 ms or more, over that "
          "rate (aptmoe/stalls.py; most ended with a receive of their rank). CPU jobs alike: of the CPU expert jobs the run or its prediction "
          "made, the share both made (the same rank, job and step; aptmoe/cpu_jobs_alike.py): the policy "
          "decides on each back-end's own clock, and per-action errors compare only the shared jobs. On run's "
          "placements: the error of the same run predicted with its own CPU placements (aptmoe/"
          "replayed_placements.py): what is left of the error once the prediction does the run's work.", "",
          "```", matrix_table(report["runs"]), "```", "",
          "## Ranking per config (measured order; predicted order where it differs)", "", "```",
          ranking_table(report["configs"]), "```", ""]
    tmp = out / ".matrix.md.partial"
    tmp.write_text("\n".join(md))
    tmp.replace(out / "matrix.md")


def placements_lines(runs: list[dict]) -> list[str]:
    """The paragraph on the runs with CPU jobs: their error as predicted and on their own
    placements (none where no run had a CPU job)."""
    both = [r for r in runs if r.get("error_replayed") is not None and r.get("error") is not None]
    if not both:
        return []
    own = statistics.median(abs(r["error"]) for r in both)
    replayed = statistics.median(abs(r["error_replayed"]) for r in both)
    alike = statistics.median(r["cpu_jobs_alike"] for r in both)
    return [f"On the runs' own CPU placements: the {len(both)} runs with CPU expert jobs (the prediction shared "
            f"a median {100 * alike:.0f}% of their jobs) have a median |error| of {100 * own:.1f}% as predicted "
            f"and {100 * replayed:.1f}% predicted with the run's placements (aptmoe/replayed_placements.py): "
            f"the difference is the prediction putting other experts on the CPU than the run did.", ""]


def _pct(x, spec="+.1f") -> str:
    return "-" if x is None else f"{100 * x:{spec}}%"


def matrix_table(runs: list[dict]) -> str:
    cats = sorted({k for r in runs for k in r if k.startswith("err/")})
    host = any(r.get("host_speed") is not None for r in runs)
    mem = any(r.get("memory_speed") is not None for r in runs)
    stall = any(r.get("stall_s_per_step") is not None for r in runs)
    loads = any(r.get("load_stall_s_per_step") for r in runs)
    jobs = any(r.get("cpu_jobs_alike") is not None for r in runs)
    headers = ["cell", "set", "pipeline", "measured s", "predicted s", "error", *(["stalls ms/step"] if stall else []),
               *(["load stalls ms/step"] if loads else []),
               *(["CPU jobs alike", "on run's placements"] if jobs else []),
               *(["host x", "at run's host"] if host else []), *(["memory x"] if mem else []), *[c[4:] for c in cats]]
    body = [[r["cell"], r["set"], r["pipeline"], fmt(r["measured_s"], ".3f"), fmt(r["predicted_s"], ".3f"),
             _pct(r["error"]), *([ms_cell(r.get("stall_s_per_step"))] if stall else []),
             *([ms_cell(r.get("load_stall_s_per_step"))] if loads else []),
             *([alike_cell(r.get("cpu_jobs_alike")), _pct(r.get("error_replayed"))] if jobs else []),
             *([fmt(r.get("host_speed"), ".2f"), _pct(r.get("error_host"))] if host else []),
             *([fmt(r.get("memory_speed"), ".2f")] if mem else []),
             *[_pct(r.get(c), "+.0f") for c in cats]] for r in runs]
    return format_table(headers, body)


def summary_table(summary: dict) -> str:
    host = any(v.get("host_runs") for v in summary.values())
    apart = any(v.get("configs_repeated") for v in summary.values())
    body = [[s, str(v["runs"]), _pct(v["median_abs_error"], ".1f"), _pct(v["worst_abs_error"], ".1f"),
             v["worst_run"] or "-", _pct(v["signed_median_error"]),
             f"{v['ranking_right']}/{v['configs']}", f"{v['ranking_strict']}/{v['configs']}",
             *([f"{v.get('ranking_apart', 0)}/{v.get('configs_repeated', 0)}"] if apart else []),
             *([str(v.get("host_runs", 0)), _pct(v.get("median_abs_error_host"), ".1f"),
                _pct(v.get("worst_abs_error_host"), ".1f")] if host else [])]
            for s, v in summary.items()]
    return format_table(["set", "runs", "median |err|", "worst |err|", "worst run", "median err",
                         f"ranking right (ties <{100 * TIE:.0f}%)", "ranking strict",
                         *(["ranking right where runs apart"] if apart else []),
                         *(["runs with host speed", "at run's host: median |err|", "worst"] if host else [])], body)


def category_table(cats: dict[str, dict[str, float]], label: str = "category") -> str:
    models = sorted({m for v in cats.values() for m in v}, key=lambda m: "SML".find(m))
    return format_table([label, *models], [[c, *[_pct(v.get(m), "+.0f") for m in models]]
                                           for c, v in cats.items()])


def noise_table(noise: dict[str, dict]) -> str:
    repeated = any(v.get("repeated") for v in noise.values())
    body = [[m, str(v["runs"]), _pct(v["step_spread_median"], ".1f"), _pct(v["step_spread_worst"], ".1f"),
             str(v["pairs"]), _pct(v["pair_difference_median"], ".1f"), _pct(v["pair_difference_worst"], ".1f"),
             *([str(v.get("repeated", 0)), _pct(v.get("run_spread_median"), ".1f"),
                _pct(v.get("run_spread_worst"), ".1f")] if repeated else [])]
            for m, v in noise.items()]
    return format_table(["model", "runs", "step spread median", "worst", "same-work pairs", "difference median",
                         "worst", *(["repeated", "run spread median", "worst"] if repeated else [])], body)


def ranking_table(configs: list[dict]) -> str:
    apart = any(c.get("ranking_apart") is not None for c in configs)
    body = [[c["cell"], c["set"], " < ".join(c["order_measured"]),
             "" if c["ranking_strict"] else " < ".join(c["order_predicted"]), fmt(c["ranking_right"]),
             *([fmt(c.get("ranking_apart"))] if apart else [])]
            for c in configs]
    return format_table(["cell", "set", "measured (fastest first)", "predicted", "right",
                         *(["right where runs apart"] if apart else [])], body,
                        right=[False] * 4 + [True] * (2 if apart else 1))
