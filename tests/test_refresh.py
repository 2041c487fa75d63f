"""calibration/refresh.py: a run of some parts put onto a base profile, curve by curve."""

from __future__ import annotations

import copy
import json

import pytest

from aptmoe.calibration.merge import SECTIONS
from aptmoe.calibration.refresh import main, measured_sections, onto_base
from aptmoe.profile import Profile, ProfileError, load_profile

BASE = load_profile("h200-2gpu").to_dict()


def _run(measured: tuple[str, ...], **changes) -> dict:
    """A calibration of h200-2gpu's machine that measured the sections `measured` (the others
    listed as skipped), with `changes` to its sections."""
    new = copy.deepcopy(BASE)
    new["made_by"] = {**new["made_by"], "command": "aptmoe-calibrate --out new.json", "date": "2026-11-30T21:00:00"}
    new["skipped"] = [{"part": s, "reason": "--skip"} for s in (*SECTIONS, "links.p2p.intra_node")
                      if s not in measured and not (s == "links.p2p.intra_node" and "p2p" in measured)]
    new["skipped"].append({"part": "links.p2p.inter_node", "reason": "one host"})
    new.update(changes)
    return new


def _m_curves(scale: float) -> list[dict]:
    """h200-2gpu's MoE-M CPU curves at 14 threads, `scale` times slower."""
    return [{**c, "seconds": [s * scale for s in c["seconds"]]} for c in BASE["cpu_expert"]
            if c["d"] == 2048 and c["threads"] == 14]


def test_the_run_s_curves_replace_their_twins_and_the_base_keeps_the_rest() -> None:
    new = _run(("cpu_expert",), cpu_expert=_m_curves(1.5))
    assert measured_sections(new) == ["cpu_expert"]
    out = onto_base(BASE, new, name="lease", command="aptmoe-calibrate --base h200-2gpu")
    assert len(out["cpu_expert"]) == len(BASE["cpu_expert"]) == 12
    for mine, theirs in zip(out["cpu_expert"], BASE["cpu_expert"]):
        twin = mine["d"] == 2048 and mine["threads"] == 14
        assert mine["seconds"] == ([s * 1.5 for s in theirs["seconds"]] if twin else theirs["seconds"])
    assert out["adam"] == BASE["adam"] and out["gpu"] == BASE["gpu"] and out["name"] == "lease"
    assert "10 curves this run did not measure kept from the base h200-2gpu" in out["sources"]["cpu_expert"]
    Profile.from_dict(out, "lease.json")               # a valid profile


def test_a_curve_the_base_lacks_is_added() -> None:
    extra = {**_m_curves(1.0)[0], "threads": 7}
    out = onto_base(BASE, _run(("cpu_expert",), cpu_expert=[extra]), name="x", command="c")
    assert len(out["cpu_expert"]) == 13 and out["cpu_expert"][-1] == extra


def test_links_without_p2p_keep_the_base_s_p2p_and_p2p_alone_keeps_the_base_s_links() -> None:
    links = copy.deepcopy(BASE["links"])
    links["h2d"]["pinned"]["GBps"] = 40.0
    links["p2p"]["intra_node"]["GBps"] = 1.0
    out = onto_base(BASE, _run(("links",), links=links), name="x", command="c")
    assert out["links"]["h2d"]["pinned"]["GBps"] == 40.0 and out["links"]["p2p"] == BASE["links"]["p2p"]
    assert not any(s["part"] == "links.p2p.intra_node" for s in out["skipped"])
    out = onto_base(BASE, _run(("p2p", "recv_wait"), links=links), name="x", command="c")
    assert out["links"]["p2p"]["intra_node"]["GBps"] == 1.0 and out["links"]["h2d"] == BASE["links"]["h2d"]


def test_another_machine_or_nothing_measured_is_refused() -> None:
    other = _run(("cpu_expert",))
    other["hardware"] = {**other["hardware"], "gpu_count": 4}
    with pytest.raises(ProfileError, match="of another machine: its gpu_count is 2, this one's 4"):
        onto_base(BASE, other, name="x", command="c")
    with pytest.raises(ProfileError, match="measured nothing"):
        onto_base(BASE, _run(()), name="x", command="c")


def test_the_history_names_the_base_and_the_run() -> None:
    out = onto_base(BASE, _run(("adam",)), name="x", command="aptmoe-calibrate --base h200-2gpu")
    command = out["made_by"]["command"]
    assert command.startswith(BASE["made_by"]["command"].split(" | ")[0])
    assert "adam from: aptmoe-calibrate --out new.json" in command and command.endswith("--base h200-2gpu")
    json.dumps(out)


def test_the_command_writes_the_run_onto_the_base_and_refuses_bad_input_in_one_line(tmp_path, capsys) -> None:
    run = tmp_path / "cpu-1.json"
    Profile.from_dict(_run(("cpu_expert",), cpu_expert=_m_curves(1.5)), str(run)).save(run)
    out = tmp_path / "lease.json"
    assert main(["h200-2gpu", str(run), "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    lease = json.loads(out.read_text())
    assert lease["name"] == "h200-2gpu" and len(lease["cpu_expert"]) == 12
    assert lease["made_by"]["command"].endswith(f"refresh h200-2gpu {run} --out {out}")
    for bad in (["h200-2gpu", str(tmp_path / "none.json"), "--out", str(tmp_path / "x.json")],
                ["a800-paper", str(run), "--out", str(tmp_path / "x.json")]):
        assert main(bad) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("python -m aptmoe.calibration.refresh: error: ")
    assert not (tmp_path / "x.json").exists()
