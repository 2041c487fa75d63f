"""The cores this process may run on: one reading for the executor, the calibration and the
benchmarks, which bind to them and size their thread pools from them."""

from __future__ import annotations

import os

import psutil


def allowed_cores() -> list[int]:
    """The cores this process may run on, sorted (all of them where the OS has no affinity)."""
    try:
        return sorted(psutil.Process().cpu_affinity())
    except (AttributeError, psutil.Error):          # macOS has no affinity
        return list(range(os.cpu_count() or 1))
