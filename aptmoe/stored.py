"""Stored runs' files, plain or compressed.

A run writes its results.json, traces and profiles plain (Perfetto opens a fresh trace as it
is). A run kept in the repository (docs/: the validation matrices and measured runs) keeps its
results.json, measured traces and calibration profiles xz-compressed instead, and so does a
stored matrix its matrix.json and its cells' validation.json, and docs/ every calibration file
it keeps (`scripts/pack-stored-runs`, and `aptmoe-sim matrix` for the cells it stores); older
stores gzip-compressed traces: the tree is sent whole to the GPU machine, which takes at most
64 MiB. A tool that writes one of those files plain again (`matrix --repredict`) drops the packed
copy beside it (`drop_packed`), which the plain one supersedes.
Readers ask `stored_file` (or `kept`) for the name they expect and read it with `open_text`
(a JSON file: `read_json`), so any of the three forms will do. To open a stored trace in
Perfetto: ``xz -dk trace-X.json.xz``, then the ``trace-X.json`` it leaves.

Only the standard library: the simulator and the calibration read stored runs without torch.
"""

from __future__ import annotations

import gzip
import json
import lzma
import os
import zlib
from pathlib import Path
from typing import IO, Any

__all__ = ["CORRUPT", "MATRIX", "RESULTS", "VALIDATION", "XZ_PRESET", "drop_packed", "is_calibration_file",
           "is_measured_run", "kept", "measured_traces", "open_text", "pack", "plain_name", "read_bytes", "read_json",
           "read_text", "run_source", "stored_file", "stored_run_files"]

# The forms a stored file takes, in the order a reader prefers them: plain first (a fresh run,
# or one unpacked by hand to open in Perfetto), then the gzip of older stores, then xz.
SUFFIXES = ("", ".gz", ".xz")
JSON_FORMS = tuple(".json" + suffix for suffix in SUFFIXES)     # a stored JSON file's names end so

# What reading a corrupt or truncated compressed file raises (a bad header: BadGzipFile or
# LZMAError; bad deflate data: zlib.error; a cut-off file: EOFError). Callers turn them into
# their own one-line errors (TraceError, ProfileError), as they do for bad JSON.
CORRUPT: tuple[type[Exception], ...] = (gzip.BadGzipFile, lzma.LZMAError, zlib.error, EOFError)

# xz's `-9e`: traces are repetitive JSON, and the extreme preset takes ~70% of gzip's bytes.
XZ_PRESET = 9 | lzma.PRESET_EXTREME

PROFILE = "profile.json"              # a matrix cell's: the profile it was predicted with
PLAN_PROFILE = "plan-profile.json"    # a run's: the profile the executor planned with
RESULTS = "results.json"              # a run's: what it measured (or predicted), and how it was run
VALIDATION = "validation.json"        # a matrix cell's: its runs predicted against measured
MATRIX = "matrix.json"                # a matrix's: every cell's runs and the summary
CALIBRATION_SCHEMA = b'"schema": "aptmoe-calibration/'   # how a calibration file begins (aptmoe/profile.py)


def plain_name(path: str | os.PathLike) -> str:
    """The name a tool expects for a stored file: ``trace-X.json`` for ``trace-X.json.xz``."""
    name = Path(path).name
    for suffix in SUFFIXES[1:]:
        if name.endswith(suffix):
            return name[:-len(suffix)]
    return name


def stored_file(path: str | os.PathLike) -> Path | None:
    """The file kept for `path` (the plain name a tool expects, e.g. ``real/plan-profile.json``):
    `path` itself, else its ``.gz``, else its ``.xz``; None where there is none of them."""
    path = Path(path)
    for suffix in SUFFIXES:
        candidate = path.with_name(path.name + suffix)
        if candidate.is_file():
            return candidate
    return None


def kept(path: str | os.PathLike) -> Path:
    """The file to read for `path`: a plain ``.json`` name that is not there reads the compressed
    file a stored run keeps in its place (`stored_file`); any other name, or one kept in no form,
    is itself (so that opening it says it does not exist)."""
    found = stored_file(path) if os.fspath(path).endswith(".json") else None
    return found or Path(path)


def _codec(path: str | os.PathLike):
    """The module (lzma, gzip) that reads `path`'s compression, by its name; None: plain."""
    name = os.fspath(path)
    return lzma if name.endswith(".xz") else gzip if name.endswith(".gz") else None


def open_text(path: str | os.PathLike) -> IO[str]:
    """A text file opened for reading as UTF-8, decompressed where its name ends in .gz or .xz."""
    codec = _codec(path)
    return codec.open(path, "rt", encoding="utf-8") if codec else open(path, encoding="utf-8")


def read_text(path: str | os.PathLike) -> str:
    with open_text(path) as f:
        return f.read()


def read_json(path: str | os.PathLike) -> Any:
    """A JSON file's content, from the form it is kept in (`kept`): ``real/results.json`` reads
    the ``results.json.xz`` a stored run keeps in its place."""
    return json.loads(read_text(kept(path)))


def read_bytes(path: str | os.PathLike) -> bytes:
    """A file's content, decompressed where its name ends in .gz or .xz."""
    data = Path(path).read_bytes()
    codec = _codec(path)
    return codec.decompress(data) if codec else data


# --------------------------------------------------------------------------- storing


def run_source(folder: str | os.PathLike) -> str | None:
    """What a run folder's results.json (plain, .gz or .xz) says made it: "real" (the executor)
    or "sim"; None where it has none, says nothing, or cannot be read."""
    try:
        source = read_json(Path(folder) / RESULTS).get("source")
    except (OSError, ValueError, AttributeError, *CORRUPT):
        return None
    return source if isinstance(source, str) else None


def is_measured_run(folder: str | os.PathLike) -> bool:
    """A folder of an executor's run: a matrix cell's or validate's ``real/``, or a run folder
    whose results.json (in any form) says it was measured (the simulator's say ``sim``, or nothing)."""
    return Path(folder).name == "real" or run_source(folder) == "real"


def measured_traces(folder: str | os.PathLike) -> list[Path]:
    """The measured traces kept in a run's folder, in any form: ``trace-X.json``, ``.json.gz``
    and ``.json.xz``, not the simulator's ``trace-X-predicted.json`` beside a matrix cell's."""
    return sorted(p for p in Path(folder).glob("trace-*.json*")
                  if p.is_file() and p.name.endswith(JSON_FORMS)
                  and not plain_name(p).endswith("-predicted.json"))


def is_calibration_file(path: str | os.PathLike) -> bool:
    """Whether a .json file (in any form) is a calibration profile: its text begins with the
    profile's schema. Unreadable or corrupt: not one."""
    try:
        with open_text(path) as f:
            head = f.read(200).encode()
    except (OSError, UnicodeDecodeError, *CORRUPT):
        return False
    return CALIBRATION_SCHEMA in head


def stored_run_files(root: str | os.PathLike) -> list[Path]:
    """What a store keeps compressed under `root` (any form, packed or not): every measured
    run's traces, its plan-profile.json and its results.json (a results.json.xz still marks
    its folder as a measured run); each matrix cell's profile.json and validation.json
    (``cells/<cell>/``) and each matrix's matrix.json (beside its ``cells/``); and every other
    calibration profile (`is_calibration_file`: a lease's, a probe's)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        folder = Path(dirpath)
        jsons = sorted(folder / n for n in filenames if n.endswith(JSON_FORMS))     # not a .partial
        mine: list[Path] = []
        if is_measured_run(folder):
            mine += measured_traces(folder)
            mine += [p for p in jsons if plain_name(p) in (PLAN_PROFILE, RESULTS)]
        if folder.parent.name == "cells":
            mine += [p for p in jsons if plain_name(p) in (PROFILE, VALIDATION)]
        if "cells" in dirnames:
            mine += [p for p in jsons if plain_name(p) == MATRIX]
        taken = set(mine)
        # the rest, but a run's results and traces (not profiles, and large), by their schema
        out += mine + [p for p in jsons if p not in taken and plain_name(p) != RESULTS
                       and not plain_name(p).startswith("trace-") and is_calibration_file(p)]
    return out


def drop_packed(path: str | os.PathLike) -> None:
    """`path` was just written plain: remove the .gz and .xz a store kept of it, which it supersedes
    (a repredicted matrix rewrites its cells' validation.json and its matrix.json)."""
    path = Path(path)
    for suffix in SUFFIXES[1:]:
        path.with_name(path.name + suffix).unlink(missing_ok=True)


def pack(path: str | os.PathLike) -> tuple[int, int]:
    """Replace a plain or gzip file by the xz of its (plain) content, named ``<plain name>.xz``;
    the original is deleted only after the new file was read back equal to it. An .xz is left
    as it is. Returns (bytes before, bytes after)."""
    path = Path(path)
    before = path.stat().st_size
    if path.name.endswith(".xz"):
        return before, before
    content = read_bytes(path)
    target = path.with_name(plain_name(path) + ".xz")
    partial = target.with_name(target.name + ".partial")
    try:
        partial.write_bytes(lzma.compress(content, preset=XZ_PRESET))
        if lzma.decompress(partial.read_bytes()) != content:
            raise ValueError(f"{partial}: its xz does not read back as {path}'s content")
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, target)        # a crash before the unlink leaves both, alike: a rerun packs again
    path.unlink()
    return before, target.stat().st_size
