"""A calibration of some parts put onto an existing profile: `aptmoe-calibrate --base PROFILE`.

    aptmoe-calibrate --base h200-2gpu --skip links,gpu,adam,dispatch,memory,p2p,tolls,pacer,cpujob,policy \
        --models M --threads 14,16 --dtypes fp32 --out lease.json
    python -m aptmoe.calibration.refresh h200-2gpu cpu-1.json --out lease.json   # a calibration made before

Why: some of a host's figures move from one lease (or hour) of the same machine kind to the
next by more than a prediction can absorb. The CPU experts of MoE-M ran 1.06x a profile's
curves on one lease of the 2-GPU H200 and 1.67x on another (docs/validation-h200-2gpu-v10-fresh),
and the curves timed on a lease just before its runs are what session 27's held-back cells were
planned with (docs/validation-h200-2gpu-v11-fresh). Timing only what moves takes a minute or two
(M's curves: 82 s); the rest comes from the base.

What is taken: every section the new run measured, with its sources (calibration/merge.py
keeps the history). Curve sections (`gpu`, `cpu_expert`) are updated curve by curve: a curve
the run measured replaces the base's curve of the same kind, sizes, dtype, direction and
thread count, and the base keeps the curves the run did not measure (other models, thread
counts or dtypes). The NCCL p2p link lives in `links`: where the run measured the links but not
p2p, the base's p2p is kept, and the other way round. The base must be of this machine (the
GPU model and count, the CPU model and cores).
"""

from __future__ import annotations

import argparse
import shlex
import sys

from aptmoe.calibration.merge import SECTIONS, merge, write_profile
from aptmoe.calibration.pool import curve_identity, machine_difference
from aptmoe.profile import ProfileError, load_profile

CURVES = ("gpu", "cpu_expert")          # sections that are lists of curves
P2P = "links.p2p"


def measured_sections(doc: dict) -> list[str]:
    """The sections of the calibration `doc` that it measured (none of its `skipped` entries is the
    whole section)."""
    whole = {s["part"] for s in doc["skipped"]}
    return [s for s in SECTIONS if s in doc and s not in whole]


def _p2p_measured(doc: dict) -> bool:
    return not any(s["part"] == "links.p2p.intra_node" for s in doc["skipped"])


def _curves(base: list[dict], new: list[dict]) -> list[dict]:
    """The new curves, and the base's of what the new did not measure, in the base's order."""
    fresh = {curve_identity(c): c for c in new}
    out = [fresh.pop(curve_identity(c), c) for c in base]
    return out + list(fresh.values())


def check_machine(base: dict, hardware: dict) -> None:
    """ProfileError unless the profile `base` (a plain JSON dict) is of the machine `hardware`."""
    if (k := machine_difference(base["hardware"], hardware)) is not None:
        raise ProfileError(f"--base {base['name']} is of another machine: its {k} is "
                           f"{base['hardware'].get(k)!r}, this one's {hardware.get(k)!r}; "
                           f"give a profile of this machine")


def onto_base(base: dict, new: dict, *, name: str, command: str) -> dict:
    """The profile `base` (a plain JSON dict) with what the calibration `new` measured."""
    check_machine(base, new["hardware"])
    taken = dict(new)
    takes: list[tuple[str, dict]] = []
    kept: dict[str, int] = {}                          # curve section -> the base's curves it keeps
    sections = measured_sections(new)
    for section in sections:
        if section in CURVES and isinstance(base.get(section), list):
            taken[section] = _curves(base[section], new[section])
            kept[section] = len(taken[section]) - len(new[section])
        takes.append((section, taken))
    p2p_from = None
    if "links" in sections and not _p2p_measured(new) and "links" in base:
        p2p_from = base                                # the run's links, the base's p2p
    elif "links" not in sections and _p2p_measured(new) and "links" in base:
        p2p_from = new                                 # the base's links, the run's p2p
    if p2p_from is not None:
        takes.append((P2P, p2p_from))
    if not takes:
        raise ProfileError("the run measured nothing to put onto --base; skip fewer parts")
    out = merge(base, takes, name=name, command=command)
    if p2p_from is not None:                           # what says whether p2p was measured, from where it was
        out["skipped"] = ([s for s in out["skipped"] if not s["part"].startswith(P2P)]
                          + [s for s in p2p_from["skipped"] if s["part"].startswith(P2P)])
    for section, n in kept.items():
        if n:
            out["sources"][section] = (out["sources"].get(section, "measured")
                                       + f"; {n} curves this run did not measure kept from the base {base['name']} "
                                         f"({base['sources'].get(section, 'no source')})")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m aptmoe.calibration.refresh", description=__doc__.splitlines()[0])
    p.add_argument("base", help="the profile to put the run onto (a built-in name or a file)")
    p.add_argument("run", help="a calibration of the same machine that measured some parts (aptmoe-calibrate --skip)")
    p.add_argument("--name", default=None, help="name of the result (default: the base's)")
    p.add_argument("--out", required=True)
    ns = p.parse_args(argv)
    command = "python -m aptmoe.calibration.refresh " + shlex.join(argv if argv is not None else sys.argv[1:])
    measured: list[str] = []

    def build() -> dict:
        base, run = load_profile(ns.base).to_dict(), load_profile(ns.run).to_dict()
        measured.extend(measured_sections(run))
        return onto_base(base, run, name=ns.name or base["name"], command=command)

    doc = write_profile("python -m aptmoe.calibration.refresh", ns.out, build)
    if doc is None:
        return 2
    print(f"wrote {ns.out}: {doc['name']} with what {ns.run} measured ({', '.join(measured)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
