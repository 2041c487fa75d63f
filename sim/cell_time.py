"""How long a matrix cell will take, from the cells stored before it (`matrix --budget-s`).

A matrix writes a cell whole or not at all (a cut-off cell leaves nothing), and the GPU machine
gives a call ten minutes: in session 38 a call lost 550 s to an L cell stopped at 340 s (the
last L cell had taken 400) and an S cell given 210 s (they take 220-260). A cell's `cell.json`
keeps its wall time; a cell like it, whose validate command is the same but for G and the
profile, takes about as long (the model, depth, experts, GPUs, link, steps and repeats set it).
"""

from __future__ import annotations

import json
from pathlib import Path

MARGIN = 1.1            # over the longest like cell: the same work moved 10% from lease to lease


def run_args(command: list[str], also: tuple[str, ...] = ()) -> tuple[str, ...]:
    """A cell's validate command (or the executor arguments it ran) as the run it makes: less the
    profile's name and the placements' replay, which only the prediction reads, and less the flags
    `also` with their values. `aptmoe-sim floor` takes cells alike in these (and in their plans)
    for the same work measured again."""
    out, skip = [], False
    for a in command[2:] if command[:2] == ["aptmoe-sim", "validate"] else command:
        if skip:
            skip = False
        elif a in ("--calibration", *also):
            skip = True
        elif a != "--replay-placements":
            out.append(a)
    return tuple(out)


def _work(command: list[str]) -> tuple[str, ...]:
    """A validate command's arguments less the profile, the placements' replay and G."""
    return run_args(command, also=("--gini",))


def stored_cell_times(folders: list[Path]) -> dict[tuple[str, ...], list[float]]:
    """Each kind of work (`_work` of a cell's command) -> the wall seconds of the stored cells
    that did it, over the matrix folders given (cells without a wall time are left out)."""
    times: dict[tuple[str, ...], list[float]] = {}
    for folder in folders:
        for cell in sorted(Path(folder).glob("cells/*/cell.json")):
            try:
                doc = json.loads(cell.read_text())
                wall, command = float(doc["wall_s"]), list(doc["command"])
            except (OSError, ValueError, KeyError, TypeError):
                continue                     # an older or damaged cell: it tells nothing of time
            times.setdefault(_work(command), []).append(wall)
    return times


def expected_s(run_argv: list[str], times: dict[tuple[str, ...], list[float]]) -> float | None:
    """How long a cell whose executor arguments are `run_argv` should take: the longest like
    cell's wall time, with MARGIN; None where no stored cell did the same work."""
    like = times.get(_work(run_argv))
    return max(like) * MARGIN if like else None
