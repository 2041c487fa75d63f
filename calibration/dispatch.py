"""What the executor spends issuing one block: its own GPipe run on a model too small to compute.

The block curves time a block's kernels; the executor also pays, for every block it runs,
the Python around the call (parameter views, routing, the autograd graph, events, the
stage walk under the policy lock) and one launch per kernel. On blocks of a few hundred
tokens that host time is larger than the kernels' (the one-GPU H200 matrix: MoE-S blocks
took 2-4x their curves). It cannot be read off the curves, so it is measured here by
running `aptmoe-run` itself (GPipe: no loads, so no copy threads either) on dims so small
that the kernels take next to no time: each block's span in the trace is then its host cost.
On a GPU the span between two CUDA events is the issue time when the GPU waits for the host;
on CPU ranks it is the whole call. The executor runs as a subprocess, like a user's run.
"""

from __future__ import annotations

import bisect
import json
import shutil
import statistics
import tempfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from aptmoe.atomic import atomic_path
from aptmoe.costs import MESSAGE_POSTS
from aptmoe.host import run_loop_s
from aptmoe.profile import Dispatch
from aptmoe.run_process import ExecutorFailed, launch_executor
from aptmoe.stored import RESULTS, pack, read_json, stored_file
from aptmoe.trace import Trace, block_kind, is_action, is_block_call, is_load

# Small enough that every kernel is a few microseconds; the structure of a real layer
# (attention, a top-1 gate over 8 experts, every expert busy in most micro-batches).
PROBE_FLAGS = {"embedding_dim": 16, "hidden_dim": 32, "num_heads": 2, "num_layers": 4, "num_experts": 8, "gini": 0.3,
               "batch_size": 16, "num_chunks": 4, "seq_length": 32, "pipeline": "GPipe", "num_warmup_steps": 1,
               "num_training_steps": 3}


def _probe(flags: dict[str, object], size: str = "S") -> list[str]:
    """aptmoe-run's arguments for a probe model of these flags (widths not in them: `size`'s)."""
    return ["--is_moe=True", f"--model_config={size}", *[a for k, v in flags.items() for a in (f"--{k}", str(v))],
            "--no-plot", "-q"]


PROBE = _probe(PROBE_FLAGS)
CATEGORIES = {"forward": "fwd", "recompute": "fwd", "backward": "bwd"}
WIDE_SIZES = ("S", "M", "L")


def wide_probe(size: str = "S") -> list[str]:
    """The same probe at a preset's own widths (MoE-S, -M, -L): its blocks compute, so only
    the calls' host times (`host_us`) say what issuing costs; beside the tiny probe's spans they
    tell whether the probe's host is the runs' (docs/validation-h200-v5: on one lease the tiny
    probe's spans were half the MoE-S runs' blocks)."""
    if size not in WIDE_SIZES:
        raise ValueError(f"the wide probe's widths are a preset's, one of {', '.join(WIDE_SIZES)}; got {size!r}")
    return _probe({k: v for k, v in PROBE_FLAGS.items() if k not in ("embedding_dim", "hidden_dim", "num_heads")}, size)


WIDE = wide_probe()


def on_ranks(probe: list[str], device: str, ranks: int) -> list[str]:
    """A probe's aptmoe-run arguments on `ranks` processes of `device` that share one socket."""
    return [*probe, "--device", device, "--gpus", str(ranks), "--topo", f"C1+G{ranks}"]


# The dispatch probe loads every kernel at start, as `aptmoe-sim validate` and the matrix run
# the executor (KERNEL_LOADING_WHY in sim/validate.py): a probe should time the executor as the
# runs its figures predict run. On one-GPU H200 leases, ten probe runs of each loading,
# alternated in pairs, took a median 1.134x as long a step eager as lazy (8 of the 10 pairs
# slower eager), their reference loops too (1.18x): the whole process, not its launches alone
# (docs/measured/session36). The other probes keep the environment's loading: the loaded and
# own-calls probes calibrate a difference or a ratio within one run; the CPU jobs' phases have
# not been timed eager.
PROBE_KERNEL_LOADING = "eager"


def probe_args(device: str, ranks: int, wide: bool | str = False) -> list[str]:
    """`wide`: False for the tiny probe, True or a preset's size (S, M, L) for the probe at its
    widths. On a GPU with the matrix's kernel loading (`PROBE_KERNEL_LOADING`)."""
    args = on_ranks(wide_probe("S" if wide is True else wide) if wide else PROBE, device, ranks)
    return [*args, "--kernel-loading", PROBE_KERNEL_LOADING] if device == "cuda" else args


def _blocks(trace: Trace) -> list:
    """The block events on the compute stream (a stage's action at one block: `0F0@3:e5`)."""
    return [e for e in trace.events if is_block_call(e)]


def _by_kind(trace: Trace, value) -> dict[str, dict[str, list[float]]]:
    """`value(block)` of every block on the compute stream that has one, by kind and direction."""
    out: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for e in _blocks(trace):
        v = value(e)
        if v is not None:
            out[block_kind(e.name)][CATEGORIES[e.cat]].append(v)
    return out


def _medians(by_kind: dict[str, dict[str, list[float]]]) -> dict[str, dict[str, float]]:
    return {k: {d: statistics.median(v) for d, v in sorted(dirs.items())} for k, dirs in sorted(by_kind.items())}


def block_spans(trace: Trace) -> dict[str, dict[str, list[float]]]:
    """Span of every block on the compute stream, by kind (a, g, e) and direction."""
    return _by_kind(trace, lambda e: e.dur_s)


def _actions(trace: Trace):
    """(a stage's pass, the block calls inside its span in the order they ran) of every action."""
    blocks = _blocks(trace)
    for s in trace.events:
        if is_action(s):
            yield s, sorted((b for b in blocks if b.rank == s.rank and s.start_s <= b.start_s and b.end_s <= s.end_s),
                            key=lambda b: b.start_s)


# Where the executor's first- and last-stage work falls in each pass of an action (exec/runtime.py
# `_Ends`, the action event's args): "first" and "last" name the arg that holds each stage's
# figure, "start" and "end" the args inside the pass's start (action start to its first block)
# and end (its last block to the next part). A recomputing backward's loss and the loss's
# backward both run between its recompute and its first backward call: the recompute's end.
_ENDS = {"fwd": {"first": "embed_us", "last": "head_us", "start": ("embed_us",), "end": ("head_us",)},
         "rec": {"first": "embed_us", "last": "head_us", "start": ("embed_us",), "end": ("head_us", "head_back_us")},
         "bwd": {"first": "embed_back_us", "last": "head_back_us", "start": ("head_back_us",),
                 "end": ("embed_back_us",)}}


def parts(trace: Trace):
    """(pass, its start, its end, its block calls in order, the action event) of every action
    with calls. A backward that recomputes splits at its first backward call: the recompute's
    part ("rec") before it, the backward's ("bwd") from it."""
    for s, inside in _actions(trace):
        if not inside:
            continue
        recomputed = [b for b in inside if b.cat == "recompute"]
        own = [b for b in inside if b.cat != "recompute"]
        if recomputed and own:                  # the recompute runs first (aptmoe.stage_walk)
            cut = own[0].start_s
            yield "rec", s.start_s, cut, recomputed, s
            yield "bwd", cut, s.end_s, own, s
        else:
            yield CATEGORIES[s.cat], s.start_s, s.end_s, inside, s


def has_ends(trace: Trace) -> bool:
    """Whether the executor kept its actions' embedding and loss times (since session 33):
    then `action_spans` can set the actions' own host work apart from their layers'."""
    return any(is_action(e) and ("embed_us" in e.args or "head_us" in e.args) for e in trace.events)


def _ends_in(act, keys: tuple[str, ...]) -> float:
    return sum(act.args.get(k, 0.0) for k in keys) / 1e6


def between_spans(trace: Trace) -> dict[str, list[float]]:
    """Per stage pass: the stage's span less its blocks', per layer it ran: the host work
    between blocks. A backward that recomputes splits at its first backward call ("rec"
    before it, "bwd" from it). Until session 22 the two were one figure, which the simulator
    charged to the backward's layers; in eight runs of the 2-GPU grid's S8 cells (v4) the
    median recomputed layer then ran 9-60% longer than predicted, the median backward layer
    1-21% shorter (docs/measured/offline-session22).

    Where the trace keeps the embedding's and the loss's times (`has_ends`), the part's start
    and end (`action_spans`) are left out: what is left is the time between the layers' blocks."""
    out: dict[str, list[float]] = defaultdict(list)
    apart = has_ends(trace)
    for p, t0, t1, calls, _ in parts(trace):
        span = (calls[-1].end_s - calls[0].start_s) if apart else (t1 - t0)
        out[p].append(max(0.0, span - sum(b.dur_s for b in calls)) / len({b.args.get("layer") for b in calls}))
    return out


def action_spans(trace: Trace) -> dict[str, dict[str, list[float]]]:
    """Per stage pass, an action's host work outside its layers (profile.Dispatch.action):
    "start" (from the part's start to its first call) and "end" (from its last call to the
    part's end) less the embedding's and the loss's times the executor kept there, and those
    times themselves, "first" (stage 0's) and "last" (the last stage's). Empty for a trace
    without them (`has_ends`)."""
    out: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    if not has_ends(trace):
        return out
    for p, t0, t1, calls, act in parts(trace):
        where = _ENDS[p]
        out[p]["start"].append(max(0.0, calls[0].start_s - t0 - _ends_in(act, where["start"])))
        out[p]["end"].append(max(0.0, t1 - calls[-1].end_s - _ends_in(act, where["end"])))
        for part in ("first", "last"):
            if where[part] in act.args:
                out[p][part].append(act.args[where[part]] / 1e6)
    return out


def combine_spans(trace: Trace) -> dict[str, list[float]]:
    """Per stage pass, from each layer's last expert call (of the pass itself, not its
    recompute) to the action's next call or its end: the host work after a layer's experts
    (the combine), the part of `between_spans` that the executor does after waiting for the
    layer's CPU experts. Where the actions' ends are measured apart (`has_ends`), a part's
    last layer is left out: its combine is in the part's end."""
    out: dict[str, list[float]] = defaultdict(list)
    apart = has_ends(trace)
    for s, calls in _actions(trace):
        inside = [b for b in calls if b.cat != "recompute"]
        for x, y in zip(inside, [*inside[1:], None]):
            if y is None and apart:         # the part's last layer: its combine is in the part's end
                continue
            if block_kind(x.name) == "e" and (y is None or block_kind(y.name) != "e"):
                out[CATEGORIES[s.cat]].append(max(0.0, (s.end_s if y is None else y.start_s) - x.end_s))
    return out


def post_spans(trace: Trace, device: str) -> dict[str, list[float]]:
    """Host seconds of each message the issuing thread posted (the trace's `post_us`, kept
    since 9359a37), by "send" and "recv". A receive's only on a GPU: on CPU ranks gloo's
    receive returns when its bytes are there, so the call holds the wait too. Empty on one
    rank, where there are no messages."""
    out: dict[str, list[float]] = defaultdict(list)
    for e in trace.events:
        if e.cat in MESSAGE_POSTS and e.args.get("by") == "compute" and "post_us" in e.args:
            if e.cat == "send" or device == "cuda":
                out[e.cat].append(e.args["post_us"] / 1e6)
    return out


def dispatch_from_trace(trace: Trace, device: str) -> Dispatch:
    spans = block_spans(trace)
    if not spans:
        raise ValueError("the probe's trace holds no block events: the executor recorded nothing to time")
    seconds = _medians(spans)
    between = {d: statistics.median(v) for d, v in sorted(between_spans(trace).items())}
    # a part of `between` by construction; a median of its own can come out over it on noise
    combine = {d: min(statistics.median(v), between.get(d, 0.0)) for d, v in sorted(combine_spans(trace).items())}
    post = {k: statistics.median(v) for k, v in sorted(post_spans(trace, device).items())}
    action = {p: {k: statistics.median(v) for k, v in sorted(figures.items())}
              for p, figures in sorted(action_spans(trace).items())}
    return Dispatch(device, seconds, between, sum(len(v) for dirs in spans.values() for v in dirs.values()),
                    loop_s=run_loop_s(trace.meta.get("host_loop_s")), combine=combine or None, post=post or None,
                    action=action or None)


def host_times(trace: Trace) -> dict[str, dict[str, float]]:
    """Median host time of each block kind's call (the executor's `host_us`, perf_counter
    around the call), by direction: on a GPU, what the span would be if the host alone set
    it. Blocks of traces written before the executor kept it are left out."""
    return _medians(_by_kind(trace, lambda e: e.args["host_us"] / 1e6 if "host_us" in e.args else None))


def probe_run_trace(folder: Path, schedule: str = "GPipe", results: dict | None = None) -> Trace:
    """The trace of `schedule` in an aptmoe-run folder (trace-SCHEDULE.json, or the .json.xz a
    stored run keeps), with the host's speed when it ran, from its results.json (or the .json.xz
    a stored run keeps; or `results`, already read), beside its spans."""
    if results is None:
        results = read_json(folder / RESULTS)
    name = folder / f"trace-{schedule}.json"
    tr = Trace.load(stored_file(name) or name)
    tr.meta["host_loop_s"] = results["schedules"][schedule].get("host_loop_s")
    return tr


def _run_probe(args: list[str], what: str, schedules: tuple[str, ...], keep: Path | None = None) -> list[Trace]:
    """aptmoe-run with `args` in a temporary folder: the traces of `schedules`, or one clear
    error naming `what` failed or was refused. `keep`: a folder to keep the run in, its
    results.json and the schedules' traces (xz), as a stored run that `probe_run_trace`,
    `dispatch_shape` and a lease's profile read again later."""
    with tempfile.TemporaryDirectory(prefix="aptmoe-probe-") as tmp:
        out = Path(tmp) / "run"
        try:
            launch_executor(args, out)
        except ExecutorFailed as e:
            raise ExecutorFailed(f"{what} failed: {e}") from None
        results = json.loads((out / "results.json").read_text())
        for s in schedules:
            if results["schedules"][s].get("oom"):
                raise RuntimeError(f"{what} was refused: " + results["schedules"][s]["oom_detail"])
        if keep is not None:
            _keep_run(out, keep, schedules)
        return [probe_run_trace(out, s, results) for s in schedules]


def _keep_run(run: Path, keep: Path, schedules: tuple[str, ...]) -> None:
    """The run's results.json and its schedules' traces, xz-compressed (aptmoe.stored.pack) as
    a stored run keeps them, in `keep`, each file written whole."""
    keep.mkdir(parents=True, exist_ok=True)
    for name in [*(f"trace-{s}.json" for s in schedules), RESULTS]:
        src = stored_file(run / name) or run / name
        with atomic_path(keep / src.name) as tmp:
            shutil.copyfile(src, tmp)
        pack(keep / src.name)


def run_on_gpus(probe: list[str], what: str, schedules: tuple[str, ...], most: int = 2,
                keep: Path | None = None) -> list[Trace]:
    """`_run_probe` on this machine's GPUs, `most` of them at most (the runs a probe stands for
    use two); `what` names the probe, its `{gpus}` the GPUs it ran on; `keep`: the folder to
    keep the run in."""
    import torch

    g = max(1, min(most, torch.cuda.device_count()))
    return _run_probe(on_ranks(probe, "cuda", g), what.format(gpus=g), schedules, keep)


def probe_trace(device: str, ranks: int = 1, wide: bool | str = False, keep: Path | None = None) -> Trace:
    """Runs the probe (`device` cuda or cpu, `ranks` processes; `wide`: at MoE-S's widths, or
    a preset's size) and returns its GPipe trace; `keep`: the folder to keep the run in."""
    what = f"MoE-{'S' if wide is True else wide}" if wide else "tiny"
    return _run_probe(probe_args(device, ranks, wide), f"the dispatch probe (aptmoe-run GPipe on a {what} model)",
                      ("GPipe",), keep)[0]


def median_dispatch(runs: list[Dispatch]) -> Dispatch:
    """Each figure's median over several probe runs (their samples summed): one run is a
    median over its calls, but the host moves between runs (session 19: one of three runs
    of one lease took 1.5x the others' spans, its reference loop 40 ms against 25)."""
    if not runs:
        raise ValueError("no probe runs to take the median of")
    if len({r.device for r in runs}) > 1:
        raise ValueError("the probe runs ran on different devices: " + ", ".join(sorted({r.device for r in runs})))

    med = statistics.median

    def keys(dicts) -> list[str]:
        return sorted({k for d in dicts for k in d})

    seconds = {k: {d: med([r.seconds[k][d] for r in runs if d in r.seconds.get(k, {})])
                   for d in keys(r.seconds.get(k, {}) for r in runs)} for k in keys(r.seconds for r in runs)}
    between = {d: med([r.between[d] for r in runs if d in r.between]) for d in keys(r.between for r in runs)}
    combines = [r.combine for r in runs if r.combine]
    combine = {d: min(med([c[d] for c in combines if d in c]), between.get(d, 0.0)) for d in keys(combines)} or None
    loops = [r.loop_s for r in runs if r.loop_s is not None]
    posts = [r.post for r in runs if r.post]
    post = {k: med([p[k] for p in posts if k in p]) for k in keys(posts)} or None
    if len({r.action is None for r in runs}) > 1:
        raise ValueError("some probe runs measured their actions' ends apart and some did not: "
                         "their between-block figures mean different things; run the probe again")
    acts = [r.action for r in runs if r.action]
    action = {p: {k: med([a[p][k] for a in acts if k in a.get(p, {})]) for k in keys(a.get(p, {}) for a in acts)}
              for p in keys(acts)} or None
    return Dispatch(runs[0].device, seconds, between, sum(r.samples for r in runs),
                    loop_s=med(loops) if loops else None, combine=combine, post=post, action=action)


def measure_dispatch(device: str, ranks: int = 1, repeats: int = 1) -> Dispatch:
    """Runs the probe (`device` cuda or cpu, `ranks` processes) `repeats` times and returns
    each figure's median."""
    if repeats < 1:
        raise ValueError(f"the dispatch probe runs at least once; got {repeats} repeats")
    return median_dispatch([dispatch_from_trace(probe_trace(device, ranks), device) for _ in range(repeats)])


# The same probe with experts as heavy to copy as MoE-S's (2 x 16 x 262144 fp32 = 32 MiB, 0.6 ms
# at 55 GB/s) but as light to compute (16 tokens at width 16): the offload schedules' blocks
# are issued while the copy engine lands a copy every 0.6 ms, as in MoE-S's runs, and GPipe's
# (weights resident, no copies) in the same process are the same blocks alone.
LOADED = _probe({**PROBE_FLAGS, "hidden_dim": 262144, "num_layers": 8, "num_stages": 8, "pipeline": "all",
                 "num_training_steps": 4})
LOADED_SCHEDULES = ("GPipeOffload", "Mobius")


@dataclass(frozen=True)
class CopyToll:
    """What each copy landing costs the executor's issuing thread, read from its own traces."""
    seconds: float              # per copy landed while a block was issued
    constant_s: float           # per block beside the copies whatever landed (DMA, the thread's own wake-ups)
    blocks: int                 # forward blocks it is taken over
    landings: int               # copies landed while they were issued


def copy_toll_from_traces(alone: Trace, loaded: list[Trace]) -> CopyToll:
    """Forward blocks of `loaded` (offload schedules) against the same blocks in `alone` (GPipe,
    no copies): each block's excess over GPipe's median of its kind, fitted by least squares
    as a constant plus a toll per copy that landed while it was issued. The constant takes
    what every block pays beside the loads (the DMA, the thread waking from its wait for the
    block): without it, the few blocks that see a copy land would carry all of it. Forward
    blocks only: the backward's also run beside the offload thread."""
    base = {k: d["fwd"] for k, d in _medians(block_spans(alone)).items() if "fwd" in d}
    xs: list[int] = []
    ys: list[float] = []
    for trace in loaded:
        ends = sorted(e.end_s for e in trace.events if is_load(e))
        for b in _blocks(trace):
            kind = block_kind(b.name)
            if b.cat != "forward" or kind not in base:
                continue
            xs.append(bisect.bisect_right(ends, b.end_s) - bisect.bisect_right(ends, b.start_s))
            ys.append(b.dur_s - base[kind])
    if len(set(xs)) < 2:
        raise ValueError("the loaded probe's forward blocks all saw as many copies land: no toll per copy "
                         "can be told from what they pay anyway")
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return CopyToll(max(0.0, slope), my - slope * mx, len(xs), sum(xs))


def measure_copy_toll() -> CopyToll:
    """Runs the loaded probe on the GPU (every schedule, one process) and fits the toll over
    the offload schedules' traces."""
    alone, *loaded = _run_probe(on_ranks(LOADED, "cuda", 1),
                                "the loaded probe (aptmoe-run on experts heavy to copy)", ("GPipe", *LOADED_SCHEDULES))
    return copy_toll_from_traces(alone, loaded)


def main(argv: list[str] | None = None) -> int:
    """`python -m aptmoe.calibration.dispatch [--device cpu|cuda] [--ranks N] [--repeats N]`:
    the probe alone, repeated, as a benchmark of the executor's host cost per block."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m aptmoe.calibration.dispatch", description=main.__doc__.split(":")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--loaded", action="store_true",
                   help="instead: what each copy landing costs the issuing thread (the loaded probe, a GPU)")
    p.add_argument("--wide", nargs="?", const="S", choices=WIDE_SIZES, default=None, metavar="SIZE",
                   help="the probe at a preset's widths (S when none is given; S, M or L): its blocks compute, "
                        "so read the host times")
    p.add_argument("--keep", type=Path, default=None, metavar="DIR",
                   help="keep each probe run as DIR/run-N (results.json.xz, trace-GPipe.json.xz): what "
                        "`python -m aptmoe.calibration.dispatch_shape PROFILE DIR/run-*` reshapes a profile with")
    ns = p.parse_args(argv)
    if ns.loaded:
        print(f"the executor's copy engine ({', '.join(LOADED_SCHEDULES)}): what the issuing thread loses")
        for _ in range(ns.repeats):
            t = measure_copy_toll()
            print(f"  {t.seconds * 1e6:7.1f} us per copy landed, {t.constant_s * 1e6:7.1f} us per block beside "
                  f"the loads ({t.landings} copies over {t.blocks} forward blocks)")
        return 0
    traces = [probe_trace(ns.device, ns.ranks, ns.wide, None if ns.keep is None else ns.keep / f"run-{i + 1}")
              for i in range(ns.repeats)]
    runs = [dispatch_from_trace(t, ns.device) for t in traces]
    hosts = [host_times(t) for t in traces]
    rows = [(f"{k} {d}", [r.seconds[k][d] for r in runs], [h.get(k, {}).get(d) for h in hosts])
            for k in sorted(runs[0].seconds) for d in sorted(runs[0].seconds[k])]
    rows += [(f"between {d}", [r.between[d] for r in runs], []) for d in sorted(runs[0].between)]
    rows += [(f"combine {d}", [(r.combine or {}).get(d, 0.0) for r in runs], []) for d in sorted(runs[0].combine or {})]
    # each pass's own start and end, the first stage's embedding and the last's loss (Dispatch.action)
    rows += [(f"{d} {k}", [(r.action or {}).get(d, {}).get(k, 0.0) for r in runs], [])
             for d in sorted(runs[0].action or {}) for k in sorted(runs[0].action[d])]
    print(f"host ms per call, {ns.device}, {ns.ranks} ranks, {f'MoE-{ns.wide} widths' if ns.wide else 'tiny model'}, median "
          f"of {ns.repeats} probe runs (each a median): the span (what the profile keeps), then the call's host time")
    for name, xs, hs in rows:
        host = [h for h in hs if h is not None]
        print(f"  {name:<12} {statistics.median(xs) * 1e3:8.4f}   runs " + " ".join(f"{x * 1e3:.4f}" for x in xs)
              + (f"   host {statistics.median(host) * 1e3:.4f}" if host else ""))
    loops = [r.loop_s for r in runs if r.loop_s is not None]
    if loops:
        print("  reference loop (aptmoe.host.python_loop_s) ms, by run: " + " ".join(f"{x * 1e3:.2f}" for x in loops))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
