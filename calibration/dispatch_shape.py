"""A profile's dispatch at its own level, in the shape newer probe runs measure it.

    python -m aptmoe.calibration.dispatch_shape PROFILE RUN [RUN ...] --out FILE

Since session 33 the dispatch probe sets an action's own host work apart from its layers'
(`Dispatch.action`: each pass's start and end, the first stage's embedding and the last
stage's loss), where a profile calibrated before holds it all in `between`, spread over the
probe's four layers. Re-calibrating would also take the new lease's host speed, which moves
0.5-1x from one lease to the next (docs/measured/session32): two changes at once. This makes
the structural one alone. Each RUN is an `aptmoe-run` folder of the probe (its results.json
and GPipe trace, from an executor that keeps `embed_us` and `head_us`). The runs' figures,
`between` and `action`, each the median over the runs, are scaled pass by pass so that the
probe's own stage (its layers in one stage, first and last at once) costs what the profile
charged it: the profile's `between` times the layers, over what the runs' figures charge it
(the recompute's and the backward's together where the profile holds the recompute in
`bwd`). Only stages of other depths, and first or last ones apart, move. The block calls'
figures (`seconds`) are left as they are.

With `--own-level` the runs' figures are taken as they are, block calls too, at the level of
the host they ran on: a lease's own dispatch, to predict that lease's runs with beside the
shipped profile (the profile's message posts kept where the runs, on one rank, have none).
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import statistics
import sys
from pathlib import Path

from aptmoe.calibration.dispatch import dispatch_from_trace, has_ends, median_dispatch, parts, probe_run_trace
from aptmoe.calibration.merge import history, made_by, write_profile
from aptmoe.profile import Dispatch, ProfileError, load_profile
from aptmoe.trace import Trace


def _trace(run: Path) -> Trace:
    """A probe run's GPipe trace (or its .xz), with the host's speed its result recorded."""
    try:
        tr = probe_run_trace(run)
    except (OSError, ValueError, KeyError) as e:
        raise ProfileError(f"{run}: not a dispatch probe's run ({e})") from None
    if not has_ends(tr):
        raise ProfileError(f"{run}: its trace has no embedding or loss times (embed_us, head_us): run the probe "
                           f"with an executor of session 33 or later")
    return tr


def read_runs(runs: list[Path], device: str) -> tuple[Dispatch, int]:
    """Today's reading of the runs' traces (each figure the median over the runs), and how many
    layers the probe's stage has (its forwards' median)."""
    disp, layers = [], []
    for run in runs:
        tr = _trace(run)
        disp.append(dispatch_from_trace(tr, device))
        layers += [len({b.args.get("layer") for b in calls}) for p, _, _, calls, _ in parts(tr) if p == "fwd"]
    if not layers:
        raise ProfileError("the runs' traces hold no forward action with block calls")
    return median_dispatch(disp), round(statistics.median(layers))


def reshape(profile: Dispatch, new: Dispatch, layers: int) -> Dispatch:
    """`profile`'s dispatch with its `between` split into `between` and `action` as `new`
    splits it, each pass at the profile's level: the probe's own stage of `layers` layers,
    first and last at once, costs what the profile charged it (module docstring)."""
    if profile.action is not None:
        raise ProfileError("the profile's dispatch has its actions apart already (dispatch.action)")
    if new.action is None:
        raise ProfileError("the runs do not set their actions apart: nothing to reshape with")

    def stage(passes: tuple[str, ...]) -> float:
        """What the new figures charge the probe's stage in `passes`, outside its block calls."""
        return sum(layers * new.between.get(p, 0.0) + sum(new.action.get(p, {}).values()) for p in passes)

    # the profile's bwd holds a recompute's layers too where it has no rec of its own
    groups = [("fwd",), ("rec",), ("bwd",)] if "rec" in profile.between else [("fwd",), ("rec", "bwd")]
    if profile.combine and (lacking := sorted(set(profile.combine) - set(new.between))):
        raise ProfileError(f"the profile's combine has a {', '.join(lacking)} pass the runs do not: "
                           "its between figure would have nothing left to hold it")
    factor = {}
    for g in groups:
        if not any(p in new.between or p in new.action for p in g):
            continue
        if g[-1] not in profile.between or stage(g) <= 0:
            raise ProfileError(f"the profile and the runs share no {'+'.join(g)} pass to set the runs' level by")
        factor.update(dict.fromkeys(g, layers * profile.between[g[-1]] / stage(g)))
    return dataclasses.replace(
        profile, between={p: v * factor[p] for p, v in new.between.items()},
        action={p: {k: v * factor[p] for k, v in a.items()} for p, a in new.action.items()},
        # a combine measured the old way ends at the action's end; the new probe's does not
        combine=None if profile.combine is None else {p: min(v, new.between[p] * factor[p])
                                                      for p, v in profile.combine.items()})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m aptmoe.calibration.dispatch_shape",
                                description=__doc__.splitlines()[0])
    p.add_argument("profile", help="the calibration file whose dispatch to reshape")
    p.add_argument("runs", nargs="+", type=Path, help="aptmoe-run folders of the dispatch probe (results.json, "
                                                      "trace-GPipe.json or .json.xz)")
    p.add_argument("--out", required=True)
    p.add_argument("--own-level", action="store_true",
                   help="the runs' own figures at their host's level (a lease's dispatch), not the profile's "
                        "figures reshaped")
    ns = p.parse_args(argv)
    text = "python -m aptmoe.calibration.dispatch_shape " + shlex.join(argv if argv is not None else sys.argv[1:])

    def build() -> dict:
        prof = load_profile(ns.profile)
        if prof.dispatch is None:
            raise ProfileError(f"{ns.profile} has no dispatch section to reshape")
        new, layers = read_runs(ns.runs, prof.dispatch.device)
        runs = ", ".join(str(r) for r in ns.runs)
        if ns.own_level:
            doc = dataclasses.replace(prof, dispatch=dataclasses.replace(
                new, post=new.post or prof.dispatch.post)).to_dict()
            doc["sources"]["dispatch"] = (f"measured: each figure the median of {len(ns.runs)} dispatch probe runs "
                                          f"({new.samples} block calls) at their host's own level "
                                          f"(calibration/dispatch_shape.py --own-level): {runs}")
            doc["sources"].pop("dispatch.action", None)
        else:
            doc = dataclasses.replace(prof, dispatch=reshape(prof.dispatch, new, layers)).to_dict()
            doc["sources"]["dispatch.action"] = (
                f"derived: the profile's between split as {len(ns.runs)} probe runs of {new.samples} block calls "
                f"split theirs, at the profile's level (calibration/dispatch_shape.py): " + runs)
        doc["made_by"] = made_by([history(prof.to_dict()), text])
        return doc

    doc = write_profile("aptmoe-calibrate dispatch_shape", ns.out, build)
    if doc is None:
        return 2
    d = doc["dispatch"]
    us = {p: round(v * 1e6) for p, v in d["between"].items()}
    level = "the runs' own level" if ns.own_level else "the profile's level"
    print(f"wrote {ns.out}: {doc['name']}, between {us} us a layer at {level}, the actions' own work apart "
          f"(dispatch.action)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
