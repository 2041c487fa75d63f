"""python -m aptmoe.calibration.core_contention: which cores slow the issuing thread's core."""

from __future__ import annotations

import argparse

import psutil
import pytest

from aptmoe.calibration import core_contention as cc
from aptmoe.flags import core_list
from aptmoe.host import allowed_cores

TWO = len(allowed_cores()) >= 2


def _children() -> set[int]:
    """This process's children now (other tests may have left helpers, e.g. multiprocessing's
    resource tracker: only the busy processes a test starts must be gone after it)."""
    return {p.pid for p in psutil.Process().children()}


def test_core_list_reads_tasksets_notation() -> None:
    assert core_list("0-3,8,10-11") == [0, 1, 2, 3, 8, 10, 11]
    assert core_list("2,2,1-2") == [2, 1]
    for bad in ("3-1", "a", "-1", "1,,2"):
        with pytest.raises(argparse.ArgumentTypeError, match="give cores like"):
            core_list(bad)


@pytest.mark.skipif(not TWO, reason="needs two cores")
def test_a_busy_core_is_timed_against_the_loop_alone_and_leaves_nothing_running() -> None:
    victim, busy = allowed_cores()[:2]
    before = _children()
    r = cc.measure(victim, [busy], "python", reps=1, iterations=200_000)
    assert r.victim == victim and list(r.beside) == [busy] and r.all_at_once is None
    assert r.alone_s > 0 and 0.2 < r.beside[busy] < 20
    assert _children() <= before                          # every busy process is gone
    text = cc.report(r, above=0.0)                         # everything is at or above 0x
    assert f"core {busy:>3}:" in text and "<- slows it" in text and f"at or above 0x: {busy}" in text


@pytest.mark.skipif(not TWO, reason="needs two cores")
def test_a_busy_process_that_cannot_start_is_one_line_and_kills_the_others(monkeypatch, capsys) -> None:
    monkeypatch.setitem(cc._BUSY, "python", "raise SystemExit('no such core here')")
    victim, busy = allowed_cores()[:2]
    before = _children()
    assert cc.main(["--victim", str(victim), "--cores", str(busy), "--work", "python", "--reps", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "did not start: no such core here" in err
    assert _children() <= before


def test_bad_cores_are_one_line_and_exit_2(capsys) -> None:
    victim = allowed_cores()[0]
    assert cc.main(["--victim", str(victim), "--cores", str(victim)]) == 2
    assert "cannot also be a busy one" in capsys.readouterr().err
    assert cc.main(["--victim", str(victim), "--cores", "100000"]) == 2
    assert "is not one this process may run on" in capsys.readouterr().err
