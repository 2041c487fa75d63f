"""Does the CPU's work run slower on pinned host memory than on pageable? Side by side.

The executor keeps parameters and gradients pinned where there is a GPU; the calibration
timed CPU experts and Adam on pageable memory until session 6, and in the H200 runs the
executor's Adam chunks took 0.284-0.305 ns/param against the profile's 0.229. This times the
two workloads of `calibration/host_memory.py` (one token through the next MoE-M expert of a
768 MiB pool; one Adam call on the next 4 M-parameter block of a pool) on each kind of
memory, alternating, and prints the medians and their ratio.

    python -m aptmoe.calibration.pinned_bench [--threads 14] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

from aptmoe.calibration import host_memory as hm
from aptmoe.exec.host_stream import median_call


def _streams(pinned: bool):
    """The expert stream and the Adam stream on pinned or pageable memory."""
    host = (lambda t: t.pin_memory()) if pinned else (lambda t: t)
    return hm.expert_stream(host), hm.adam_stream(host)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m aptmoe.calibration.pinned_bench", description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--rounds", type=int, default=3)
    ns = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("pinned_bench: pinned memory needs a CUDA GPU; nothing to compare here", file=sys.stderr)
        return 2
    torch.set_num_threads(ns.threads)
    kinds = {"pageable": _streams(False), "pinned": _streams(True)}
    got: dict[str, dict[str, list[float]]] = {k: {"expert": [], "adam": []} for k in kinds}
    for _ in range(ns.rounds):
        for kind, ((expert, nbytes), (adam, params)) in kinds.items():
            got[kind]["expert"].append(nbytes / median_call(expert) / 1e9)
            got[kind]["adam"].append(median_call(adam) / params * 1e9)
    print(f"{ns.threads} threads, medians of {ns.rounds} rounds of {hm.SAMPLES} calls:")
    for kind, g in got.items():
        print(f"  {kind:9s} expert stream {statistics.median(g['expert']):6.1f} GB/s   "
              f"Adam {statistics.median(g['adam']):.3f} ns/param")
    ratio = statistics.median(got["pinned"]["adam"]) / statistics.median(got["pageable"]["adam"])
    print(f"  Adam pinned / pageable: {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
