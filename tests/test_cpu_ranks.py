"""calibration/cpu_ranks.py: CPU experts timed on every rank's CPU worker at once."""

from __future__ import annotations

import pytest

from aptmoe.calibration import cpu_ranks, profiler
from aptmoe.calibration.profiler import Hardware
from aptmoe.calibration.timing import Reps


def test_ranks_take_the_executors_even_shares_in_order() -> None:
    allowed = list(range(32))
    assert cpu_ranks.rank_cores(0, 2, allowed) == list(range(16))
    assert cpu_ranks.rank_cores(1, 2, allowed) == list(range(16, 32))
    assert cpu_ranks.rank_cores(2, 3, [0, 1, 2, 3, 4, 5, 6]) == [4, 5]


def test_every_rank_times_the_series_at_once_and_each_point_is_their_median() -> None:
    """Two processes (the two cores here), one worker thread each, two passes over two counts."""
    tokens, secs, cut = cpu_ranks.at_once("S", "fp32", 1, 2, [0, 1], (1, 2), Reps(0, 2, 2, 0.0), None, 2,
                                          2 * 33554432)
    assert tokens == [1, 2] and not cut
    assert set(secs) == {"fwd", "bwd"} and all(len(v) == 2 and min(v) > 0 for v in secs.values())


def test_a_rank_that_fails_before_it_is_ready_says_why() -> None:
    with pytest.raises(RuntimeError, match="rank 0's worker failed: KeyError: 'fp99'"):
        cpu_ranks.at_once("S", "fp99", 1, 2, [0, 1], (1,), Reps(0, 1, 1, 0.0), None, 1, 1)


def test_threads_that_do_not_fit_a_ranks_share_are_refused() -> None:
    with pytest.raises(ValueError, match="3 threads do not fit a rank's 1 cores"):
        cpu_ranks.at_once("S", "fp32", 3, 2, [0, 1], (1,), Reps(0, 1, 1, 0.0), None, 1, 1)


def _machine(gpus, threads) -> profiler.Machine:
    hw = Hardware("NVIDIA H200", len(gpus), 141 * 10**9, "test CPU", 1, 2, 10**11, "2.x")
    return profiler.Machine(gpus=gpus, cpus=(0, 1), threads=threads, hardware=hw)


def test_a_gpu_machine_times_the_counts_a_ranks_share_holds_on_the_ranks_workers(monkeypatch) -> None:
    calls = []

    def fake(size, dtype, threads, ranks, allowed, tokens, reps, limit_s, rounds, pool_bytes):
        calls.append((size, threads, ranks, rounds))
        return [1, 2, 4], {"fwd": [1e-3, 3e-3, 2e-3], "bwd": [2e-3, 3e-3, 4e-3]}, True

    monkeypatch.setattr(profiler.cpu_ranks, "at_once", fake)
    monkeypatch.setattr(profiler, "allowed_cores", lambda: [0, 1])
    sizes = profiler.sizes_for(profiler.Options())
    m = profiler.Measured()
    profiler.measure_cpu_expert("S", "fp32", 1, _machine((0, 1), (1,)), sizes, profiler._BlockCache(), m)
    assert calls == [("S", 1, 2, 3)]                            # the full mode's three passes
    assert m.cpu_ranks == {1: 2} and m.cpu_cut == ["S fp32 1t: 4"]
    fwd = next(c for c in m.cpu if c.direction == "fwd")
    assert (fwd.d, fwd.h, fwd.tokens) == (1024, 4096, (1, 2, 4))
    assert list(fwd.seconds) == pytest.approx([1e-3, 2.5e-3, 2.5e-3])    # made monotone as before


@pytest.mark.gpu
@pytest.mark.skipif(not profiler.torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_gpu_machines_calibration_times_cpu_experts_on_every_ranks_worker(tmp_path) -> None:
    from aptmoe.calibration import cli
    from aptmoe.profile import load_profile

    out = tmp_path / "cpu.json"
    assert cli.main(["--out", str(out), "--quick", "--models", "S", "--dtypes", "fp32", "--threads", "2",
                     "--skip", "links,gpu,adam,dispatch,memory,p2p,tolls,pacer,cpujob", "-q"]) == 0
    p = load_profile(str(out))
    gpus = profiler.torch.cuda.device_count()
    assert f"{gpus} processes at once" in p.sources["cpu_expert.threads"]
    assert {(c.direction, c.threads) for c in p.cpu_expert} == {("fwd", 2), ("bwd", 2)}
    assert all(c.seconds[0] > 0 for c in p.cpu_expert)


@pytest.mark.parametrize("on_ranks", [True, False])
def test_the_profile_says_how_its_cpu_curves_were_timed(monkeypatch, on_ranks) -> None:
    """Passes and ranks are named only where the curves were timed that way: a CPU-only
    machine's full calibration times one pass on its main thread."""
    monkeypatch.setattr(profiler.cpu_ranks, "at_once", lambda *a: ([1, 2], {"fwd": [1e-3, 2e-3],
                                                                            "bwd": [2e-3, 3e-3]}, False))
    monkeypatch.setattr(profiler, "allowed_cores", lambda: [0, 1])
    monkeypatch.setattr(profiler, "_series", lambda *a, **k: ([1, 2], {"fwd": [1e-3, 2e-3], "bwd": [2e-3, 3e-3]},
                                                              False))
    skip = frozenset({"links", "gpu", "adam", "dispatch", "memory", "p2p", "tolls", "pacer", "cpujob"})
    opts = profiler.Options(models=("S",), dtypes=("fp32",), threads=(1,), skip=skip)
    sizes = profiler.sizes_for(opts)
    machine = _machine((0, 1) if on_ranks else (), (1,))
    m = profiler.Measured()
    no_pool = type("NoPool", (), {"get": lambda self, size, dtype: None})()     # _series is stubbed
    profiler.measure_cpu_expert("S", "fp32", 1, machine, sizes, no_pool, m)
    p = profiler.build_profile(opts, sizes, machine, m, profiler.skipped_parts(opts, machine), name="t",
                               command="aptmoe-calibrate --out t.json").validate()
    said = p.sources["cpu_expert"] + p.sources["cpu_expert.threads"]
    assert ("over 3 passes" in said) == on_ranks and ("2 processes at once" in said) == on_ranks
    assert ("bound to the first t of" in said) != on_ranks
