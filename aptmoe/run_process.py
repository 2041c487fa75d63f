"""`aptmoe-run` as a child process: how the simulator's validation and the calibration's
dispatch probe run the executor without importing torch into their own process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


class ExecutorFailed(RuntimeError):
    """aptmoe-run exited with an error: its last line says why."""


def launch_executor(args: list[str], out: Path, ok: tuple[int, ...] = (0,)) -> None:
    """Run `aptmoe-run ARGS --out OUT`; any exit status outside `ok` raises ExecutorFailed
    with the child's last line on stderr."""
    # -P: a repository root as the working directory would shadow an installed aptmoe package
    cmd = [sys.executable, "-P", "-m", "aptmoe.run", *args, "--out", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode not in ok:
        tail = (res.stderr.strip().splitlines() or ["no message"])[-1]
        raise ExecutorFailed(f"aptmoe-run failed (exit {res.returncode}): {tail}")
