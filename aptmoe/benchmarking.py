"""Shared pieces of the benchmark commands: timing a command, naming the machine, and
replacing one marked section of BENCHMARKS.md so each command refreshes only its own."""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path


def time_command(cmd: list[str], log: Path | None = None) -> float:
    """Wall seconds of one run of `cmd` (its output discarded, or written with its errors to
    `log`; a failure raises)."""
    t = time.perf_counter()
    if log is None:
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    else:
        with log.open("w") as f:
            subprocess.run(cmd, check=True, stdout=f, stderr=subprocess.STDOUT)
    return time.perf_counter() - t


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def commit() -> str:
    """$APTMOE_COMMIT if set, else HEAD's short hash. The variable comes first because the
    device machine's copy of the tree can carry a stale .git: on 2026-11-30 git there named
    the session's starting commit, not the one the tree was copied from."""
    if os.environ.get("APTMOE_COMMIT"):
        return os.environ["APTMOE_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        out = ""
    return out or "uncommitted"


def machine_line(with_date: bool = True) -> str:
    date = f"date {datetime.date.today().isoformat()}; " if with_date else ""
    return (f"Machine: {cpu_model()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
            f"{date}commit {commit()}.")


def table_rows(rows: list[tuple[str, list[float]]], targets: dict[str, str]) -> list[str]:
    out = ["| case | median (s) | runs (s) | target |", "|---|---|---|---|"]
    for name, times in rows:
        out.append(f"| {name} | {statistics.median(times):.2f} | "
                   f"{', '.join(f'{t:.2f}' for t in times)} | {targets.get(name, '')} |")
    return out


def write_section(path: Path, section: str, start: str, end: str) -> None:
    """Replace the text between the `start` and `end` markers (append if absent)."""
    text = path.read_text() if path.exists() else "# Benchmarks\n\n"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        tail = rest.split(end, 1)[1].lstrip("\n")
        text = head + section + ("\n" + tail if tail else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)
