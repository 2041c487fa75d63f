"""aptmoe: affinity-aware pipeline tuning for MoE fine-tuning on bandwidth-constrained GPU nodes."""

import importlib.metadata as _metadata


def version() -> str:
    """The installed aptmoe version (recorded in calibration files and results)."""
    try:
        return _metadata.version("aptmoe")
    except _metadata.PackageNotFoundError:
        return "unknown"
