"""What the issuing thread loses to the rank's other threads (sim/issuing.py, the profile's
`issue_tolls`, the loaded probe's fit in calibration/dispatch.py): closed forms, the
section's round trip and checks, the fit on made-up traces, and the simulator's use."""

from __future__ import annotations

import dataclasses
import json
import shlex

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aptmoe.config import LINK_CHUNK_BYTES, moe_model
from aptmoe.profile import IssueTolls, ProfileCost, ProfileError, load_profile
from aptmoe.sim.issuing import MIN_LEFT, IssuingThread
from aptmoe.trace import Trace, TraceEvent

TOLLS = IssueTolls(copy_s=200e-6, chunk_s=60e-6, cpu_job_s=100e-6, dma_factor=1.1, memory_factor=1.2)


# --------------------------------------------------------------------------- closed forms


def test_alone_or_unmeasured_the_thread_runs_at_its_speed():
    assert IssuingThread(TOLLS, capped=False).slowdown() == 1.0
    t = IssuingThread(None, capped=True)
    with t.copy(32 << 20, 1e-3), t.cpu_job(1e-3):
        assert t.slowdown() == 1.0


def test_a_load_costs_its_toll_over_its_time_and_the_dma_factor():
    t = IssuingThread(TOLLS, capped=False)
    with t.copy(32 << 20, 0.6e-3):
        assert t.slowdown() == pytest.approx(1.1 / (1 - 200e-6 / 0.6e-3))
    assert t.slowdown() == 1.0                          # landed: nothing left beside it


def test_a_copy_shorter_than_a_wake_pays_only_the_dma():
    t = IssuingThread(TOLLS, capped=False)
    with t.copy(1 << 20, 150e-6):
        assert t.slowdown() == pytest.approx(1.1)


def test_an_offload_pays_the_dma_but_not_the_copy_engines_toll():
    t = IssuingThread(TOLLS, capped=False)
    with t.copy(32 << 20, 0.6e-3, engine=False):
        assert t.slowdown() == pytest.approx(1.1)


def test_a_capped_copy_adds_a_toll_per_paced_chunk():
    t = IssuingThread(TOLLS, capped=True)
    nbytes, seconds = 3 * LINK_CHUNK_BYTES + 1, 2e-3          # four chunks
    with t.copy(nbytes, seconds):
        assert t.slowdown() == pytest.approx(1.1 / (1 - (200e-6 + 4 * 60e-6) / seconds))


def test_cpu_jobs_and_copies_add_up_and_the_thread_keeps_a_share():
    t = IssuingThread(TOLLS, capped=False)
    with t.copy(32 << 20, 1e-3), t.cpu_job(0.5e-3):
        assert t.slowdown() == pytest.approx(1.1 * 1.2 / (1 - 0.2 - 0.2))
        with t.copy(32 << 20, 0.25e-3):                          # 0.8 more: past what the model holds
            assert t.slowdown() == pytest.approx(1.1 * 1.2 / MIN_LEFT)
    assert t.slowdown() == 1.0


def test_cpu_experts_slow_the_issuing_thread_by_whose_they_are():
    """Measured per condition (calibration/expert_neighbours.py), not multiplied: CPU experts
    on the rank's cores, on another rank's of the host, or on both."""
    from aptmoe.sim.issuing import HostExperts

    tolls = dataclasses.replace(TOLLS, cpu_job_s=0.0, expert_factor=1.3, other_expert_factor=1.25,
                                both_expert_factor=1.4)
    host = HostExperts()
    me, peer = IssuingThread(tolls, False, rank=0, host=host), IssuingThread(tolls, False, rank=1, host=host)
    assert me.slowdown() == 1.0
    with peer.cpu_job(1e-3, expert=True):
        assert me.slowdown() == pytest.approx(1.25) and peer.slowdown() == pytest.approx(1.3)
        with me.cpu_job(1e-3, expert=True):
            assert me.slowdown() == pytest.approx(1.4) == peer.slowdown()
        with me.cpu_job(1e-3):                                     # an Adam chunk here: its memory stream
            assert me.slowdown() == pytest.approx(1.2 * 1.25)
    assert me.slowdown() == 1.0 == peer.slowdown() and not host.others(0)


def test_without_expert_factors_a_ranks_experts_count_as_its_memory_stream_and_anothers_as_none():
    from aptmoe.sim.issuing import HostExperts

    tolls = dataclasses.replace(TOLLS, cpu_job_s=0.0)           # as profiles made before session 16
    host = HostExperts()
    me, peer = IssuingThread(tolls, False, rank=0, host=host), IssuingThread(tolls, False, rank=1, host=host)
    with peer.cpu_job(1e-3, expert=True):
        assert me.slowdown() == 1.0 and peer.slowdown() == pytest.approx(1.2)
        with me.cpu_job(1e-3, expert=True):
            assert me.slowdown() == pytest.approx(1.2)


def test_a_measured_adam_factor_stands_for_the_memory_stream_and_the_chunks_tolls():
    """Measured beside the executor's own Adam chunks (calibration/issue_tolls.py), the factor
    holds their wakes too: no toll per chunk on top, and CPU experts keep theirs."""
    tolls = dataclasses.replace(TOLLS, adam_factor=1.5)
    t = IssuingThread(tolls, capped=False)
    with t.cpu_job(0.5e-3):                                          # an Adam chunk
        assert t.slowdown() == pytest.approx(1.5)
        with t.copy(32 << 20, 1e-3, engine=False):                   # an offload beside it
            assert t.slowdown() == pytest.approx(1.1 * 1.5)
    with t.cpu_job(0.5e-3, expert=True):                             # a CPU expert: its toll, no Adam factor
        assert t.slowdown() == pytest.approx(1.2 / (1 - 0.2))
    assert t.slowdown() == 1.0
    without = IssuingThread(TOLLS, capped=False)
    with without.cpu_job(0.5e-3):
        assert without.slowdown() == pytest.approx(1.2 / (1 - 0.2))     # as before: memory and a toll


def test_a_copy_with_adam_takes_the_measured_factor_on_a_native_link_only():
    """`copy_adam_factor`, read from the executor's calls beside a native copy and its Adam at
    once, stands for dma x adam and the copies' tolls there; never below that product (copies
    landing more often than where it was read), and not on a capped link (a sixth the stream)."""
    tolls = dataclasses.replace(TOLLS, adam_factor=1.5, copy_adam_factor=3.0)
    native, capped = IssuingThread(tolls, capped=False), IssuingThread(tolls, capped=True)
    paced = 1 - 8 * 60e-6 / 1e-3                                     # a capped copy's 8 chunks' tolls
    for t in (native, capped):
        with t.cpu_job(0.5e-3):
            assert t.slowdown() == pytest.approx(1.5)
            with t.copy(32 << 20, 1e-3, engine=False):
                assert t.slowdown() == pytest.approx(3.0 if t is native else 1.1 * 1.5 / paced)
            with t.copy(32 << 20, 1e-3):                             # a load: the engine's toll is in the factor
                assert t.slowdown() == pytest.approx(3.0 if t is native else 1.1 * 1.5 / (paced - 0.2))
        with t.copy(32 << 20, 1e-3, engine=False):                   # a copy alone: DMA (and a capped one's chunks)
            assert t.slowdown() == pytest.approx(1.1 if t is native else 1.1 / paced)
    low = IssuingThread(dataclasses.replace(tolls, copy_adam_factor=1.2), capped=False)
    with low.cpu_job(0.5e-3), low.copy(32 << 20, 1e-3, engine=False):
        assert low.slowdown() == pytest.approx(1.1 * 1.5)              # the product, where it is more
    without = IssuingThread(dataclasses.replace(tolls, copy_adam_factor=None), capped=False)
    with without.cpu_job(0.5e-3), without.copy(32 << 20, 1e-3, engine=False):
        assert without.slowdown() == pytest.approx(1.1 * 1.5)          # as before: the product


def test_the_calibrations_adam_neighbour_runs_the_executors_chunks_beside_the_loop():
    import torch

    from aptmoe.calibration.host_memory import adam_stream
    from aptmoe.calibration.issue_tolls import _CpuJobs
    from aptmoe.calibration.wake import issue_round
    from aptmoe.host import allowed_cores

    call, params = adam_stream(chunk=1 << 16, blocks=2)
    # 20,000 ops (tens of ms): with 2,000 (about 4 ms) a loaded 2-core CI machine once gave the
    # neighbour's thread no finished chunk in the window (session 27's CI run)
    alone, beside, jobs, _ = issue_round(lambda: _CpuJobs(call, allowed_cores()[-1:]), torch.zeros(16), 20000)
    assert params == 1 << 16 and alone > 0 and beside > 0 and jobs > 0


def test_neighbours_together_run_each_on_its_own_thread_inside_the_block_only():
    import time

    from aptmoe.calibration.background import Background
    from aptmoe.calibration.issue_tolls import _Together

    class Counter(Background):
        settle_s = 0.0

        def __init__(self) -> None:
            super().__init__(None)
            self.count = 0

        def run(self) -> None:
            while not self.stop.is_set():
                self.count += 1
                time.sleep(1e-4)

    a, b = Counter(), Counter()
    with _Together(a, b) as both:
        time.sleep(0.02)
        assert a.thread.is_alive() and b.thread.is_alive() and a.thread is not b.thread
        assert getattr(both, "count", 0) == 0                      # counts nothing itself (issue_round: none)
    assert not a.thread.is_alive() and not b.thread.is_alive() and a.count > 0 and b.count > 0

    class Broken(Background):
        def __enter__(self):
            raise RuntimeError("no copy engine")

    first = Counter()
    with pytest.raises(RuntimeError, match="no copy engine"):
        with _Together(first, Broken()):
            pass
    assert first.thread.ident is not None and not first.thread.is_alive()   # started, then stopped


# --------------------------------------------------------------------------- the profile section


def test_profile_section_round_trips_and_is_checked(tmp_path):
    p = load_profile("a800-paper")
    assert p.issue_tolls is None and ProfileCost(p, moe_model("S", 8)).issue_tolls() is None
    q = p.with_(issue_tolls=TOLLS)
    again = load_profile(str(q.save(tmp_path / "t.json")))
    assert again.issue_tolls == TOLLS
    assert ProfileCost(again, moe_model("S", 8)).issue_tolls() == TOLLS
    d = json.loads((tmp_path / "t.json").read_text())
    for field, bad, says in (("dma_factor", 0.9, "slowdown and must be >= 1"), ("copy_s", -1e-6, ">= 0"),
                             ("chunk_s", "x", "must be a number")):
        e = json.loads(json.dumps(d))
        e["issue_tolls"][field] = bad
        (tmp_path / "bad.json").write_text(json.dumps(e))
        with pytest.raises(ProfileError, match=f"issue_tolls.{field}.*{says}"):
            load_profile(str(tmp_path / "bad.json"))
    assert "expert_factor" not in d["issue_tolls"]                 # unmeasured: left out, not null
    withx = json.loads(json.dumps(d))
    withx["issue_tolls"].update(expert_factor=1.3, other_expert_factor=1.2, both_expert_factor=1.4, adam_factor=1.5,
                                copy_adam_factor=3.1)
    (tmp_path / "x.json").write_text(json.dumps(withx))
    x = load_profile(str(tmp_path / "x.json")).issue_tolls
    assert (x.expert_factor, x.other_expert_factor, x.both_expert_factor, x.adam_factor, x.copy_adam_factor) == \
        (1.3, 1.2, 1.4, 1.5, 3.1)
    withx["issue_tolls"]["other_expert_factor"] = 0.8
    (tmp_path / "bad.json").write_text(json.dumps(withx))
    with pytest.raises(ProfileError, match="issue_tolls.other_expert_factor.*slowdown and must be >= 1"):
        load_profile(str(tmp_path / "bad.json"))
    del d["issue_tolls"]["memory_factor"]
    (tmp_path / "bad.json").write_text(json.dumps(d))
    with pytest.raises(ProfileError, match="memory_factor"):
        load_profile(str(tmp_path / "bad.json"))


def test_the_h200_profile_says_where_its_tolls_come_from():
    p = load_profile("h200-1gpu")
    assert p.issue_tolls is not None and p.issue_tolls.copy_s > 0
    assert p.sources["issue_tolls"].startswith("measured:")
    two = load_profile("h200-2gpu")
    assert two.issue_tolls.both_expert_factor > 1 and "expert_neighbours" in two.sources["issue_tolls"]


# --------------------------------------------------------------------------- the loaded probe's fit


def _block(name, start, dur, cat="forward"):
    return TraceEvent(name, 0, "compute", start, start + dur, cat, {"layer": 0})


def test_the_fit_recovers_a_constant_and_a_toll_per_copy_landed():
    from aptmoe.calibration.dispatch import copy_toll_from_traces

    alone = Trace("real", [_block(f"0F{m}@0:e{i}", m + i * 0.01, 100e-6) for m in range(3) for i in range(4)])
    # beside the loads each block pays 30 us, and 250 us per copy that lands while it is issued
    events, t = [], 0.0
    for i, landed in enumerate([0, 1, 0, 2, 1, 0, 3, 0]):
        dur = 100e-6 + 30e-6 + 250e-6 * landed
        events.append(_block(f"0F0@0:e{i}", t, dur))
        events += [TraceEvent(f"L{i}.{j}", 0, "load", t, t + dur * (j + 1) / (landed + 1), "load-stage")
                   for j in range(landed)]
        t += dur + 1e-3
    events.append(_block("0B0@0:e0", 0.5, 5e-3, cat="backward"))      # backward blocks are left out
    toll = copy_toll_from_traces(alone, [Trace("real", events)])
    assert toll.seconds == pytest.approx(250e-6) and toll.constant_s == pytest.approx(30e-6)
    assert toll.blocks == 8 and toll.landings == 7


def test_the_fit_refuses_blocks_that_all_saw_as_much():
    from aptmoe.calibration.dispatch import copy_toll_from_traces

    alone = Trace("real", [_block("0F0@0:e0", 0.0, 100e-6)])
    with pytest.raises(ValueError, match="no toll per copy"):
        copy_toll_from_traces(alone, [Trace("real", [_block("0F0@0:e0", 0.0, 300e-6)])])


# --------------------------------------------------------------------------- the simulator


def _simulate(pipe: str, prof):
    from aptmoe.flags import add_cluster_flags, add_seed_flags, config_from_args, make_parser
    from aptmoe.profile import cost_for
    from aptmoe.sim.simulate import simulate

    p = make_parser("t", "")
    add_seed_flags(p)
    add_cluster_flags(p)
    stages = "" if pipe == "GPipe" else " --num_stages 4"
    line = ("--is_moe=True --model_config=S --num_layers 4 --num_experts 8 --gini 0.6 --batch_size 32 "
            f"--num_chunks 4 --seq_length 128 --gpus 1 --topo C1+G1 --num_training_steps 1 --num_warmup_steps 0"
            f"{stages} --pipeline {pipe}")
    cfg = config_from_args(p.parse_args(shlex.split(line)), **prof.cluster_defaults())
    return simulate(cfg, cost_for(cfg, prof))


def test_the_simulator_slows_the_issuing_thread_beside_loads_where_the_profile_says():
    """MoE-S's blocks are host-bound: beside its loads, the tolls lengthen GPipeOffload's step;
    tolls of nothing change nothing; GPipe (no copies, no CPU jobs) does not move."""
    prof = load_profile("h200-1gpu")
    bare = prof.with_(issue_tolls=None)
    free = prof.with_(issue_tolls=IssueTolls(0.0, 0.0, 0.0, 1.0, 1.0))
    off = {name: _simulate("GPipeOffload", q).iteration_s for name, q in
           (("tolls", prof), ("bare", bare), ("free", free))}
    assert off["tolls"] > off["bare"] * 1.02
    assert off["free"] == pytest.approx(off["bare"])
    assert _simulate("GPipe", prof).iteration_s == pytest.approx(_simulate("GPipe", bare).iteration_s)


# --------------------------------------------------------------------------- the capped link's pacer


def test_the_pacer_section_round_trips_and_is_checked(tmp_path):
    from aptmoe.profile import Pacer

    p = load_profile("a800-paper")
    assert p.pacer is None and ProfileCost(p, moe_model("S", 8)).pacer_late_s() == 0.0
    q = p.with_(pacer=Pacer(75e-6))
    again = load_profile(str(q.save(tmp_path / "p.json")))
    assert again.pacer == q.pacer and ProfileCost(again, moe_model("S", 8)).pacer_late_s() == 75e-6
    d = json.loads((tmp_path / "p.json").read_text())
    d["pacer"]["late_s"] = -1
    (tmp_path / "bad.json").write_text(json.dumps(d))
    with pytest.raises(ProfileError, match="pacer.late_s"):
        load_profile(str(tmp_path / "bad.json"))


def test_a_capped_copy_lands_its_pacers_lateness_after_its_bytes_and_holds_no_link():
    """With the pacer measured, a capped GPipeOffload step's loads keep their spans (their
    bytes over the cap: the link does not wait for a landing, exec/link.py since session 12)
    and the step gets later, by less than a lateness per load (it is not on every load's
    path any more); uncapped, nothing moves."""
    from aptmoe.profile import Pacer

    prof = load_profile("h200-1gpu").with_(issue_tolls=None, pacer=None)
    late = 1e-3

    def loads(p, cap):
        from aptmoe.flags import add_cluster_flags, add_seed_flags, config_from_args, make_parser
        from aptmoe.profile import cost_for
        from aptmoe.sim.simulate import simulate
        from aptmoe.trace import Trace

        parser = make_parser("t", "")
        add_seed_flags(parser)
        add_cluster_flags(parser)
        line = ("--is_moe=True --model_config=S --num_layers 4 --num_experts 8 --gini 0.6 --batch_size 32 "
                "--num_chunks 4 --seq_length 128 --gpus 1 --topo C1+G1 --num_training_steps 1 --num_warmup_steps 0 "
                f"--num_stages 4 --pipeline GPipeOffload{cap}")
        cfg = config_from_args(parser.parse_args(shlex.split(line)), **p.cluster_defaults())
        trace = Trace("sim")
        res = simulate(cfg, cost_for(cfg, p), trace=trace)
        spans = sorted(e.dur_s for e in trace.events if e.stream == "load" and e.cat.startswith("load-"))
        return res.iteration_s, spans

    for cap, moves in (("", False), (" --link-bandwidth 8", True)):
        (t0, bare), (t1, paced) = loads(prof, cap), loads(prof.with_(pacer=Pacer(late)), cap)
        assert len(bare) == len(paced) > 0
        if moves:
            assert paced == pytest.approx(bare, abs=1e-9)
            assert t0 < t1 < t0 + len(bare) * late
        else:
            assert paced == pytest.approx(bare) and t1 == pytest.approx(t0)


# --------------------------------------------------------------------------- the calibration's neighbours


def test_a_background_neighbour_runs_only_inside_its_block_and_counts_from_its_start():
    import time

    import torch

    from aptmoe.calibration.background import Background
    from aptmoe.calibration.wake import issue_round
    from aptmoe.host import allowed_cores

    class Ticker(Background):
        settle_s = 0.01

        def __init__(self) -> None:
            super().__init__(allowed_cores()[-1:])
            self.count, self.chunks, self.reset = 0, 0, None

        def run(self) -> None:
            while not self.stop.is_set():
                self.count += 1
                self.chunks += 2
                time.sleep(1e-4)

        def started(self) -> None:
            self.reset = self.count

    with Ticker() as t:
        assert t.thread.is_alive() and t.reset is not None and t.reset > 0      # settled, then started()
    assert not t.thread.is_alive()
    # 20,000 ops: about 40 ms beside it. 2,000 (4 ms, under the interpreter's 5 ms switch
    # interval) once left it no tick at all while other processes held its core
    alone, beside, n, k = issue_round(Ticker, torch.zeros(16), 20000)
    # read between its two counts: each read of the pair may fall a few ticks apart when this
    # thread is descheduled between them (a shared 2-core machine: up to about 1 ms)
    assert alone > 0 and beside > 0 and n > 0 and abs(k - 2 * n) <= 2 + k // 20, (n, k)
    # a neighbour that counts nothing (DMA, a memory stream) counts as none
    class Quiet(Background):
        def run(self) -> None:
            self.stop.wait()

    assert issue_round(Quiet, torch.zeros(16), 100)[2:] == (0, 0)


# --------------------------------------------------------------------------- properties

_tolls = st.builds(IssueTolls, copy_s=st.floats(0, 1e-3), chunk_s=st.floats(0, 1e-3), cpu_job_s=st.floats(0, 1e-3),
                   dma_factor=st.floats(1, 2), memory_factor=st.floats(1, 2),
                   adam_factor=st.none() | st.floats(1, 2), copy_adam_factor=st.none() | st.floats(1, 5))
_copies = st.lists(st.tuples(st.integers(1, 64 << 20), st.floats(1e-5, 1e-1)), max_size=4)
_jobs = st.lists(st.floats(1e-5, 1e-1), max_size=4)


@settings(max_examples=200, deadline=None)
@given(_tolls, st.booleans(), _copies, _jobs, st.tuples(st.integers(1, 64 << 20), st.floats(1e-5, 1e-1)))
def test_the_slowdown_is_bounded_and_never_falls_as_neighbours_join(tolls, capped, copies, jobs, extra):
    from contextlib import ExitStack

    t = IssuingThread(tolls, capped=capped)
    top = max(tolls.dma_factor * (tolls.adam_factor or tolls.memory_factor), tolls.copy_adam_factor or 1.0) / MIN_LEFT
    with ExitStack() as stack:
        for nbytes, seconds in copies:
            stack.enter_context(t.copy(nbytes, seconds))
        for seconds in jobs:
            stack.enter_context(t.cpu_job(seconds))
        before = t.slowdown()
        assert 1.0 <= before <= top * (1 + 1e-12)
        with t.copy(*extra):
            assert before <= t.slowdown() * (1 + 1e-12) <= top * (1 + 1e-12)
        assert t.slowdown() == before
    assert t.slowdown() == 1.0
