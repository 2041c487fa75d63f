"""aptmoe.host: the cores a process may use, and the reference loop that says how fast its
thread runs just now."""

from __future__ import annotations

import pytest

from aptmoe.host import allowed_cores, python_loop_s, run_loop_s


def test_the_reference_loop_takes_time_in_proportion_to_its_iterations() -> None:
    short, long = python_loop_s(iterations=100_000), python_loop_s(iterations=400_000)
    assert 0 < short < long


def test_the_reference_loop_refuses_nothing_to_time() -> None:
    with pytest.raises(ValueError, match="at least one"):
        python_loop_s(repeats=0)
    with pytest.raises(ValueError, match="at least one"):
        python_loop_s(iterations=0)


def test_a_runs_loop_is_the_mean_over_ranks_and_both_ends() -> None:
    assert run_loop_s({"before": [0.1, 0.2], "after": [0.3, 0.4]}) == pytest.approx(0.25)
    assert run_loop_s(None) is None and run_loop_s({}) is None and run_loop_s({"before": [], "after": []}) is None


def test_allowed_cores_are_sorted_and_not_empty() -> None:
    cores = allowed_cores()
    assert cores and cores == sorted(cores)
