"""python -m aptmoe.calibration.expert_neighbours: what CPU experts cost the issuing thread, in
its own process and in another (the GPU conditions run on the device; here the CPU path)."""

from __future__ import annotations

import psutil
import pytest
import torch

from aptmoe.calibration import expert_neighbours as en
from aptmoe.host import allowed_cores

TWO = len(allowed_cores()) >= 2


def _children() -> set[int]:
    return {p.pid for p in psutil.Process().children()}


@pytest.mark.skipif(not TWO, reason="needs two cores")
def test_each_condition_is_timed_against_the_loop_alone_and_the_other_rank_is_gone() -> None:
    issue, worker = allowed_cores()[:2]
    before = _children()
    threads = torch.get_num_threads()
    r = en.measure(en.Layout(issue, (worker,), (worker,)), device="cpu", size="S", tokens=8, gpu_tokens=4,
                   calls=3, rounds=1, settle_s=0.02)
    assert _children() <= before                           # the other rank's process has exited
    assert torch.get_num_threads() == threads               # the caller's threads are given back
    assert set(r.ratio) == {"own", "other", "both"}         # no uploads without a GPU
    assert set(r.call_us) == {"alone", "own", "other", "both"}
    assert all(us > 0 for us in r.call_us.values())
    assert all(0.05 < x < 50 for x in r.ratio.values())
    assert set(r.experts_per_s["both"]) == {"this process", "other"}
    assert r.experts_per_s["own"]["this process"] > 0       # the worker computed while it was timed
    text = r.report()
    assert f"on core {issue} (cpu)" in text and "x alone" in text and text.count("\n") == 4


def test_without_cores_for_experts_or_with_a_core_not_ours_it_says_what_to_change() -> None:
    issue = allowed_cores()[0]
    with pytest.raises(ValueError, match="no cores for CPU experts"):
        en.Layout(issue, (), ()).check()
    with pytest.raises(ValueError, match="worker core 100000 is not one this process may run on"):
        en.Layout(issue, (100000,), ()).check()


def test_the_machine_layout_is_the_executors() -> None:
    lay = en.Layout.of_machine(2)
    cores = allowed_cores()
    assert lay.issue == cores[0]
    assert lay.issue not in lay.workers and not set(lay.workers) & set(lay.other)
    if len(cores) >= 32:                                     # two ranks of 16: 2 host cores each
        assert lay.workers == tuple(cores[2:16]) and lay.other == tuple(cores[18:32])


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here")
def test_on_a_machine_without_a_gpu_the_gpu_loop_is_one_line_and_exit_2(capsys) -> None:
    assert en.main(["--rounds", "1", "--calls", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no CUDA GPU here" in err and "--device cpu" in err


def test_the_issue_tolls_take_the_three_factors_at_least_one(monkeypatch) -> None:
    from aptmoe.calibration import issue_tolls

    lay = en.Layout(0, (1,), (2,))
    fake = en.NeighbourCost("cuda", lay, {"alone": 60.0, "own": 80.0, "other": 50.0, "both": 90.0},
                            {"own": 1.33, "other": 0.83, "both": 1.5})
    monkeypatch.setattr(en.Layout, "of_machine", classmethod(lambda cls, gpus: lay))
    monkeypatch.setattr(en, "measure", lambda layout, rounds: fake)
    said: list[str] = []
    got = issue_tolls.measure_expert_factors(3, said.append)
    assert got == {"expert_factor": 1.33, "other_expert_factor": 1.0, "both_expert_factor": 1.5}
    fake = en.NeighbourCost("cuda", lay, {"alone": 60.0, "adam": 78.0}, {"adam": 1.3})
    monkeypatch.setattr(en, "measure", lambda layout, rounds: fake)
    assert issue_tolls.measure_expert_factors(3, said.append) == {"adam_factor": 1.3}
    assert "x alone" in said[0]
    monkeypatch.setattr(en.Layout, "of_machine", classmethod(lambda cls, gpus: en.Layout(0, (), ())))
    assert issue_tolls.measure_expert_factors(3, said.append) == {} and "not measured" in said[-1]
