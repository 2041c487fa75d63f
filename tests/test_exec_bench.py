"""python -m aptmoe.exec.bench: the executor's section of BENCHMARKS.md from stored results."""

from __future__ import annotations

import json

from aptmoe.exec import bench


def _results(path, repeats: list[float] | None) -> None:
    metrics = {"busy/compute": 0.5, "busy/h2d": 0.25, "busy/cpu": 0.1, "cpu/expert_share": 0.01}

    def sched(steps):
        s = {"step_s": steps, "peak_gpu_bytes": 2e9, "metrics": metrics, "device": "NVIDIA H200", "oom": False}
        if repeats:
            s["repeats"] = {"iteration_s": repeats, "kept": 1}
        return s
    path.write_text(json.dumps({"command": ["aptmoe-run", "--gpus", "2"], "created": "2026-11-29T21:00:00",
                                "config": {"cluster": {"gpus_per_node": 2}, "train": {"batch_size": 64}},
                                "schedules": {"GPipe": {"oom": True}, "Mobius": sched([3.0, 2.9, 3.1]),
                                              "APTMoE": sched([2.0, 2.5, 2.4])}}))


def test_a_section_gives_medians_the_ratio_to_mobius_and_every_repeated_run(tmp_path) -> None:
    one, three = tmp_path / "one.json", tmp_path / "three.json"
    _results(one, None)
    _results(three, [2.6, 2.3, 2.2])
    text = bench.section({"single": one, "repeated": three})
    single, repeated = text.split("### repeated")
    assert "of one run (3 steps" in single and "runs:" not in single
    assert "| GPipe | refused or OOM |" in single
    assert "| APTMoE | 2.400 | 2.00, 2.50, 2.40 | 26.7 |" in single and "| 1.25x |" in single   # 3.0 / 2.4
    assert "the median run of 3" in repeated and "2.00, 2.50, 2.40 (runs: 2.60, 2.30, 2.20)" in repeated


def test_a_case_passes_the_planning_profile_and_repeats_to_aptmoe_run(tmp_path, monkeypatch) -> None:
    calls = []
    monkeypatch.setattr(bench.subprocess, "run", lambda cmd, check: calls.append(cmd))
    out = bench.run_case("regime", 4, tmp_path, 3, repeats=3, calibration="runs/x4/h200-4gpu.json")
    assert out == tmp_path / "regime4" / "results.json"
    cmd = calls[0]
    assert cmd[cmd.index("--calibration") + 1] == "runs/x4/h200-4gpu.json"
    assert cmd[cmd.index("--repeats") + 1] == "3" and cmd[cmd.index("--gpus") + 1] == "4"
    assert cmd[cmd.index("--link-bandwidth") + 1] == "8"
    bench.run_case("demo", 4, tmp_path, 3)
    assert "--calibration" not in calls[1] and "--repeats" not in calls[1] and "--link-bandwidth" not in calls[1]
