"""What caps a GPU's copies beside its other direction and its host's Adam: the profile's
`CopyLimits` and the links' `CopyConditions` (sim/links.py), in closed form; the figures'
calibration layout (calibration/profiler.py `measure_host_memory_bound`)."""

from __future__ import annotations

import math

import pytest
import simpy
from hypothesis import given
from hypothesis import strategies as st

from aptmoe.profile import CopyLimits, load_profile, ProfileCost
from aptmoe.sim.links import CopyConditions, SharedRoot

GB = 1e9
# h200-2gpu's 14-thread figures as measured in session 30 (GB/s)
BESIDE = {1: {"h2d": 44.83, "d2h": 53.3, "duplex_h2d": 52.48, "duplex_d2h": 51.68},
          2: {"h2d": 37.07, "d2h": 45.97, "duplex_h2d": 39.3, "duplex_d2h": 45.6}}
LIMITS = CopyLimits({"h2d": 44.92, "d2h": 51.86}, BESIDE)


def test_the_cap_follows_the_condition_and_never_extrapolates():
    assert LIMITS.GBps("h2d", duplex=False, updating=0) == math.inf          # alone: the link's own rate
    assert LIMITS.GBps("h2d", duplex=True, updating=0) == 44.92              # the link's duplex figure
    assert LIMITS.GBps("h2d", duplex=False, updating=1) == 44.83
    assert LIMITS.GBps("d2h", duplex=True, updating=2) == 45.6
    assert LIMITS.GBps("h2d", duplex=True, updating=1) == 44.92             # Adam never speeds a copy up
    assert LIMITS.GBps("h2d", duplex=False, updating=4) == 37.07             # the most ranks measured: 2
    bare = CopyLimits({"h2d": 44.92, "d2h": 51.86})                          # Adam not measured
    assert bare.GBps("h2d", False, 2) == math.inf and bare.GBps("d2h", True, 2) == 51.86


@given(direction=st.sampled_from(["h2d", "d2h"]), duplex=st.booleans(), updating=st.integers(0, 8))
def test_more_ranks_updating_never_raises_the_cap_where_the_figures_fall(direction, duplex, updating):
    """The session-30 figures fall with each rank updating: so does the cap, whatever is asked."""
    assert LIMITS.GBps(direction, duplex, updating + 1) <= LIMITS.GBps(direction, duplex, updating)


def _copies(limits, h2d_jobs, d2h_jobs, adam, link=55.0):
    """Copies (start s, GB) on each direction of one GPU (group 0) on a link of `link` GB/s,
    and Adam chunks (rank, start, end): -> each copy's end."""
    env = simpy.Environment()
    roots = {"h2d": SharedRoot(env, lambda n: 1000.0), "d2h": SharedRoot(env, lambda n: 1000.0)}
    cond = CopyConditions(limits, roots["h2d"], roots["d2h"])
    ends = {}

    def copy(direction, i, at, gb):
        yield env.timeout(at)
        yield from roots[direction].transfer(gb * GB, link, group=0)
        ends[(direction, i)] = env.now

    def chunk(rank, start, end):
        yield env.timeout(start)
        with cond.adam(rank):
            yield env.timeout(end - start)

    for direction, jobs in (("h2d", h2d_jobs), ("d2h", d2h_jobs)):
        for i, (at, gb) in enumerate(jobs):
            env.process(copy(direction, i, at, gb))
    for rank, start, end in adam:
        env.process(chunk(rank, start, end))
    env.run()
    return ends


def test_a_load_slows_while_ranks_update_and_speeds_up_after():
    """11 GB at 55 GB/s; rank 0 updates over [0.05, 0.15], rank 1 over [0.1, 0.15]: 0.05 s at 55,
    0.05 at 44.83 (one rank), 0.05 at 37.07 (two), then 55 again for what is left."""
    ends = _copies(LIMITS, [(0.0, 11.0)], [], [(0, 0.05, 0.15), (1, 0.10, 0.15)])
    left = 11.0 - 0.05 * (55 + 44.83 + 37.07)
    assert ends[("h2d", 0)] == pytest.approx(0.15 + left / 55, rel=1e-9)


def test_both_directions_at_once_take_the_duplex_figures_until_one_ends():
    """2 GB each way from t=0: both at the duplex figures (44.92 and 51.86) until the d2h copy
    ends, then the h2d one alone at the link's 55."""
    ends = _copies(LIMITS, [(0.0, 2.0)], [(0.0, 2.0)], [])
    t_d2h = 2.0 / 51.86
    assert ends[("d2h", 0)] == pytest.approx(t_d2h, rel=1e-9)
    assert ends[("h2d", 0)] == pytest.approx(t_d2h + (2.0 - 44.92 * t_d2h) / 55, rel=1e-9)


def test_one_rank_s_back_to_back_chunks_count_once():
    """A rank's chunks that touch (one ends as the next starts) are one rank updating: the
    rate is one rank's figure throughout, not two ranks' for an instant."""
    ends = _copies(LIMITS, [(0.0, 4.483)], [], [(0, 0.0, 0.05), (0, 0.05, 0.2)])
    assert ends[("h2d", 0)] == pytest.approx(0.1, rel=1e-9)


def test_the_profile_gives_its_figures_at_the_rank_s_threads():
    cost = ProfileCost(load_profile("h200-2gpu"), moe_model_s())
    limits = cost.copy_limits(14)
    assert limits.beside_adam[2]["h2d"] == pytest.approx(37.07) and limits.duplex_GBps["h2d"] == pytest.approx(44.92)
    assert cost.copy_limits(16).beside_adam[2]["h2d"] == pytest.approx(33.34)
    old = ProfileCost(load_profile("h200-4gpu"), moe_model_s())
    assert old.copy_limits(16).beside_adam == {}
    assert any("copies beside Adam not measured" in f for f in old.fallbacks)


def moe_model_s():
    from aptmoe.config import moe_model

    return moe_model("S", 8)


def test_the_calibration_puts_each_other_rank_s_adam_on_the_next_cores(monkeypatch):
    """Two GPUs on 32 cores at 14 threads: this rank on cores 0-13, the other rank's Adam on
    14-27, the copies' threads on what is left (28-31); 16 threads leave none: the copies run
    unbound. One GPU: no other rank."""
    pytest.importorskip("torch")
    from aptmoe.calibration import profiler

    seen = []
    monkeypatch.setattr(profiler, "measure_host_memory",
                        lambda threads, gpu, spare, others, others_spare: seen.append((threads, others, others_spare)))
    monkeypatch.setattr(profiler, "pinned_threads", lambda cpus: _Bound())

    def machine(gpus):
        return profiler.Machine(gpus=gpus, cpus=tuple(range(32)), threads=(14, 16), hardware=None)

    m = profiler.Measured()
    profiler.measure_host_memory_bound(14, machine((0, 1)), 0, m)
    profiler.measure_host_memory_bound(16, machine((0, 1)), 0, m)
    profiler.measure_host_memory_bound(14, machine((0,)), 0, m)
    assert seen == [(14, [list(range(14, 28))], [28, 29, 30, 31]), (16, [list(range(16, 32))], None), (14, [], list(range(14, 32)))]


class _Bound:
    def __enter__(self):
        return True

    def __exit__(self, *exc):
        return False
