"""Combine calibration files section by section, keeping every figure's provenance.

    python -m aptmoe.calibration.merge BASE.json --take gpu=ONE_GPU.json --out h200.json

Why: the links and socket roots of a host can only be measured on the machine with all
its GPUs, while the GPU block curves need one GPU; measuring them in separate (shorter)
runs and merging is cheaper than one long run. Sections: links, gpu, cpu_expert, adam, dispatch.
The merged file takes each named section, its `sources` entries, its `skipped` entries and
the roofline fields derived from it from the other file; `made_by.command` lists every
command involved, so the result still says exactly how it was produced: the base's history,
then for each section taken the command that measured it (where the other file is itself a
merge, the entry of its own history that brought that section in, not the whole history), then
this merge. `SECTION.FIELD=FILE` takes one field of a section and keeps the rest of the base's
(a figure measured again on its own, say `issue_tolls.adam_factor`), its source noted beside
the section's.
"""

from __future__ import annotations

import argparse
import datetime
import shlex
import sys
from collections.abc import Callable

from aptmoe import version
from aptmoe.profile import ProfileError, load_profile

SECTIONS = ("links", "gpu", "cpu_expert", "adam", "dispatch", "host_memory", "issue_tolls", "pacer", "recv_wait",
            "cpu_job", "policy_host")
# roofline fields measured from each section (calibration/profiler.py's overrides)
ROOFLINE_FIELDS = {
    "links": ("h2d", "d2h", "root_GBps", "p2p_intra"),
    "gpu": ("gpu_tflops_fp32", "gpu_tflops_bf16"),
    "cpu_expert": ("cpu_gflops_per_core_fp32", "cpu_gflops_per_core_bf16"),
    "adam": ("cpu_adam_params_per_s_per_core", "gpu_adam_params_per_s"),
    "dispatch": (),
    "host_memory": (),
    "issue_tolls": (),
    "pacer": (),
    "recv_wait": (),
    "cpu_job": (),
    "policy_host": (),
}


def _in_section(key: str, section: str) -> bool:
    return key == section or key.startswith(section + ".")


SEP = " | "


def producer(doc: dict, section: str) -> str:
    """The command (with the machine and date) that measured `section` of the profile `doc`:
    the last entry of its history that took that section from another run, else its first
    command, which measured everything it did not skip."""
    history = doc["made_by"]["command"].split(SEP)
    prefix = f"{section} from: "
    for entry in reversed(history):
        if entry.startswith(prefix):
            return entry[len(prefix):]
    return history[0] if len(history) > 1 else _measured(doc)     # a merge's first entry says where and when


def made_by(commands: list[str]) -> dict:
    """A written profile's `made_by`: this aptmoe, its history of commands (joined by SEP), now."""
    return {"tool": f"aptmoe {version()}", "command": SEP.join(commands),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def history(doc: dict) -> str:
    """How the profile `doc` was made: a merge's (or pool's) history as it stands, a measured
    file's command with its machine and date."""
    cmd = doc["made_by"]["command"]
    return cmd if SEP in cmd else _measured(doc)


def _measured(doc: dict) -> str:
    """A measured (not merged) file's command with its machine and date."""
    hw = doc["hardware"]
    return f"{doc['made_by']['command']} ({hw['gpu_count']}x {hw['gpu_name']}, {doc['made_by']['date']})"


def merge(base: dict, takes: list[tuple[str, dict]], *, name: str, command: str) -> dict:
    """`base` with each (section, other) taken from other; plain JSON dicts in, one out."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
    out["skipped"] = list(base["skipped"])
    commands = [history(base)]
    for section, other in takes:
        if "." in section:                      # one field of a section, the rest of it kept
            part, field = section.split(".", 1)
            if part not in out or field not in other.get(part, {}):
                raise ProfileError(f"--take {section}: the base needs a {part} section and the other file "
                                   f"its {field}")
            out[part] = {**out[part], field: other[part][field]}
            made = producer(other, part)
            commands.append(f"{section} from: {made}")
            before = out["sources"].get(part)
            out["sources"][part] = (f"{before}; " if before else "measured: ") + f"{field} from a run of {made!r}"
            continue
        if section in other:
            out[section] = other[section]
        else:                                   # an optional section the other file lacks
            out.pop(section, None)
        out["sources"] = {k: v for k, v in out["sources"].items() if not _in_section(k, section)}
        out["sources"].update({k: v for k, v in other["sources"].items() if _in_section(k, section)})
        out["skipped"] = [s for s in out["skipped"] if not _in_section(s["part"], section)]
        out["skipped"] += [s for s in other["skipped"] if _in_section(s["part"], section)]
        for f in ROOFLINE_FIELDS[section]:
            out["roofline"][f] = other["roofline"][f]
        made = producer(other, section)
        commands.append(f"{section} from: {made}")
        commands_note = f"merged: {section} from a run of {made!r}"
        out["sources"]["roofline"] = out["sources"].get("roofline", "derived") + f"; {commands_note}"
    commands.append(command)
    out["name"] = name
    out["made_by"] = made_by(commands)
    return out


def put_onto(prog: str, profile: str, out: str, section: str, change: Callable[[dict], None], note: str,
             command: str, missing: str) -> dict | None:
    """PROFILE with `change` made to its `section` (a dict, changed in place), `note` added to
    that section's source and `command` to its history, written to `out` (`write_profile`);
    None after one line on stderr where PROFILE is bad or has no such section (`missing`: what
    to do then, e.g. "calibrate its tolls part first")."""
    def build() -> dict:
        doc = load_profile(profile).to_dict()
        if doc.get(section) is None:
            raise ProfileError(f"{profile} has no {section} section to put {missing}")
        change(doc[section])
        doc["sources"][section] = "; ".join(x for x in (doc["sources"].get(section), note) if x)
        doc["made_by"] = made_by([history(doc), command])
        return doc

    return write_profile(prog, out, build)


def write_profile(prog: str, out: str, build: Callable[[], dict]) -> dict | None:
    """The profile `build()` makes, saved to `out` (atomically, validated) and returned; None
    after one line on stderr where an input or the result is bad (no file then)."""
    from aptmoe.profile import Profile
    try:
        doc = build()
        Profile.from_dict(doc, out).save(out)
        return doc
    except (ProfileError, OSError) as e:
        print(f"{prog}: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m aptmoe.calibration.merge", description=__doc__.splitlines()[0])
    p.add_argument("base", help="calibration file whose other sections are kept")
    p.add_argument("--take", action="append", default=[], metavar="SECTION=FILE",
                   help=f"take SECTION ({', '.join(SECTIONS)}) from FILE, or SECTION.FIELD=FILE one field of "
                        f"it (issue_tolls.adam_factor); repeatable")
    p.add_argument("--name", default=None, help="name of the merged profile (default: the base's)")
    p.add_argument("--out", required=True)
    ns = p.parse_args(argv)
    argv_text = "python -m aptmoe.calibration.merge " + shlex.join(argv if argv is not None else sys.argv[1:])
    names: list[str] = []                       # the base's, for the line that says what was written

    def build() -> dict:
        base = load_profile(ns.base).to_dict()
        names.append(base["name"])
        takes = []
        for item in ns.take:
            section, _, path = item.partition("=")
            if section.split(".", 1)[0] not in SECTIONS or not path:
                raise ProfileError(f"--take {item!r}: use SECTION=FILE (or SECTION.FIELD=FILE, one field) with "
                                   f"SECTION one of {', '.join(SECTIONS)}")
            takes.append((section, load_profile(path).to_dict()))
        return merge(base, takes, name=ns.name or base["name"], command=argv_text)

    if write_profile("aptmoe-calibrate merge", ns.out, build) is None:
        return 2
    print(f"wrote {ns.out}: {names[0]} with " + ", ".join(f"{s} from {f}" for s, f in
                                                          (t.partition('=')[::2] for t in ns.take)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
