"""calibration/cpu_jobs.py: what a CPU job waits beyond its copies and its experts, read from
the executor's own trace; and the calibration part that takes it."""

from __future__ import annotations

import pytest

from aptmoe.trace import Trace

pytest.importorskip("torch")

from aptmoe.calibration import cpu_jobs  # noqa: E402

PHASES_US = {"queue_us": 100.0, "ready_us": 10.0, "down_us": 200.0, "compute_us": 700.0, "up_us": 140.0}


def _steps(n: int = 6, job: bool = True) -> Trace:
    """Rank 0's forward `0F0` of three layers in each of `n` steps: layer 0 hands a job over
    (1.15 ms, its outputs 0.4 ms before layer 1's first call), layer 1 has none (0.1 ms from its
    last expert to layer 2's first call), layer 2 ends the action."""
    t = Trace("real")
    for s in range(n):
        at = s * 0.1
        ms = lambda x: at + x * 1e-3          # noqa: E731
        t.add("0F0", 0, "compute", at, ms(10), "forward")
        for layer, a0, e0 in ((0, 0.0, 0.5), (1, 1.9, 2.2), (2, 2.5, 2.8)):
            t.add(f"0F0@{layer}:a", 0, "compute", ms(a0), ms(a0 + 0.1), "forward", host_us=50.0, layer=layer)
            t.add(f"0F0@{layer}:g", 0, "compute", ms(a0 + 0.1), ms(a0 + 0.2), "forward", host_us=50.0, layer=layer)
            t.add(f"0F0@{layer}:e0", 0, "compute", ms(e0), ms(e0 + 0.2), "forward", host_us=50.0, layer=layer)
        if job:
            t.add("0F0@0:cpu", 0, "cpu-jobs", ms(0.35), ms(1.5), "cpu-job", layer=0, experts=[7], tokens=4,
                  of="cpu-expert", **PHASES_US)
    return t


def test_the_waits_are_the_phases_medians_and_the_resume_over_a_layer_without_a_job() -> None:
    got = cpu_jobs.cpu_job_from_trace(_steps())
    assert got.take_s == pytest.approx(110e-6) and got.down_s == pytest.approx(200e-6)
    assert got.up_s == pytest.approx(140e-6)
    # 0.4 ms from the outputs to layer 1's first call, less layer 1's 0.1 ms to layer 2's; the
    # last layer's expert and the next step's first call are not a pair
    assert got.resume_s == pytest.approx(0.3e-3)


def test_a_probe_with_too_few_jobs_is_refused_in_words() -> None:
    with pytest.raises(ValueError, match="no expert on the CPU"):
        cpu_jobs.cpu_job_from_trace(_steps(job=False))
    with pytest.raises(ValueError, match="it had 3 and 3"):
        cpu_jobs.cpu_job_from_trace(_steps(3))


def test_the_calibration_lists_a_refused_probe_under_skipped(monkeypatch) -> None:
    from aptmoe.calibration import profiler

    def refuse():
        raise ValueError("the CPU-job probe put no expert on the CPU")

    monkeypatch.setattr(profiler, "measure_cpu_job", refuse)
    m = profiler.Measured()
    profiler._measure_cpu_job(m)
    assert m.cpu_job is None and "no expert on the CPU" in m.cpu_job_refused
