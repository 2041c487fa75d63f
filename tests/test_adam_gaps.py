"""The CPU worker's own time between Adam chunks: read from traces (aptmoe/adam_gaps.py), kept in
a profile (`cpu_job.adam_gap_s`), put there by calibration/adam_gaps.py, and charged by the
simulator to the worker after each chunk."""

from __future__ import annotations

import dataclasses
import json
import statistics
from pathlib import Path

import pytest

from aptmoe.adam_gaps import MAX_GAP_S, MIN_GAPS, POLICY_OF, adam_chunk_gaps, gaps_by_policy
from aptmoe.config import Pipeline
from aptmoe.plan.builders import build_plan
from aptmoe.profile import CpuJob, ProfileError, load_profile
from aptmoe.trace import Trace

ROOT = Path(__file__).resolve().parents[1]
STORED_RUN = ROOT / "docs/validation-h200-v21-fresh/cells/M4x8-G0.35-native-1gpu/real"


def _chunks(t: Trace, rank: int, name: str, start: float, n: int, dur: float, gap: float) -> float:
    """`n` chunks of one block's Adam on `rank`'s worker, `gap` apart; returns the last end."""
    at = start
    for i in range(n):
        t.add(name, rank, "cpu", at, at + dur, "update", params=1000, chunk=i, layer=0)
        at += dur + gap
    return at - gap


def test_gaps_are_read_between_consecutive_chunks_of_one_block_only():
    t = Trace("real")
    end = _chunks(t, 0, "3U@3:e0", 0.0, 4, 1e-3, 20e-6)
    # the next block's first chunk, 5 us after: a different block, not a hand-over within one
    _chunks(t, 0, "3U@3:e1", end + 5e-6, 2, 1e-3, 40e-6)
    # another rank's chunks interleaved in time count on their own rank
    _chunks(t, 1, "3U@3:e0", 0.5e-3, 3, 1e-3, 30e-6)
    # a worker taken by an expert job between two chunks: longer than MAX_GAP_S, left out
    _chunks(t, 0, "2U@2:e0", 1.0, 2, 1e-3, MAX_GAP_S * 2)
    # not Adam: a CPU expert job on the same lane
    t.add("0F0@0:cpu", 0, "cpu", 2.0, 2.001, "cpu-expert", chunk=0)
    assert sorted(round(g * 1e6, 6) for g in adam_chunk_gaps(t)) == [20.0] * 3 + [30.0] * 2 + [40.0]


def test_the_policies_pool_their_schedules_and_refuse_too_few_gaps():
    def run(gap: float, n: int = MIN_GAPS + 1) -> Trace:
        t = Trace("real")
        _chunks(t, 0, "0U@0:e0", 0.0, n, 1e-3, gap)
        return t

    got = gaps_by_policy({"Mobius": run(10e-6), "GPipeOffload": run(30e-6, MIN_GAPS + 3), "APTMoE": run(50e-6),
                          "GPipe": run(1e-6)}, "x")
    # Mobius's 31 gaps of 10 us and GPipeOffload's 33 of 30 us pooled: the median is 30 us
    assert got == {"aptmoe": pytest.approx(50e-6), "stage": pytest.approx(30e-6)}
    with pytest.raises(ValueError, match=f"has {MIN_GAPS - 1} gaps .* aptmoe policy"):
        gaps_by_policy({"APTMoE": run(50e-6, MIN_GAPS)}, "the probe")
    with pytest.raises(ValueError, match="none of its schedules runs Adam on the CPU"):
        gaps_by_policy({"GPipe": run(1e-6)}, "the probe")


@pytest.mark.parametrize("pipeline", list(Pipeline))
def test_each_schedules_policy_is_its_plans(pipeline):
    from test_sim import _cfg

    plan = build_plan(_cfg(pipeline=pipeline, gpus=2, layers=4, stages=2, topo="C1+G1"))
    assert POLICY_OF.get(pipeline.value) == (None if plan.policy == "resident" else plan.policy)


def test_a_profile_keeps_its_gaps_and_refuses_a_policy_it_does_not_know(tmp_path):
    base = load_profile("h200-1gpu")
    with_gaps = base.with_(cpu_job=dataclasses.replace(base.cpu_job, adam_gap_s={"aptmoe": 4e-5, "stage": 2e-5}))
    path = tmp_path / "p.json"
    with_gaps.save(path)
    assert load_profile(str(path)).cpu_job.adam_gap_s == {"aptmoe": 4e-5, "stage": 2e-5}
    # a cpu_job without them reads and writes as before
    plain = dataclasses.replace(base.cpu_job, adam_gap_s={})
    assert "adam_gap_s" not in base.with_(cpu_job=plain).to_dict()["cpu_job"]
    doc = json.loads(path.read_text())
    doc["cpu_job"]["adam_gap_s"] = {"resident": 1e-5}
    path.write_text(json.dumps(doc))
    with pytest.raises(ProfileError, match="adam_gap_s.resident.*use one of aptmoe, stage"):
        load_profile(str(path))
    doc["cpu_job"]["adam_gap_s"] = [1e-5]
    path.write_text(json.dumps(doc))
    with pytest.raises(ProfileError, match="adam_gap_s.*must be an object"):
        load_profile(str(path))


def _worker_lane(cfg, cost, gap_s: dict[str, float]):
    from aptmoe.sim.simulate import simulate

    profile = cost.with_(cpu_job=dataclasses.replace(cost.cpu_job or CpuJob(0, 0, 0, 0), adam_gap_s=gap_s))
    tr = Trace("sim")
    res = simulate(cfg, profile, trace=tr)
    chunks = sorted((e for e in tr.events if e.stream == "cpu" and e.cat == "update" and e.rank == 0),
                    key=lambda e: e.start_s)
    return res, chunks


@pytest.mark.parametrize("pipeline,policy", [(Pipeline.MOBIUS, "stage"), (Pipeline.APTMOE, "aptmoe")])
def test_the_simulated_worker_holds_each_gap_after_a_chunk_outside_its_event(pipeline, policy):
    """Closed form on one GPU: a block's chunks are queued together, so with the gap the worker
    starts each next chunk of a block exactly one gap after the last one's event ends (which
    the event itself does not hold); without it, at once. The other policy's gap changes
    nothing."""
    pytest.importorskip("simpy")
    from test_sim import _cfg

    cfg = _cfg(pipeline=pipeline, gpus=1, layers=4, stages=2, chunks=2, experts=4, topo="C1+G1")
    # wide enough that a block is several Adam chunks (aptmoe.memory.ADAM_CHUNK_PARAMS)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, embedding_dim=1024, hidden_dim=4096))
    profile = load_profile("h200-1gpu")
    other = "stage" if policy == "aptmoe" else "aptmoe"
    none, before = _worker_lane(cfg, profile, {other: 1e-3})
    res, after = _worker_lane(cfg, profile, {policy: 1e-3})

    def within_block(chunks):
        return [b.start_s - a.end_s for a, b in zip(chunks, chunks[1:]) if a.name == b.name]

    assert within_block(before) and max(within_block(before)) < 1e-9
    assert within_block(after) == pytest.approx([1e-3] * len(within_block(after)), abs=1e-9)
    assert statistics.median(e.dur_s for e in after) == pytest.approx(statistics.median(e.dur_s for e in before))
    assert res.iteration_s > none.iteration_s
    assert not any(f.startswith(f"adam gap {policy}") for f in res.fallbacks)


def test_a_profile_without_the_gap_names_it_among_the_figures_it_fell_back_on():
    pytest.importorskip("simpy")
    from aptmoe.sim.simulate import simulate
    from test_sim import _cfg

    res = simulate(_cfg(pipeline=Pipeline.MOBIUS, gpus=1, layers=4, stages=2, chunks=2), "h200-2gpu")
    assert "adam gap stage: not measured, the CPU worker goes from one Adam chunk to the next at once" in res.fallbacks


def test_the_command_reads_stored_runs_and_puts_their_medians_onto_a_profile(tmp_path, capsys):
    from aptmoe.calibration import adam_gaps

    out = tmp_path / "p.json"
    assert adam_gaps.main(["--from", str(STORED_RUN), str(STORED_RUN), "--onto", "h200-1gpu", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "aptmoe: median" in printed and "stage: median" in printed
    gaps = load_profile(str(out)).cpu_job.adam_gap_s
    # the stored run's own: GPipeOffload and Mobius pooled for the stage policy
    assert 10e-6 < gaps["stage"] < gaps["aptmoe"] < 100e-6
    assert load_profile(str(out)).cpu_job.take_s == load_profile("h200-1gpu").cpu_job.take_s


def test_the_command_says_what_is_wrong_in_one_line(tmp_path, capsys):
    from aptmoe.calibration import adam_gaps

    empty = tmp_path / "run"
    empty.mkdir()
    assert adam_gaps.main(["--from", str(empty)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "none of its schedules runs Adam on the CPU" in err[0]
    doc = load_profile("h200-1gpu").to_dict()
    doc.pop("cpu_job")
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps(doc))
    out = tmp_path / "out.json"
    assert adam_gaps.main(["--from", str(STORED_RUN), "--onto", str(bare), "--out", str(out)]) == 2
    assert "no cpu_job section" in capsys.readouterr().err and not out.exists()
    with pytest.raises(SystemExit):
        adam_gaps.main(["--from", str(STORED_RUN), "--repeats", "2"])


def test_h200_1gpu_gaps_are_the_medians_of_the_probe_runs_kept(tmp_path):
    """The shipped one-GPU profile's gaps are rebuilt from the three CPU-job probe runs of the
    one-GPU lease they were taken on (docs/measured/session38; 12 layers, no grid cell)."""
    from aptmoe.calibration import adam_gaps

    runs = sorted((ROOT / "docs/measured/session38/adam-gaps").glob("run-*"))
    assert len(runs) == 3
    out = tmp_path / "p.json"
    assert adam_gaps.main(["--from", *map(str, runs), "--onto", "h200-1gpu", "--out", str(out)]) == 0
    assert load_profile(str(out)).cpu_job.adam_gap_s == load_profile("h200-1gpu").cpu_job.adam_gap_s
