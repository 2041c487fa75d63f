"""calibration/cpu_vs_runs.py: a profile's CPU expert curves against a stored run's CPU experts."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from aptmoe.calibration import cpu_vs_runs
from aptmoe.config import RunConfig
from aptmoe.profile import ProfileCost, load_profile
from aptmoe.stored import read_json, stored_file
from aptmoe.trace import Trace, is_cpu_job, run_trace

DOCS = Path(__file__).resolve().parent.parent / "docs"
RUN = DOCS / "validation-h200-2gpu-v7-fresh" / "cells" / "M6x4-G0.5-cap8-2gpu" / "real"


def test_each_job_is_set_beside_the_profiles_expert_at_the_runs_threads() -> None:
    ratios = cpu_vs_runs.job_ratios("h200-2gpu", [RUN])
    # the session-23 count of this run's CPU jobs (its 67 in `cpu_jobs_alike`): 47 forward, 20 backward
    assert {k: len(v) for k, v in ratios.items()} == {"MoE d2048 fwd": 47, "MoE d2048 bwd": 20, "all": 67}
    cfg = RunConfig.from_dict(read_json(RUN / "results.json")["config"])
    assert cfg.cluster.worker_cores == 14
    cost = ProfileCost(load_profile("h200-2gpu"), cfg.model)
    first = min((e for e in Trace.load(run_trace(RUN, "APTMoE")).events if is_cpu_job(e)), key=lambda e: e.start_s)
    want = first.dur_s / cost.cpu_expert_s(first.args["tokens"], "fwd", 14)
    assert want in ratios["MoE d2048 fwd"]
    all_ = next(f for f in cpu_vs_runs.fits(ratios) if f.group == "all")
    assert all_.jobs == 67 and all_.median_ratio == pytest.approx(sorted(ratios["all"])[33])
    assert all_.mean_abs_log == pytest.approx(sum(abs(math.log(x)) for x in ratios["all"]) / 67)
    assert cpu_vs_runs.fits(ratios)[-1].group == "all"
    # a run from before the executor kept its threads' clocks has no shares to give
    assert all_.ran is None and all_.queued is None


def test_the_worker_threads_clocks_give_the_shares_it_ran_and_queued(tmp_path, capsys) -> None:
    """The stored run's jobs, given clocks: ran half and queued a tenth of their time."""
    run = tmp_path / "real"
    run.mkdir()
    kept = stored_file(RUN / "results.json")          # results.json.xz, as stored
    shutil.copy(kept, run / kept.name)
    trace = Trace.load(run_trace(RUN, "APTMoE"))
    for e in trace.events:
        if is_cpu_job(e):
            e.args.update(run_us=0.5 * e.dur_s * 1e6, queued_us=0.1 * e.dur_s * 1e6)
    trace.save(run / "trace-APTMoE.json")
    shares = cpu_vs_runs.job_shares("h200-2gpu", [run])
    assert len(shares["all"]["run_us"]) == 67
    all_ = cpu_vs_runs.fits(cpu_vs_runs.job_ratios("h200-2gpu", [run]), shares)[-1]
    assert (all_.ran, all_.queued) == (pytest.approx(0.5), pytest.approx(0.1))
    assert cpu_vs_runs.main(["h200-2gpu", str(run)]) == 0
    assert capsys.readouterr().out.splitlines()[-1].split()[-2:] == ["0.50", "0.10"]


def test_a_matrix_folder_stands_for_its_runs_and_the_table_prints(tmp_path, capsys) -> None:
    cells = sorted(RUN.parent.parent.glob("*/real"))          # every cell's run, its results.json.xz
    assert len(cells) > 1 and cpu_vs_runs.run_folders([RUN.parent.parent.parent]) == cells
    out = tmp_path / "fit.json"
    assert cpu_vs_runs.main(["h200-2gpu", str(RUN), "--json", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "1 runs; profile h200-2gpu" and lines[-1].split()[:2] == ["all", "67"]
    assert [r["group"] for r in json.loads(out.read_text())][-1] == "all"


@pytest.mark.parametrize("args, says", [(["h200-2gpu", "{tmp}"], "no measured run"),
                                        (["no-such-profile", str(RUN)], "no-such-profile")])
def test_bad_input_gets_one_line(tmp_path, capsys, args, says) -> None:
    assert cpu_vs_runs.main([a.format(tmp=tmp_path) for a in args]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and says in err[0]
