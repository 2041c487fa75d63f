"""The issuing thread's own calls beside the rank's Adam and copies: `adam_factor`, `copy_adam_factor`.

On the 2-GPU H200 (docs/validation-h200-2gpu-v4, read in session 20) the S8 runs' block calls
took 1.3-1.6x their time alone beside the rank's Adam chunks and 2.4-3.9x beside a native copy
and the chunks at once (a gradient offload, or the next stage's loads). The loops that stand
for the calls (calibration/issue_tolls.py, calibration/expert_neighbours.py) saw 1.13-1.33x and
1.24-1.47x: the model multiplied `dma_factor` and `adam_factor`, 1.25x, and native S8's
Mobius and APTMoE were predicted 12-19% fast. What slows the runs' calls more than the loops'
is not known; the calls themselves are, so the figures are read from them
(aptmoe/own_work.py): the executor's Mobius and GPipeOffload on up to two GPUs at MoE-S's
widths on a native link. Mobius recomputes beside its gradient offload and the Adam after it;
GPipeOffload beside the next stage's loads and the last one's Adam.

The probe is no grid config (12 layers, G 0.45). On nvidia-h200-x2 (session 20, four runs: three
alone and one in a calibration's tolls part) the calls' medians were 1.33-1.43x beside Adam and
3.14-3.31x beside a native copy with Adam, where the loops in the same calibration gave
1.09-1.25x and 1.29-1.31x (docs/measured/h200x2-session20). The factors are the calls' time
over their kinds' medians alone, which their tails put over the medians (aptmoe/own_work.py):
in session 21's three runs 1.42-1.58x and 3.24-4.05x, against medians of 1.31-1.46x and
2.96-3.77x (docs/measured/h200x2-session21).

    python -m aptmoe.calibration.own_calls [--repeats 1] [--onto PROFILE --out FILE]
    python -m aptmoe.calibration.own_calls --from RUN [RUN ...] [--onto PROFILE --out FILE]

`--from` reads stored `aptmoe-run` folders (their Mobius and GPipeOffload traces) instead of
running the probe, one set of factors a run; `--onto` puts the runs' medians into a copy of
PROFILE's `issue_tolls` (which it must have), its source and history saying where they came
from.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

from aptmoe.calibration.dispatch import _probe, run_on_gpus
from aptmoe.calibration import merge
from aptmoe.flags import whole_number
from aptmoe.own_work import OwnWork, first_use_cell, first_uses, own_work_factors
from aptmoe.trace import Trace, run_traces

SCHEDULES = ("Mobius", "GPipeOffload")
PROBE = _probe({"num_layers": 12, "num_stages": 4, "num_experts": 8, "gini": 0.45, "batch_size": 32,
                "num_chunks": 4, "seq_length": 128, "pipeline": ",".join(SCHEDULES), "num_warmup_steps": 1,
                "num_training_steps": 6})
MIN_CALLS = 30       # calls beside Adam (and beside a copy with it) that a factor needs
FIELDS = {"adam": "adam_factor", "copy+adam": "copy_adam_factor"}


def issue_fields(found: dict[str, OwnWork]) -> dict[str, float]:
    """`IssueTolls` fields from the factors: those with at least MIN_CALLS calls."""
    missing = [c for c in FIELDS if c not in found or found[c].calls < MIN_CALLS]
    if missing:
        have = ", ".join(f"{c} {found[c].calls}" if c in found else f"{c} none" for c in FIELDS)
        raise ValueError(f"the own-calls probe needs {MIN_CALLS} calls beside Adam and beside a copy with Adam; "
                         f"it had {have}")
    return {FIELDS[c]: found[c].factor for c in FIELDS}


def probe_traces() -> list[Trace]:
    """The probe's traces, on two GPUs where there are (as the runs it stands for)."""
    return run_on_gpus(PROBE, f"the own-calls probe (aptmoe-run {' and '.join(SCHEDULES)} on MoE-S widths, "
                       "{gpus} GPU)", SCHEDULES)


PROBE_WHAT = "the executor's own calls (" + " and ".join(SCHEDULES) + ", MoE-S widths, 12 layers, native)"


def own_calls_from_traces(traces: list[Trace], say: Callable[[str], None] = print,
                          what: str = PROBE_WHAT) -> dict[str, float]:
    """`adam_factor` and `copy_adam_factor` from the probe's traces (or `what` others), saying
    what it found."""
    found = own_work_factors(traces)
    say(f"{what}: " + "; ".join(f"beside {c} {found[c]}" for c in sorted(found)))
    return issue_fields(found)


def measure_own_calls(say: Callable[[str], None] = print) -> dict[str, float]:
    """Runs the probe and returns `adam_factor` and `copy_adam_factor`, saying what it found."""
    return own_calls_from_traces(probe_traces(), say)


def first_use_line(traces: list[Trace]) -> str:
    """The calls alone of loaded blocks, the first after each load against the later ones, by
    kind (aptmoe.own_work.first_uses), pooled over the traces: printed, not a profile figure
    (the model has no such cost; session 21 found it in the 2-GPU grid's runs)."""
    pooled: dict[str, dict[str, list[float]]] = {}
    for t in traces:
        for kind, got in first_uses(t).items():
            into = pooled.setdefault(kind, {"first": [], "later": []})
            into["first"] += got["first"]
            into["later"] += got["later"]
    cells = [f"{k} {first_use_cell(v)}" for k, v in sorted(pooled.items()) if v["first"] and v["later"]]
    return "first call after a block's load / its later calls, alone, host us: " + ("; ".join(cells) or "none")


def stored_traces(run: Path) -> dict[str, Trace]:
    """A stored run's traces of the probe's schedules (those it has) by schedule, or one clear error."""
    found = run_traces(run, SCHEDULES)
    if not found:
        raise ValueError(f"{run}: no trace of {' or '.join(SCHEDULES)} (trace-NAME.json, .json.gz or .json.xz)")
    return found


def put_onto(profile: str, out: str, medians: dict[str, float], what: str, command: str) -> dict | None:
    """PROFILE with `medians` as its issue_tolls fields, written to `out` (None after one line
    on stderr where PROFILE is bad or has no issue_tolls)."""
    note = (", ".join(medians) + f": the medians over {what} of the executor's own calls "
            "(calibration/own_calls.py): " + ", ".join(f"{k} {v:.3f}" for k, v in medians.items()))
    return merge.put_onto("python -m aptmoe.calibration.own_calls", profile, out, "issue_tolls",
                          lambda tolls: tolls.update(medians), note, command,
                          "the factors in: calibrate its tolls part first")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m aptmoe.calibration.own_calls", description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=whole_number("run"), default=None, help="probe runs, each its own processes (1)")
    p.add_argument("--from", dest="runs", nargs="+", type=Path, metavar="RUN", default=None,
                   help="stored aptmoe-run folders to read instead of running the probe (their Mobius and "
                        "GPipeOffload traces), one set of factors a run")
    p.add_argument("--onto", metavar="PROFILE", help="with --out: put the runs' medians into this profile's "
                                                     "issue_tolls")
    p.add_argument("--out", metavar="FILE", help="where --onto writes the profile")
    ns = p.parse_args(argv)
    if ns.runs is not None and ns.repeats is not None:
        p.error("--repeats runs the probe; --from reads stored runs: give one of them")
    if (ns.onto is None) != (ns.out is None):
        p.error("--onto and --out go together: the profile to put the factors into and where to write it")
    command = "python -m aptmoe.calibration.own_calls " + shlex.join(argv if argv is not None else sys.argv[1:])
    sources = ns.runs if ns.runs is not None else range(ns.repeats or 1)
    got: dict[str, list[float]] = {f: [] for f in FIELDS.values()}
    try:
        for i, source in enumerate(sources):
            label = f"run {i + 1}" if ns.runs is None else str(source)
            stored = None if ns.runs is None else stored_traces(source)
            traces = probe_traces() if stored is None else list(stored.values())
            what = PROBE_WHAT if stored is None else "the run's own calls (" + " and ".join(stored) + ")"
            fields = own_calls_from_traces(traces, lambda s, label=label: print(f"{label}: {s}", flush=True), what)
            print(f"{label}: {first_use_line(traces)}", flush=True)
            for k, v in fields.items():
                got[k].append(v)
    except (ValueError, RuntimeError) as e:
        print(f"own_calls: error: {e}", file=sys.stderr)
        return 1
    medians = {k: statistics.median(v) for k, v in got.items()}
    for k, v in got.items():
        print(f"{k}: median {medians[k]:.2f} over {len(v)} runs ({', '.join(f'{x:.2f}' for x in v)})")
    if ns.onto is not None:
        what = (f"{len(sources)} probe runs" if ns.runs is None else
                f"{len(ns.runs)} stored runs (" + ", ".join(map(str, ns.runs)) + ")")
        if put_onto(ns.onto, ns.out, medians, what, command) is None:
            return 2
        print(f"wrote {ns.out}: {ns.onto} with issue_tolls " + ", ".join(f"{k} {v:.3f}" for k, v in medians.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
