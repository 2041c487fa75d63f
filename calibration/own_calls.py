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

    python -m aptmoe.calibration.own_calls [--repeats 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable

from aptmoe.calibration.dispatch import _probe, run_on_gpus
from aptmoe.flags import whole_number
from aptmoe.own_work import OwnWork, first_use_cell, first_uses, own_work_factors
from aptmoe.trace import Trace

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


def own_calls_from_traces(traces: list[Trace], say: Callable[[str], None] = print) -> dict[str, float]:
    """`adam_factor` and `copy_adam_factor` from the probe's traces, saying what it found."""
    found = own_work_factors(traces)
    say("the executor's own calls (" + " and ".join(SCHEDULES) + ", MoE-S widths, 12 layers, native): "
        + "; ".join(f"beside {c} {found[c]}" for c in sorted(found)))
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m aptmoe.calibration.own_calls", description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=whole_number("run"), default=1, help="probe runs, each its own processes (1)")
    ns = p.parse_args(argv)
    got: dict[str, list[float]] = {f: [] for f in FIELDS.values()}
    try:
        for i in range(ns.repeats):
            traces = probe_traces()
            fields = own_calls_from_traces(traces, lambda s, i=i: print(f"run {i + 1}: {s}", flush=True))
            print(f"run {i + 1}: {first_use_line(traces)}", flush=True)
            for k, v in fields.items():
                got[k].append(v)
    except (ValueError, RuntimeError) as e:
        print(f"own_calls: error: {e}", file=sys.stderr)
        return 1
    for k, v in got.items():
        print(f"{k}: median {statistics.median(v):.2f} over {len(v)} runs ({', '.join(f'{x:.2f}' for x in v)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
