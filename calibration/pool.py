"""Pool several calibrations of one kind of machine into one profile: every figure the median
of the inputs' figures.

    python -m aptmoe.calibration.pool A.json B.json C.json --name h200-1gpu --out h200-1gpu.json

Why: one calibration's host-side figures move from one lease (or minute) of the same machine
kind to the next by more than the runs do. On the one-GPU H200 kind, three full calibrations
made with the same command on three leases (2026-11-29) gave per-block host costs 10-30%
apart, CPU Adam at 14 threads 0.255-0.307 ns/param and the CPU memory stream 64-85 GB/s, while
the same grid of runs measured on two of those leases kept its M and L step times within 0-6%
(docs/validation-h200-v8). Each input then predicts a grid with its own error; their median
is a better estimate of the machine than any one of them.

How: numbers are the median of the inputs that have them; objects are pooled key by key; a
list of curves (objects with `seconds`) is pooled curve by curve, a curve matched by what it
is (its kind, sizes, dtype, direction, threads), at the token points every input measured
(the pointwise median of monotone curves is monotone); other lists element by element. A
figure whose inputs differ in shape is an error, not a silent pick. The inputs must be of one
machine (GPU model and count, CPU model and cores). Parts skipped by every input stay skipped;
`sources` gives each input's account, `made_by` each input's history and this command.

Some figures of a shipped profile, pooled over every calibration that measured them:

    python -m aptmoe.calibration.pool --onto h200-2gpu --only host_memory.cpu_alone_GBps,host_memory.beside \
        h200-2gpu run1.json memory.json ... --out h200-2gpu.json

`--onto BASE` keeps BASE whole but for the `--only` figures (SECTION.KEY), each the median of
the inputs that have it; BASE counts as an input only where it is named among them. Why: a part
timed on many leases (the host memory's CPU stream, by a part of `aptmoe-calibrate` that full
calibrations and quick lease jobs both run) has more inputs than any full calibration, and one
lease's figure can be far from the rest: `h200-2gpu`'s CPU stream alone at 14 threads read 62.2
GB/s, where ten other calibrations of the 2-GPU kind by the same method read 74-123 (the
eleven's median: 86.6).
"""

from __future__ import annotations

import argparse
import copy
import shlex
import statistics
import sys
from typing import Any

from aptmoe.calibration.merge import history, made_by, write_profile
from aptmoe.profile import ProfileError, load_profile

# what must agree for calibrations to be of one machine
MACHINE = ("gpu_name", "gpu_count", "cpu_model", "cpu_cores")
# the profile's own bookkeeping, not figures
BOOKKEEPING = ("schema", "name", "description", "made_by", "hardware", "skipped", "sources")


def machine_difference(a: dict, b: dict) -> str | None:
    """The first of MACHINE on which two profiles' `hardware` differ, or None: whether two
    calibrations are of one kind of machine."""
    return next((k for k in MACHINE if a.get(k) != b.get(k)), None)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def curve_identity(curve: dict) -> tuple:
    """What a curve is, apart from its measurements."""
    return tuple(sorted((k, repr(v)) for k, v in curve.items() if k not in ("tokens", "seconds")))


def pooled(values: list[Any], where: str) -> Any:
    """The median of `values` (one figure of every input that has it), structure kept."""
    first = values[0]
    if all(_is_number(v) for v in values):
        if all(isinstance(v, int) for v in values):     # sizes and counts stay whole numbers
            return statistics.median_low(values)
        return statistics.median(values)
    if all(isinstance(v, dict) for v in values):
        if "seconds" in first and "tokens" in first:
            return _pooled_curve(values, where)
        keys = dict.fromkeys(k for v in values for k in v)
        return {k: pooled([v[k] for v in values if k in v], f"{where}.{k}") for k in keys}
    if all(isinstance(v, list) for v in values):
        if all(isinstance(c, dict) and "seconds" in c for v in values for c in v):
            return _pooled_curves(values, where)
        if all(len(v) == len(first) for v in values):
            return [pooled([v[i] for v in values], f"{where}[{i}]") for i in range(len(first))]
    if all(v == first for v in values):
        return first
    raise ProfileError(f"{where}: the inputs differ in shape ({_shape(first)} against "
                       f"{_shape(next(v for v in values if v != first))}); pool calibrations made by one command")


def _shape(v: Any) -> str:
    return f"a list of {len(v)}" if isinstance(v, list) else type(v).__name__ if not isinstance(v, str) else repr(v)


def _pooled_curve(curves: list[dict], where: str) -> dict:
    tokens = [t for t in curves[0]["tokens"] if all(t in c["tokens"] for c in curves)]
    if not tokens:
        raise ProfileError(f"{where}: the inputs' curves share no token count")
    out = {k: pooled([c[k] for c in curves], f"{where}.{k}") for k in curves[0] if k not in ("tokens", "seconds")}
    out["tokens"] = tokens
    out["seconds"] = [statistics.median(c["seconds"][c["tokens"].index(t)] for c in curves) for t in tokens]
    return out


def _pooled_curves(lists: list[list[dict]], where: str) -> list[dict]:
    """Curve by curve, matched by identity, in the first input's order (then any others')."""
    groups: dict[tuple, list[dict]] = {}
    for curves in lists:
        for c in curves:
            groups.setdefault(curve_identity(c), []).append(c)
    return [_pooled_curve(group, f"{where}[{i}]") for i, group in enumerate(groups.values())]


def pool(docs: list[dict], *, name: str, command: str) -> dict:
    """One profile from the calibrations `docs` (plain JSON dicts), every figure their median."""
    if len(docs) < 2:
        raise ProfileError("pool needs at least two calibration files")
    first = docs[0]["hardware"]
    for d in docs[1:]:
        if (k := machine_difference(first, d["hardware"])) is not None:
            raise ProfileError(f"the inputs are of different machines: {k} {first.get(k)!r} against "
                               f"{d['hardware'].get(k)!r}; pool calibrations of one kind of machine")
    # Since session 22 a dispatch probe's `bwd` between is the backward's alone, beside `rec`;
    # before, `bwd` held the recompute's too: a median across the two would be of neither.
    split = {"rec" in d["dispatch"]["between"] for d in docs if "dispatch" in d}
    if len(split) > 1:
        raise ProfileError("dispatch.between: some inputs measure a recompute's host work apart (rec) and some "
                           "hold it in bwd; pool calibrations made by one version of aptmoe-calibrate")
    # Since session 33 a probe sets its actions' own host work (dispatch.action) apart from `between`
    if len({"action" in d["dispatch"] for d in docs if "dispatch" in d}) > 1:
        raise ProfileError("dispatch.between: some inputs measure the actions' ends apart (dispatch.action) and some "
                           "hold them in between; pool calibrations made by one version of aptmoe-calibrate")
    out: dict[str, Any] = {k: docs[0][k] for k in ("schema", "description") if k in docs[0]}
    out["name"] = name
    out["hardware"] = dict(first)
    figures = dict.fromkeys(k for d in docs for k in d if k not in BOOKKEEPING)
    for section in figures:
        out[section] = pooled([d[section] for d in docs if section in d], section)
    skipped_everywhere = set.intersection(*({s["part"] for s in d["skipped"]} for d in docs))
    out["skipped"] = [s for s in docs[0]["skipped"] if s["part"] in skipped_everywhere]
    n = len(docs)
    out["sources"] = {}
    for key in dict.fromkeys(k for d in docs for k in d["sources"]):
        texts = [(i + 1, d["sources"][key]) for i, d in enumerate(docs) if key in d["sources"]]
        kind = texts[0][1].split(":", 1)[0]          # what the figures are (measured, derived, ...)
        out["sources"][key] = (f"{kind}: the median of {len(texts)} of {n} calibrations (calibration/pool.py): "
                               + " || ".join(f"[{i}] {t}" for i, t in texts))
    inputs = [f"input {i + 1}: {history(d)}" for i, d in enumerate(docs)]
    out["made_by"] = made_by([*inputs, command])
    return out


def pool_onto(base: dict, docs: list[dict], fields: list[str], *, command: str, name: str | None = None) -> dict:
    """`base` (a plain JSON dict) with each of `fields` (SECTION.KEY) the median of the inputs
    `docs` that have it, named `name` (default: the base's); the rest of `base` as it is."""
    out = copy.deepcopy(base)
    out["name"] = name or base["name"]
    for i, d in enumerate(docs):
        if (k := machine_difference(base["hardware"], d["hardware"])) is not None:
            raise ProfileError(f"input {i + 1} ({d['name']}) is of another machine than --onto {base['name']}: its {k} "
                               f"is {d['hardware'].get(k)!r}, the base's {base['hardware'].get(k)!r}")
    # figures of one section pooled from the same inputs share one account in its sources
    accounts: dict[str, dict[tuple[int, ...], list[str]]] = {}
    for field in fields:
        section, _, key = field.partition(".")
        if not key or not isinstance(base.get(section), dict):
            raise ProfileError(f"--only {field}: --onto {base['name']} has no section {section!r}; name a figure as "
                               f"SECTION.KEY (e.g. host_memory.cpu_alone_GBps)")
        have = [i for i, d in enumerate(docs) if isinstance(d.get(section), dict) and key in d[section]]
        if len(have) < 2:
            raise ProfileError(f"--only {field}: {len(have)} of the {len(docs)} inputs have it; pool at least two")
        out[section][key] = pooled([docs[i][section][key] for i in have], field)
        accounts.setdefault(section, {}).setdefault(tuple(have), []).append(key)
    for section, by_inputs in accounts.items():
        for have, keys in by_inputs.items():
            pooled_from = (f"{', '.join(keys)}: the median of {len(have)} calibrations (calibration/pool.py --onto): "
                           + "; ".join(f"[{i + 1}] {history(docs[i])}" for i in have))
            was = out["sources"].get(section)
            out["sources"][section] = f"{was} || {pooled_from}" if was else pooled_from
    out["made_by"] = made_by([history(base), command])
    return out


def _fields(text: str) -> list[str]:
    fields = [f.strip() for f in text.split(",") if f.strip()]
    if not fields:
        raise argparse.ArgumentTypeError("name at least one figure as SECTION.KEY")
    return fields


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m aptmoe.calibration.pool", description=__doc__.splitlines()[0])
    p.add_argument("inputs", nargs="+", help="calibration files of one kind of machine, made by one command")
    p.add_argument("--name", default=None, help="name of the pooled profile (default: the first input's, "
                                                "or --onto's)")
    p.add_argument("--onto", metavar="BASE", help="keep this profile but for the --only figures")
    p.add_argument("--only", type=_fields, metavar="SECTION.KEY,...", help="with --onto: the figures to pool")
    p.add_argument("--out", required=True)
    ns = p.parse_args(argv)
    if (ns.onto is None) != (ns.only is None):
        p.error("--onto and --only go together: a base profile and the figures of it to pool")
    text = "python -m aptmoe.calibration.pool " + shlex.join(argv if argv is not None else sys.argv[1:])

    def build() -> dict:
        docs = [load_profile(path).to_dict() for path in ns.inputs]
        if ns.onto is None:
            return pool(docs, name=ns.name or docs[0]["name"], command=text)
        base = load_profile(ns.onto).to_dict()
        return pool_onto(base, docs, ns.only, command=text, name=ns.name)

    doc = write_profile("aptmoe-calibrate pool", ns.out, build)
    if doc is None:
        return 2
    if ns.only:
        print(f"wrote {ns.out}: {doc['name']}, with {', '.join(ns.only)} each the median of those of the "
              f"{len(ns.inputs)} calibrations that have it (its sources say which)")
    else:
        print(f"wrote {ns.out}: {doc['name']}, the median of {len(ns.inputs)} calibrations")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
