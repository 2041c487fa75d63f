"""Output helpers shared by ``aptmoe-sim`` and its sweeps: tables, CSV rows, output folders.

Nothing here simulates; it formats what `aptmoe.sim.simulate` returns. Metric keys are the
simulator's own (docs/metrics.md).
"""

from __future__ import annotations

import csv
import datetime
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Iterable, Mapping, Sequence

# results.csv / sweep.csv: these first, then every metric key in sorted order.
SUMMARY_KEYS = ("pipeline", "num_stages", "iteration_s", "throughput_seq_per_s", "oom", "peak_gpu_bytes",
                "speedup_vs_mobius", "oom_detail")


class OutputFolderError(ValueError):
    """An --out folder that cannot be written: refused before any work is done."""


class OutputExistsError(OutputFolderError):
    pass


class StagedDir:
    """An output folder that appears complete or not at all.

    Files are written into a hidden temporary folder next to the target, renamed onto it
    on success and removed on failure, together with any parent folders it had to create.
    An existing empty target is replaced; an existing non-empty one is refused up front, and
    so is one that could not be made (under a file, or where its nearest existing folder takes
    no new folder: tried then, not after the run's work).
    """

    def __init__(self, target: str | os.PathLike) -> None:
        self.target = Path(target)
        if self.target.exists() and (not self.target.is_dir() or any(self.target.iterdir())):
            raise OutputExistsError(f"--out {self.target} already exists and is not empty; choose another folder")
        parent = self.target.absolute().parent
        near = next(p for p in (parent, *parent.parents) if p.exists())
        if not near.is_dir():
            raise OutputFolderError(f"--out {self.target}: {near} is a file, not a folder; choose another folder")
        try:                # permissions say too little (root, read-only mounts, /proc): make one
            os.rmdir(tempfile.mkdtemp(dir=near, prefix=".aptmoe-probe-"))
        except OSError as e:
            raise OutputFolderError(f"--out {self.target}: cannot make a folder in {near} "
                                    f"({e.strerror or e}); choose another folder") from None
        self._made: list[Path] = []
        self.tmp: Path | None = None

    def __enter__(self) -> Path:
        missing = []
        p = self.target.absolute().parent
        while not p.exists():
            missing.append(p)
            p = p.parent
        for d in reversed(missing):
            d.mkdir()
            self._made.append(d)
        self.tmp = Path(tempfile.mkdtemp(dir=self.target.absolute().parent, prefix=f".{self.target.name}.partial-"))
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        assert self.tmp is not None
        if exc_type is None:
            try:
                if self.target.is_dir():
                    self.target.rmdir()          # empty, checked in __init__
                _normal_permissions(self.tmp)
                os.rename(self.tmp, self.target)
                return
            except BaseException:
                self._cleanup()
                raise
        self._cleanup()

    def _cleanup(self) -> None:
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
        for d in reversed(self._made):
            try:
                d.rmdir()
            except OSError:
                break


def _normal_permissions(folder: Path) -> None:
    """mkdtemp/mkstemp make owner-only files; give the results the usual umask permissions."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for p in folder.rglob("*"):
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~umask)


def progress_bar(**kw):
    """A tqdm bar on stderr that leaves no trace when done (tqdm: rate, ETA and redraws that a
    hand-written counter would get wrong on a narrow or non-interactive terminal)."""
    from tqdm import tqdm

    return tqdm(file=sys.stderr, leave=False, **kw)


def progress_disabled(quiet: bool) -> bool:
    return quiet or not sys.stderr.isatty()


def timestamp() -> str:
    return datetime.datetime.now().strftime("%Y%m%d-%H%M%S")


def first_line(exc: BaseException | str) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# --------------------------------------------------------------------------- formatting


def fmt(value, spec: str = ".3g", missing: str = "-") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return missing
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)):
        return format(value, spec)
    return str(value)


def format_table(headers: Sequence[str], rows: Iterable[Sequence[str]], right: Sequence[bool] | None = None) -> str:
    rows = [list(map(str, r)) for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    right = right or [i > 0 for i in range(len(headers))]

    def line(cells):
        return "  ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right)).rstrip()

    out = [line(headers), line(["-" * w for w in widths])]
    out.extend(line(r) for r in rows)
    return "\n".join(out)


def schedule_table(results: Mapping[str, Mapping]) -> str:
    """One row per schedule, from `SimResult.to_dict()` plus ``speedup_vs_mobius``."""
    headers = ["pipeline", "stages", "s/step", "seq/s", "tok/s", "peak GPU GB", "compute %", "h2d %", "cpu %",
               "CPU experts %", "OOM", "vs Mobius"]
    rows = []
    for name, r in results.items():
        m = r.get("metrics") or {}

        def pct(key):
            v = m.get(key)
            return fmt(None if v is None else 100 * v, ".1f")

        rows.append([name, fmt(r.get("num_stages")), fmt(r.get("iteration_s"), ".3f"),
                     fmt(r.get("throughput_seq_per_s"), ".2f"), fmt(m.get("throughput/tok_per_s"), ",.0f"),
                     fmt(r["peak_gpu_bytes"] / 1e9, ".1f"), pct("busy/compute"), pct("busy/h2d"), pct("busy/cpu"),
                     pct("cpu/expert_share"), "OOM" if r.get("oom") else "no",
                     fmt(r.get("speedup_vs_mobius"), ".2f") + ("x" if r.get("speedup_vs_mobius") else "")])
    text = format_table(headers, rows)
    notes = [f"  {name}: {r['oom_detail']}" for name, r in results.items() if r.get("oom") and r.get("oom_detail")]
    if notes:
        text += "\nout of memory:\n" + "\n".join(notes)
    return text


def speedups(results: Mapping[str, Mapping], reference: str = "Mobius") -> dict[str, float | None]:
    """Throughput relative to `reference` (None where either side has no throughput)."""
    ref = (results.get(reference) or {}).get("throughput_seq_per_s")
    return {name: (r["throughput_seq_per_s"] / ref if ref and r.get("throughput_seq_per_s") else None)
            for name, r in results.items()}


def flat_row(result: Mapping) -> dict:
    """A `SimResult.to_dict()` (plus extras) as one flat CSV row; metrics keep their keys."""
    row = {k: result.get(k) for k in SUMMARY_KEYS if k in result}
    for k, v in (result.get("metrics") or {}).items():
        row[k] = v
    return row


def write_csv(path: str | os.PathLike, rows: Sequence[Mapping], first: Sequence[str] = SUMMARY_KEYS) -> None:
    """Columns: `first` (those present), then every other key in first-seen order."""
    cols: list[str] = [k for k in first if any(k in r for r in rows)]
    for r in rows:
        for k in r:
            if k not in cols:
                cols.append(k)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: _csv_value(r.get(k)) for k in cols})


def _csv_value(v):
    if v is None:
        return ""
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return ";".join(map(str, v))
    return v


def short_fallbacks(fallbacks: Sequence[str], limit: int = 3) -> str:
    """One short line: how many cost figures are not measured, and which (labels only)."""
    if not fallbacks:
        return "every cost figure comes from measured calibration data"
    labels = [f.split(":", 1)[0] for f in fallbacks]
    more = f", ... {len(labels) - limit} more" if len(labels) > limit else ""
    return f"{len(fallbacks)} cost figures not measured ({', '.join(labels[:limit])}{more}; see fallbacks.txt)"
