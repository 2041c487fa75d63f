"""``aptmoe-calibrate``: profile this machine into a calibration file the simulator reads.

    aptmoe-calibrate --out my-host.json                 # full: links, GPU blocks, CPU experts, Adam
    aptmoe-calibrate --out my-host.json --quick         # fewer sizes and repetitions (< 1 min on a laptop)
    aptmoe-calibrate --out h200.json --models S,M --dtypes bf16 --threads 16,32,64
    aptmoe-calibrate --out lease.json --base h200-2gpu --skip links,gpu,adam,dispatch,memory,p2p,tolls,pacer,cpujob,policy \
        --models M --threads 14,16 --dtypes fp32  # MoE-M's CPU experts again, the rest from h200-2gpu

Without a GPU it profiles the CPU parts and says, in the file and here, what it skipped; the
simulator then uses the roofline for those. The file is written atomically and loaded back
before the summary is printed. Bad input is one line on stderr and exit status 2, before
anything is measured; no file is written unless the whole profile is.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shlex
import sys
import time
from pathlib import Path

from aptmoe.config import DTYPE_BYTES, TOPOLOGIES, moe_model
from aptmoe.flags import make_parser
from aptmoe.profile import ProfileError, load_profile
from aptmoe.run_process import ExecutorFailed

PROG = "aptmoe-calibrate"
MODEL_SIZES = ("S", "M", "L")                 # the config presets (Table I)
# the profiler's parts that --skip can leave out
PARTS = ("links", "gpu", "cpu", "adam", "dispatch", "memory", "p2p", "tolls", "pacer", "cpujob", "policy")


class UsageError(ValueError):
    """Bad input, reported as one line before anything is measured."""


def fail(message: str, code: int = 2) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return code


def make_calibrate_parser() -> argparse.ArgumentParser:
    p = make_parser(PROG, "Profiles this machine into a calibration file the simulator reads "
                          "(aptmoe-sim --calibration FILE).")
    p.add_argument("--out", required=True, help="calibration file to write, e.g. aptmoe/profiles/h200.json")
    p.add_argument("--quick", action="store_true",
                   help="fewer copy sizes (up to 64 MiB), token counts and repetitions")
    p.add_argument("--models", default="S,M,L",
                   help="model sizes whose block dims are profiled: S, M, L or DxH such as 64x128 (S,M,L)")
    p.add_argument("--blocks-on", dest="blocks_on", choices=("auto", "cpu"), default="auto",
                   help="cpu: time the GPU blocks on the CPU, as an executor with CPU ranks runs them "
                        "(auto: on the first GPU, skipped without one)")
    p.add_argument("--block-threads", dest="block_threads", type=int, default=None,
                   help="threads for blocks timed on the CPU (half the cores)")
    p.add_argument("--dtypes", default="fp32,bf16", help="dtypes, of fp32, bf16, fp16 (fp32,bf16)")
    p.add_argument("--threads", default="7,14,28",
                   help="CPU thread counts, capped at this machine's CPUs (its maximum added if a count "
                        "exceeds it) (7,14,28)")
    p.add_argument("--gate-experts", dest="gate_experts", default="8,16,64",
                   help="expert counts of the gate curves (8,16,64)")
    p.add_argument("--seq-length", dest="seq_length", type=int, default=128,
                   help="tokens per sequence of the attention block (128)")
    p.add_argument("--heads", type=int, default=32, help="attention heads (32)")
    p.add_argument("--gpus", type=int, default=None, help="profile only the first N GPUs (default: all)")
    p.add_argument("--skip", default=None, help=f"parts left to the roofline, of {', '.join(PARTS)}")
    p.add_argument("--gpu-max-tokens", dest="gpu_max_tokens", type=int, default=None,
                   help="largest token count of the GPU curves (16384; quick 2048)")
    p.add_argument("--cpu-max-tokens", dest="cpu_max_tokens", type=int, default=None,
                   help="largest token count of the CPU curves (4096; quick 256)")
    p.add_argument("--cpu-point-limit", dest="cpu_point_limit", type=float, default=None,
                   help="stop a CPU curve after the first token count whose fwd + bwd take longer, in "
                        "seconds (0.6; quick 0.15)")
    p.add_argument("--dispatch-repeats", dest="dispatch_repeats", type=int, default=1,
                   help="runs of the dispatch probe, each figure their median (1): the host's speed moves "
                        "between runs")
    p.add_argument("--dispatch-ranks", dest="dispatch_ranks", type=int, default=None,
                   help="ranks the dispatch probe runs on at once (one GPU; two ranks with --blocks-on cpu): "
                        "as many as the runs the profile is for, e.g. 4 on four GPUs")
    p.add_argument("--base", default=None,
                   help="a profile of this machine (built-in name or file) to put what this run measures onto: "
                        "the parts --skip leaves out, and the curves of other models, thread counts or dtypes, "
                        "are the base's (calibration/refresh.py)")
    p.add_argument("--name", default=None, help="profile name (default: the --out file's stem)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return p


def _items(flag: str, text: str) -> list[str]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    if not items:
        raise UsageError(f"{flag} needs a comma-separated list, got {text!r}")
    return list(dict.fromkeys(items))                   # drop repeats, keep order


def _choices(flag: str, text: str, allowed: tuple[str, ...]) -> tuple[str, ...]:
    items = _items(flag, text)
    bad = [x for x in items if x not in allowed]
    if bad:
        raise UsageError(f"{flag}: {bad[0]!r} is unknown; use {', '.join(allowed)}")
    return tuple(items)


def _models(text: str) -> tuple[str, ...]:
    items = _items("--models", text)
    for x in items:
        if x in MODEL_SIZES:
            continue
        d, _, h = x.partition("x")
        if not (d.isdigit() and h.isdigit() and int(d) > 0 and int(h) > 0):
            raise UsageError(f"--models: {x!r} is neither {', '.join(MODEL_SIZES)} nor DxH such as 64x128")
    return tuple(items)


def _width(size: str) -> int:
    return int(size.split("x")[0]) if "x" in size else moe_model(size, 8).embedding_dim


def _positive_ints(flag: str, text: str) -> tuple[int, ...]:
    out = []
    for x in _items(flag, text):
        if not x.isdigit() or int(x) < 1:
            raise UsageError(f"{flag}: {x!r} is not a positive integer; e.g. {flag} 7,14,28")
        out.append(int(x))
    return tuple(sorted(set(out)))


def _positive(flag: str, value: float | int | None) -> None:
    if value is not None and not value > 0:
        raise UsageError(f"{flag} must be positive, got {value}")


def check_out(text: str) -> Path:
    """The output path, if it can be written: its folder exists, and it is no folder itself."""
    path = Path(text)
    folder = path.parent
    if not folder.is_dir():
        raise UsageError(f"--out {text}: folder {str(folder)!r} does not exist")
    if path.is_dir():
        raise UsageError(f"--out {text} is a folder; give a file name such as {text.rstrip('/')}/host.json")
    if not os.access(folder, os.W_OK):
        raise UsageError(f"--out {text}: folder {str(folder)!r} is not writable")
    return path


def option_fields(ns: argparse.Namespace) -> dict:
    """The profiler's `Options` fields from the parsed flags (no torch needed); UsageError
    on bad input."""
    for flag in ("--seq-length", "--heads", "--gpus", "--gpu-max-tokens", "--cpu-max-tokens", "--cpu-point-limit",
                 "--block-threads", "--dispatch-repeats", "--dispatch-ranks"):
        _positive(flag, getattr(ns, flag[2:].replace("-", "_")))
    if ns.dispatch_ranks is not None and f"C1+G{ns.dispatch_ranks}" not in TOPOLOGIES:
        counts = sorted(TOPOLOGIES.values())
        raise UsageError(f"--dispatch-ranks {ns.dispatch_ranks}: the probe runs as C1+G<n>, n one of "
                         f"{', '.join(map(str, counts))}")
    models = _models(ns.models)
    width = min(_width(s) for s in models)
    if width % ns.heads:
        raise UsageError(f"--heads {ns.heads} does not divide the model width {width}; e.g. --heads 32")
    return dict(
        models=models,
        dtypes=_choices("--dtypes", ns.dtypes, tuple(DTYPE_BYTES)),
        threads=_positive_ints("--threads", ns.threads),
        gate_experts=_positive_ints("--gate-experts", ns.gate_experts),
        seq_length=ns.seq_length, heads=ns.heads, quick=ns.quick, max_gpus=ns.gpus,
        skip=frozenset(_choices("--skip", ns.skip, PARTS)) if ns.skip is not None else frozenset(),
        gpu_max_tokens=ns.gpu_max_tokens, cpu_max_tokens=ns.cpu_max_tokens, cpu_point_limit_s=ns.cpu_point_limit,
        blocks_on=ns.blocks_on, block_threads=ns.block_threads, dispatch_repeats=ns.dispatch_repeats,
        dispatch_ranks=ns.dispatch_ranks)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        ns = make_calibrate_parser().parse_args(argv)
    except SystemExit as e:                   # -h (0) or a bad flag (2, its one line printed)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    try:
        out = check_out(ns.out)
        fields = option_fields(ns)
        base = None if ns.base is None else load_profile(ns.base).to_dict()
        if base is not None and fields["skip"] >= set(PARTS):
            raise UsageError("--base with every part skipped measures nothing; skip fewer parts")
    except UsageError as e:
        return fail(str(e))
    except ProfileError as e:
        return fail(f"--base {ns.base}: {str(e).splitlines()[0]}")
    try:                                      # torch only now, once the flags are known good
        from aptmoe.calibration.profiler import MeasurementError, Options, calibrate, summary
    except ImportError as e:
        if getattr(e, "name", None) == "torch" or importlib.util.find_spec("torch") is None:
            return fail(f"profiling needs torch ({e}); install it with pip install 'aptmoe[exec]'")
        raise                               # a broken install of aptmoe itself: show where

    command = shlex.join([PROG, *argv])
    name = ns.name or out.stem
    if ns.dispatch_ranks is not None:         # before anything is measured
        from aptmoe.calibration.profiler import dispatch_ranks_refused, probe_machine
        opts = Options(**fields)
        if (refused := dispatch_ranks_refused(opts, probe_machine(opts))) is not None:
            return fail(refused)
    if base is not None:                      # of this machine, before anything is measured
        import dataclasses

        from aptmoe.calibration.profiler import probe_machine
        from aptmoe.calibration.refresh import check_machine
        try:
            check_machine(base, dataclasses.asdict(probe_machine(Options(**fields)).hardware))
        except ProfileError as e:
            return fail(str(e))
    t0 = time.perf_counter()
    try:
        profile = calibrate(Options(**fields), name=name, command=command,
                            progress=not ns.quiet, log=lambda line: print(line, flush=True))
        if base is not None:
            from aptmoe.calibration.refresh import onto_base
            from aptmoe.profile import Profile
            profile = Profile.from_dict(onto_base(base, profile.to_dict(), name=name, command=command), str(out))
        path = profile.save(out)
    except KeyboardInterrupt:
        return fail("interrupted; no file written", 130)
    except ExecutorFailed as e:               # a probe's own aptmoe-run (dispatch, CPU jobs, own calls)
        return fail(f"{str(e).splitlines()[0]}; no file written", 1)
    except ProfileError as e:                 # the run measured nothing to put onto the base
        return fail(str(e).splitlines()[0])
    except MeasurementError as e:
        return fail(f"{e}; no file written", 1)
    try:
        loaded = load_profile(str(path.resolve()))
    except ProfileError as e:                 # save validates, so this is a bug: keep no bad file
        path.unlink(missing_ok=True)
        return fail(f"the written profile does not load back ({e}); removed", 1)
    print(summary(loaded))
    print(f"wrote {path} ({path.stat().st_size / 1e3:.1f} kB) in {time.perf_counter() - t0:.0f} s; "
          f"loaded back: schema {loaded.schema}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
