"""How late the capped link's pacing thread wakes (`pacer`).

A capped link (exec/link.py) paces each copy in chunks: the copying thread sleeps until a
chunk's slot and, after the last one, until the copy's slot has passed, so that a copy of N
bytes takes N / cap. Each sleep ends late: Linux's timer slack (50 us by default) and the
thread's wake-up. The end of a copy is its last sleep's end, so every capped copy takes one
such lateness more than its bytes over the cap, and the next copy of that thread starts no
sooner (the copy engine and the offload thread pace their own copies). On the 2-core
development machine a sleep of 0.5-1.3 ms ended 71-75 us late, and the CPU validation's
capped loads (64 KiB at 0.05 GB/s, 1.31 ms) measured 5.3-5.4% over their prediction: 5.7%
is 75 us. The simulator adds it to every capped copy (sim/engine.py).

    python -m aptmoe.calibration.pacer
"""

from __future__ import annotations

import statistics
import time

SLEEP_S = 0.5e-3            # a 4 MiB chunk at 8 GB/s
SAMPLES = 200


def measure_pacer_late(samples: int = SAMPLES, sleep_s: float = SLEEP_S) -> float:
    """The median of how late `time.sleep(sleep_s)` returns in this thread, in seconds."""
    late = []
    for _ in range(samples):
        t = time.perf_counter()
        time.sleep(sleep_s)
        late.append(time.perf_counter() - t - sleep_s)
    return max(0.0, statistics.median(late))


if __name__ == "__main__":
    print(f"a {SLEEP_S * 1e3:g} ms sleep ends {measure_pacer_late() * 1e6:.1f} us late (median of {SAMPLES})")
