"""The executor's host cost per block call: measured from its own trace, stored in the
profile (optional section), and a floor under every block's predicted time."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from aptmoe.config import moe_model
from aptmoe.profile import Dispatch, ProfileCost, ProfileError, load_profile
from aptmoe.stored import read_json
from aptmoe.trace import Trace

MOE_S = moe_model("S", 8)
D = Dispatch("cuda", {"a": {"fwd": 4e-4, "bwd": 9e-4}, "e": {"fwd": 1.5e-4, "bwd": 3e-4},
                      "g": {"fwd": 1e-4, "bwd": 2e-4}}, {"fwd": 5e-4, "bwd": 1e-3}, 120)


@pytest.fixture(scope="module")
def with_dispatch():
    return dataclasses.replace(load_profile("a800-paper"), dispatch=D)


def test_dispatch_round_trips_and_is_optional(with_dispatch, tmp_path) -> None:
    again = load_profile(str(with_dispatch.save(tmp_path / "d.json")))
    assert again.dispatch == D and "combine" not in json.loads(again.to_json())["dispatch"]
    split = dataclasses.replace(with_dispatch, dispatch=dataclasses.replace(D, combine={"fwd": 2e-4, "bwd": 4e-4}))
    assert load_profile(str(split.save(tmp_path / "c.json"))).dispatch == split.dispatch
    assert "dispatch" not in json.loads(load_profile("a800-paper").to_json())


@pytest.mark.parametrize("mutate, field", [
    (lambda d: d.update(device="tpu"), "dispatch.device"),
    (lambda d: d["seconds"].update(x={"fwd": 1e-4}), "dispatch.seconds.x"),
    (lambda d: d["seconds"]["a"].update(rec=1e-4), "dispatch.seconds.a.rec"),
    (lambda d: d["seconds"]["e"].update(fwd=-1.0), "dispatch.seconds.e.fwd"),
    (lambda d: d.pop("samples"), "dispatch.samples"),
    (lambda d: d["between"].update(fwd=-1e-3), "dispatch.between.fwd"),
    (lambda d: d.pop("between"), "dispatch.between"),
    (lambda d: d.update(loop_s=0.0), "dispatch.loop_s"),
    (lambda d: d.update(loop_s="fast"), "dispatch.loop_s"),
    (lambda d: d.update(combine={"fwd": 6e-4}), "dispatch.combine.fwd"),       # more than between
    (lambda d: d.update(combine={"fwd": -1e-4}), "dispatch.combine.fwd"),
    (lambda d: d.update(combine={"up": 1e-4}), "dispatch.combine.up"),
    (lambda d: d.update(post={"ack": 1e-4}), "dispatch.post.ack"),
    (lambda d: d.update(post={"send": -1e-4}), "dispatch.post.send"),
    (lambda d: d.update(action={"up": {"start": 1e-4}}), "dispatch.action.up"),
    (lambda d: d.update(action={"fwd": {"middle": 1e-4}}), "dispatch.action.fwd.middle"),
    (lambda d: d.update(action={"rec": {"last": -1e-4}}), "dispatch.action.rec.last"),
])
def test_a_bad_dispatch_section_is_named(with_dispatch, tmp_path, mutate, field) -> None:
    d = with_dispatch.to_dict()
    mutate(d["dispatch"])
    (tmp_path / "bad.json").write_text(json.dumps(d))
    with pytest.raises(ProfileError, match=field.replace(".", r"\.")):
        load_profile(str(tmp_path / "bad.json"))


def test_the_cost_source_reports_host_time_beside_kernel_time(with_dispatch) -> None:
    plain = ProfileCost(load_profile("a800-paper"), MOE_S)
    cost = ProfileCost(with_dispatch, MOE_S)
    for kind, dirs in D.seconds.items():
        for direction, host in dirs.items():
            assert cost.host_s(kind, direction) == host and plain.host_s(kind, direction) == 0.0
            for tokens in (1, 64, 4096, 65536):
                kernel = plain.gpu_s(kind, tokens, direction)
                assert cost.gpu_s(kind, tokens, direction) == kernel          # the curve, untouched
    assert cost.between_s("bwd") == 1e-3 and plain.between_s("bwd") == 0.0
    assert cost.host_runs_ahead() and plain.host_runs_ahead()
    on_cpu = ProfileCost(dataclasses.replace(with_dispatch, dispatch=dataclasses.replace(D, device="cpu")), MOE_S)
    assert not on_cpu.host_runs_ahead()


class _Cost:
    """Kernel and host seconds by block kind, for the host clock's closed forms."""

    def __init__(self, kernel: dict, host: dict, between: float = 0.0, ahead: bool = True) -> None:
        self.kernel, self.host, self.between, self.ahead = kernel, host, between, ahead

    def gpu_s(self, kind, tokens, direction):
        return self.kernel[kind] if tokens else 0.0

    def host_s(self, kind, direction):
        return self.host[kind]

    def between_s(self, direction):
        return self.between

    def host_runs_ahead(self):
        return self.ahead


def _rank(cost, now=10.0, reach=0):
    from collections import deque
    from types import SimpleNamespace

    from aptmoe.sim.issuing import IssuingThread

    return SimpleNamespace(env=SimpleNamespace(now=now), cost=cost, host_t=now, runs_ahead=cost.host_runs_ahead(),
                           host_free=False, busy={"compute": 0.0}, _hold=lambda s, r="compute": s,
                           issuing=IssuingThread(None, capped=False), recv_slowdown=dict.fromkeys("aeg", 1.0),
                           recvs_waiting=0, reach=reach, block_ends=deque())


def _issued(r, work) -> tuple[list[float], list[float | None]]:
    """Run RankModel._issue on the stand-in rank `r` (whose hold returns its seconds): the
    clock advances by each hold, as SimPy's would; each block's duration and host time as
    the engine records them."""
    from aptmoe.sim.engine import RankModel

    durs: list[float] = []
    hosts: list[float | None] = []
    t0 = r.env.now

    def record(i, start, seconds, host_s):
        # blocks back to back: each starts where the one before it ended
        assert i == len(durs) and start == pytest.approx(t0 + sum(durs))
        durs.append(seconds)
        hosts.append(host_s)

    for held in RankModel._issue(r, work, record):
        r.env.now += held
    return durs, hosts


def test_a_gpu_hides_the_host_behind_long_blocks_and_waits_for_it_on_short_ones() -> None:
    # attention 2 s of kernels, then three gates of none; the host takes 1 s per block.
    r = _rank(_Cost({"a": 2.0, "g": 0.0}, {"a": 1.0, "g": 1.0}))
    durs, hosts = _issued(r, [("a", 8, "fwd"), ("g", 8, "fwd"), ("g", 8, "fwd"), ("g", 8, "fwd")])
    assert hosts == [1.0] * 4                                            # each call's own host time
    # the host issues the first gate while the GPU runs the attention: it ends with it
    assert durs == pytest.approx([2.0, 0.0, 1.0, 1.0])
    assert sum(durs) == pytest.approx(max(2.0 + 0.0, 1.0 * 4))       # max(kernels, host) for a back-to-back run
    # host cost zero: every block takes its kernel time, as before the host clock existed
    # (the engine's shortcut for sources without host times gives the same)
    r = _rank(_Cost({"a": 2.0, "g": 0.5}, {"a": 0.0, "g": 0.0}))
    assert _issued(r, [("a", 8, "fwd"), ("g", 8, "fwd")]) == ([2.0, 0.5], [0.0, 0.0])
    r.host_free = True                  # no host time to give the calls' events either
    assert _issued(r, [("a", 8, "fwd"), ("g", 8, "fwd")]) == ([2.0, 0.5], [None, None])
    # a block without tokens is not issued at all
    r = _rank(_Cost({"e": 1.0}, {"e": 1.0}))
    assert _issued(r, [("e", 0, "fwd")]) == ([0.0], [0.0]) and r.host_t == 10.0
    # a reach of two blocks (ScheduleConfig.ahead_blocks): having issued the second gate (at
    # 13), the host waits for the attention's end (15), so the gates after it take the host's
    # second each; unbounded, all four end with the attention
    for reach, want in ((2, [5.0, 0.0, 0.0, 1.0, 1.0]), (0, [5.0, 0.0, 0.0, 0.0, 0.0])):
        r = _rank(_Cost({"a": 5.0, "g": 0.0}, {"a": 1.0, "g": 1.0}), reach=reach)
        assert _issued(r, [("a", 8, "fwd")] + [("g", 8, "fwd")] * 4)[0] == pytest.approx(want), reach


def test_each_call_is_slowed_by_what_runs_beside_the_thread_as_it_starts() -> None:
    """What runs beside the issuing thread (an Adam chunk, a copy) is read as each block's call
    starts: one that begins halfway through a run of blocks slows the calls after it, not the
    ones before (read once a run, until session 37, it slowed all or none)."""
    from types import SimpleNamespace

    r = _rank(_Cost({"g": 0.0}, {"g": 1.0}))
    r.issuing = SimpleNamespace(slowdown=lambda: 1.0 if r.env.now < 11.0 else 3.0)   # Adam from 11 s
    durs, hosts = _issued(r, [("g", 8, "fwd")] * 3)
    assert hosts == pytest.approx([1.0, 3.0, 3.0]) and durs == pytest.approx([1.0, 3.0, 3.0])
    # a receive that starts waiting halfway slows the kernels issued after it
    r = _rank(_Cost({"a": 2.0}, {"a": 0.0}))
    r.recv_slowdown = dict.fromkeys("aeg", 1.5)
    r.issuing = SimpleNamespace(slowdown=lambda: 1.0)
    start = r.env.now

    class Waiting:                      # no receive waits before 12 s, one after
        def __bool__(self):
            return r.env.now >= start + 2.0

    r.recvs_waiting = Waiting()
    assert _issued(r, [("a", 8, "fwd")] * 2)[0] == pytest.approx([2.0, 3.0])


def test_on_cpu_ranks_a_block_takes_its_host_cost_and_its_compute_one_after_the_other() -> None:
    """One thread issues and computes: the Python around the call (measured on a model too
    small to compute) and then the arithmetic."""
    r = _rank(_Cost({"a": 2.0, "g": 0.0}, {"a": 1.0, "g": 1.0}, ahead=False))
    assert _issued(r, [("a", 8, "fwd"), ("g", 8, "fwd")])[0] == pytest.approx([3.0, 1.0])
    assert r.host_t == pytest.approx(14.0)


def test_work_between_blocks_delays_the_host_on_a_gpu_and_the_stream_on_cpu() -> None:
    from aptmoe.sim.engine import RankModel

    r = _rank(_Cost({"e": 0.0}, {"e": 0.0}, between=0.25))
    assert list(RankModel._between(r, 0.25)) == [] and r.host_t == pytest.approx(10.25)
    assert _issued(r, [("e", 4, "fwd")])[0] == pytest.approx([0.25])  # the GPU waits for the host
    r = _rank(_Cost({"e": 0.0}, {"e": 0.0}, between=0.25, ahead=False))
    assert list(RankModel._between(r, 0.25)) == [0.25]                          # one hold on the stream


def test_spans_are_read_by_kind_and_direction() -> None:
    from aptmoe.calibration.dispatch import dispatch_from_trace

    tr = Trace("real")
    t = 0.0
    for name, cat, dur in [("0F0@0:a", "forward", 1.0), ("0F0@0:e3", "forward", 0.2), ("0F1@0:e1", "forward", 0.4),
                           ("0B0@0:e3", "recompute", 0.3), ("0B0@0:e3", "backward", 0.5), ("0B0@0:g", "backward", 0.1),
                           ("0F0", "forward", 9.0), ("0LF@0:e3", "load-stage", 7.0)]:
        tr.add(name, 0, "load" if cat.startswith("load") else "compute", t, t + dur, cat)
        t += dur
    tr.add("0F0", 0, "compute", 0.0, 1.8, "forward")      # encloses the three forward blocks: 0.2 between
    d = dispatch_from_trace(tr, "cpu")
    assert d.between == {"fwd": pytest.approx(0.2)}
    assert d.combine == {"fwd": pytest.approx(0.2)}          # the last expert (1.2-1.6) to the action's end
    assert d.seconds == {"a": {"fwd": pytest.approx(1.0)}, "e": {"bwd": pytest.approx(0.5), "fwd": pytest.approx(0.3)},
                         "g": {"bwd": pytest.approx(0.1)}}
    assert d.samples == 6 and d.device == "cpu"
    with pytest.raises(ValueError, match="no block events"):
        dispatch_from_trace(Trace("real"), "cpu")


def test_message_posts_are_the_issuing_threads_own_and_a_receive_s_only_on_a_gpu(with_dispatch, tmp_path) -> None:
    """Dispatch.post: the median host time of the sends and receives the compute thread
    posted (the trace's post_us and by); the net thread's are not the issuing thread's, and
    on CPU ranks a receive's call holds its wait for the bytes. Round-trips, scales with the
    host, and is left out where the probe had no messages (one rank)."""
    from aptmoe.calibration.dispatch import dispatch_from_trace, median_dispatch

    tr = Trace("real")
    tr.add("0F0@0:a", 0, "compute", 0.0, 1.0, "forward")
    for name, cat, us, by in [("0SF0", "send", 300.0, "compute"), ("0SF1", "send", 200.0, "compute"),
                              ("0SF2", "send", 250.0, "compute"), ("1RB0", "recv", 200.0, "compute"),
                              ("1RB1", "recv", 900.0, "net")]:
        tr.add(name, 0, "net", 1.0, 1.1, cat, post_us=us, by=by)
    assert dispatch_from_trace(tr, "cuda").post == {"send": pytest.approx(250e-6), "recv": pytest.approx(200e-6)}
    assert dispatch_from_trace(tr, "cpu").post == {"send": pytest.approx(250e-6)}
    alone = Trace("real")
    alone.add("0F0@0:a", 0, "compute", 0.0, 1.0, "forward")
    assert dispatch_from_trace(alone, "cuda").post is None
    posted = dataclasses.replace(D, post={"send": 3e-4, "recv": 2e-4})
    assert median_dispatch([posted, D, dataclasses.replace(posted, post={"send": 5e-4})]).post == \
        {"send": pytest.approx(4e-4), "recv": pytest.approx(2e-4)}
    again = load_profile(str(dataclasses.replace(with_dispatch, dispatch=posted).save(tmp_path / "p.json")))
    assert again.dispatch == posted and "post" not in json.loads(with_dispatch.to_json())["dispatch"]
    assert posted.scaled(2.0).post == {"send": pytest.approx(6e-4), "recv": pytest.approx(4e-4)}
    cost = ProfileCost(again, MOE_S)
    assert (cost.post_s("send"), cost.post_s("recv")) == (3e-4, 2e-4)
    assert ProfileCost(with_dispatch, MOE_S).post_s("send") == 0.0


def test_host_times_are_the_calls_own_by_kind_and_direction() -> None:
    from aptmoe.calibration.dispatch import host_times

    tr = Trace("real")
    for name, cat, host_us in [("0F0@0:e3", "forward", 100.0), ("0F1@0:e1", "forward", 300.0),
                               ("0B0@0:e3", "recompute", 200.0), ("0B0@0:e3", "backward", 50.0), ("0F0@0:a", "forward", None)]:
        tr.add(name, 0, "compute", 0.0, 1.0, cat, **({} if host_us is None else {"host_us": host_us}))
    # spans of 1 s each: the host times are read from the events' own figure, not the spans;
    # a block without one (a trace from before the executor kept it) is left out
    assert host_times(tr) == {"e": {"bwd": pytest.approx(50e-6), "fwd": pytest.approx(200e-6)}}


def test_the_probe_measures_the_executor_on_cpu_ranks() -> None:
    pytest.importorskip("torch")
    from aptmoe.calibration.dispatch import measure_dispatch

    d = measure_dispatch("cpu", 2)
    assert d.loop_s is not None and 1e-4 < d.loop_s < 10      # the probe's ranks timed the reference loop
    assert set(d.seconds) == {"a", "g", "e"}
    assert all(set(v) == {"fwd", "bwd"} and min(v.values()) > 0 for v in d.seconds.values())
    assert d.samples >= 4 * 3 * 10          # blocks x passes x layers-and-micro-batches, at least
    # the executor kept its embedding's and loss's times, so the actions' own work is apart:
    # on two ranks stage 0 embeds and stage 1 computes the loss, each pass its own figures
    assert d.action is not None and {"fwd", "bwd"} <= set(d.action)
    for p in d.action:
        assert {"start", "end", "first", "last"} <= set(d.action[p]), (p, d.action[p])
        assert min(d.action[p]["first"], d.action[p]["last"]) > 0, (p, d.action[p])


def test_merge_takes_dispatch_or_drops_it(with_dispatch, tmp_path) -> None:
    pytest.importorskip("torch")
    from aptmoe.calibration.merge import main as merge_main

    src = with_dispatch.to_dict()
    src["sources"]["dispatch"] = "measured: a test figure"
    (tmp_path / "d.json").write_text(json.dumps(src))
    assert merge_main(["a800-paper", "--take", f"dispatch={tmp_path / 'd.json'}", "--out",
                       str(tmp_path / "m.json")]) == 0
    merged = load_profile(str(tmp_path / "m.json"))
    assert merged.dispatch == D and merged.sources["dispatch"] == "measured: a test figure"
    # taking the section from a file without it leaves none, and none of its sources
    assert merge_main([str(tmp_path / "m.json"), "--take", "dispatch=a800-paper", "--out",
                       str(tmp_path / "n.json")]) == 0
    none = load_profile(str(tmp_path / "n.json"))
    assert none.dispatch is None and "dispatch" not in none.sources


def test_the_split_weighs_a_gpu_expert_by_the_longer_of_kernels_and_host(with_dispatch) -> None:
    from aptmoe.affinity import _layer

    counts = [64, 8, 1, 0, 0, 0, 0, 0]
    plain = _layer(counts, ProfileCost(load_profile("a800-paper"), MOE_S), MOE_S, threads=16, resident=(),
                   load_attn_gate=False, remaining_mbs=2, direction="fwd")
    slow = _layer(counts, ProfileCost(with_dispatch, MOE_S), MOE_S, threads=16, resident=(),
                  load_attn_gate=False, remaining_mbs=2, direction="fwd")
    host = D.seconds["e"]["fwd"]
    for e in (0, 1, 2):
        assert slow.gpu_s[e] == pytest.approx(max(plain.gpu_s[e], 2 * host))
    assert slow.gpu_s[2] > plain.gpu_s[2]            # one token: the host, not the kernels


def test_the_wide_probe_is_the_probe_at_moe_s_widths() -> None:
    from aptmoe.calibration.dispatch import PROBE_FLAGS, probe_args

    tiny, wide = probe_args("cuda", 1), probe_args("cuda", 1, wide=True)
    for flag in ("--embedding_dim", "--hidden_dim", "--num_heads"):
        assert flag in tiny and flag not in wide          # the S preset's own widths
    assert "--model_config=S" in wide
    pairs = [tiny[i:i + 2] for i in range(len(tiny)) if tiny[i] in ("--embedding_dim", "--hidden_dim", "--num_heads")]
    rest = list(tiny)
    for flag, value in pairs:
        i = rest.index(flag)
        assert rest[i + 1] == value
        del rest[i:i + 2]
    assert rest == wide                                   # everything else the same
    assert wide[wide.index("--num_layers") + 1] == str(PROBE_FLAGS["num_layers"])


def test_the_probe_loads_kernels_as_the_runs_it_predicts_do() -> None:
    """On a GPU the probe runs with validate's (and the matrix's) kernel loading: eager processes
    ran the probe a median 13% slower than lazy ones, pair by pair (docs/measured/session36), so
    a lazy probe times a faster executor than the runs its figures are checked against."""
    from aptmoe.calibration.dispatch import PROBE_KERNEL_LOADING, probe_args
    from aptmoe.sim.validate import make_validate_parser

    validate = make_validate_parser("aptmoe-sim").parse_args(["--calibration", "a800-paper", "--out", "x"])
    assert validate.kernel_loading == PROBE_KERNEL_LOADING == "eager"
    for wide in (False, True, "M"):
        gpu, cpu = probe_args("cuda", 1, wide), probe_args("cpu", 2, wide)
        assert gpu[-2:] == ["--kernel-loading", "eager"] and gpu.count("--kernel-loading") == 1
        assert "--kernel-loading" not in cpu              # no CUDA modules to load on CPU ranks


def test_the_wide_probe_takes_any_preset_s_widths_and_only_those() -> None:
    from aptmoe.calibration.dispatch import probe_args

    s, m = probe_args("cuda", 2, wide=True), probe_args("cuda", 2, wide="M")
    assert "--model_config=M" in m and "--model_config=S" not in m
    assert [a for a in m if a != "--model_config=M"] == [a for a in s if a != "--model_config=S"]
    assert probe_args("cuda", 2, wide="S") == s
    with pytest.raises(ValueError, match="one of S, M, L"):
        probe_args("cuda", 2, wide="XL")


def test_several_probe_runs_give_each_figure_its_median() -> None:
    from aptmoe.calibration.dispatch import median_dispatch

    def run(f: float, loop: float | None, combine: dict | None) -> Dispatch:
        return dataclasses.replace(D.scaled(f), loop_s=loop, combine=combine)

    runs = [run(1.0, 0.025, {"fwd": 1e-4}), run(1.6, 0.040, {"fwd": 9e-4}), run(1.1, None, None)]
    m = median_dispatch(runs)
    assert m.seconds["a"]["bwd"] == pytest.approx(9e-4 * 1.1) and m.seconds["e"]["fwd"] == pytest.approx(1.5e-4 * 1.1)
    assert m.between == {"fwd": pytest.approx(5e-4 * 1.1), "bwd": pytest.approx(1e-3 * 1.1)}
    assert m.loop_s == pytest.approx(0.0325)              # of the runs that timed the loop
    assert m.combine == {"fwd": pytest.approx(5e-4)}      # capped by its between (5e-4 * 1.1)
    assert m.samples == 3 * D.samples
    assert median_dispatch([runs[0]]) == runs[0]
    with pytest.raises(ValueError, match="different devices"):
        median_dispatch([D, dataclasses.replace(D, device="cpu")])
    apart = [dataclasses.replace(D, action={"fwd": {"start": s, "last": 2 * s}}) for s in (1e-4, 3e-4, 2e-4)]
    assert median_dispatch(apart).action == {"fwd": {"start": pytest.approx(2e-4), "last": pytest.approx(4e-4)}}
    with pytest.raises(ValueError, match="ends apart and some did not"):
        median_dispatch([*apart, D])          # `between` means another thing in each


def _ended_trace() -> Trace:
    """One stage of two layers, as the executor traces it since session 33: a forward whose
    embedding (0.05 s) and loss (0.1 s) are in its start and end gaps, and a recomputing
    backward with the embedding again at its start (0.04), the loss and its backward (0.06 +
    0.2) between the recompute and the first backward call, and the embedding's backward at
    its end (0.03)."""
    tr = Trace("real")
    tr.add("0F0@0:a", 0, "compute", 0.3, 0.4, "forward", layer=0)
    tr.add("0F0@1:a", 0, "compute", 0.6, 0.7, "forward", layer=1)      # 0.2 between the layers
    tr.add("0F0", 0, "compute", 0.0, 1.0, "forward", embed_us=5e4, head_us=1e5)   # end gap 0.3: 0.1 loss
    tr.add("0B0@1:a", 0, "compute", 2.1, 2.2, "recompute", layer=1)    # start gap 0.1: 0.04 embedding
    tr.add("0B0@0:a", 0, "compute", 2.3, 2.4, "recompute", layer=0)    # 0.1 between
    tr.add("0B0@0:a", 0, "compute", 2.9, 3.1, "backward", layer=0)     # rec end gap 0.5: 0.26 loss
    tr.add("0B0@1:a", 0, "compute", 3.4, 3.6, "backward", layer=1)     # 0.3 between
    tr.add("0B0", 0, "compute", 2.0, 3.7, "backward", embed_us=4e4, head_us=6e4, head_back_us=2e5,
           embed_back_us=3e4)                                          # end gap 0.1: 0.03 embedding's
    return tr


def test_an_actions_own_work_is_set_apart_from_its_layers_where_the_executor_timed_its_ends() -> None:
    """Session 33: the probe's one stage is the first and the last at once, so its start and
    end gaps hold the embedding and the loss; the executor's `embed_us`, `head_us` (...) say
    how much. `action` keeps each pass's start and end without them and the two stages' work
    apart, and `between` is then the time between the layers' blocks alone."""
    from aptmoe.calibration.dispatch import action_spans, dispatch_from_trace, has_ends

    tr = _ended_trace()
    assert has_ends(tr)
    d = dispatch_from_trace(tr, "cuda")
    assert d.between == {"fwd": pytest.approx(0.1), "rec": pytest.approx(0.05), "bwd": pytest.approx(0.15)}
    a = d.action
    assert a["fwd"] == {"start": pytest.approx(0.25), "end": pytest.approx(0.2), "first": pytest.approx(0.05),
                        "last": pytest.approx(0.1)}
    assert a["rec"] == {"start": pytest.approx(0.06), "end": pytest.approx(0.24), "first": pytest.approx(0.04),
                        "last": pytest.approx(0.06)}
    assert a["bwd"] == {"start": pytest.approx(0.0), "end": pytest.approx(0.07), "first": pytest.approx(0.03),
                        "last": pytest.approx(0.2)}
    # the last layer's combine is in its pass's end: the forward's one expert-less layer has none
    assert d.combine is None
    # a trace from before: the ends stay in `between`, spread over the layers, and no `action`
    for e in tr.events:
        for k in ("embed_us", "head_us", "head_back_us", "embed_back_us"):
            e.args.pop(k, None)
    assert not has_ends(tr) and not action_spans(tr)
    old = dispatch_from_trace(tr, "cuda")
    assert old.action is None and old.between["fwd"] == pytest.approx((1.0 - 0.2) / 2)


def test_an_action_is_charged_its_start_and_end_and_the_first_and_last_stages_their_own() -> None:
    """On CPU ranks (the host holds the stream), two stages of two layers, recomputing: each
    action takes its pass's start and end; stage 0's forward and recompute add the embedding
    (`first`) at their start and its backward the embedding's backward at its end; the last
    stage's forward and recompute add the loss (`last`) at their end and its backward the
    loss's backward at its start."""
    from aptmoe.config import ClusterConfig, ModelConfig, PopularityConfig, RunConfig, ScheduleConfig, TrainConfig
    from aptmoe.sim.simulate import simulate

    cfg = RunConfig(model=ModelConfig(name="tiny", embedding_dim=64, hidden_dim=128, num_heads=4, num_layers=4,
                                      num_experts=4, seq_length=16),
                    cluster=ClusterConfig(gpus_per_node=2, topo="C1+G1", gpu_memory_bytes=10**15),
                    train=TrainConfig(batch_size=32, num_chunks=4, num_warmup_steps=1, num_training_steps=1),
                    schedule=ScheduleConfig(pipeline="GPipe", num_stages=2, recompute="all"),
                    popularity=PopularityConfig(gini=0.6))
    base = dataclasses.replace(load_profile("a800-paper"), dispatch=dataclasses.replace(D, device="cpu"))
    action = {"fwd": {"start": 1e-3, "end": 2e-3, "first": 4e-3, "last": 8e-3},
              "rec": {"start": 16e-3, "end": 32e-3, "first": 64e-3, "last": 128e-3},
              "bwd": {"start": 256e-3, "end": 512e-3, "first": 1024e-3, "last": 2048e-3}}
    spans = []
    for dispatch in (base.dispatch, dataclasses.replace(base.dispatch, action=action)):
        tr = Trace("sim")
        simulate(cfg, ProfileCost(dataclasses.replace(base, dispatch=dispatch), cfg.model), trace=tr)
        spans.append({e.name: e.dur_s for e in tr.events if e.name in ("0F0", "1F0", "0B0", "1B0")})
    without, with_ = spans
    more = {k: with_[k] - without[k] for k in without}
    f, r, b = action["fwd"], action["rec"], action["bwd"]
    assert more["0F0"] == pytest.approx(f["start"] + f["end"] + f["first"])
    assert more["1F0"] == pytest.approx(f["start"] + f["end"] + f["last"])
    assert more["0B0"] == pytest.approx(r["start"] + r["end"] + r["first"] + b["start"] + b["end"] + b["first"])
    assert more["1B0"] == pytest.approx(r["start"] + r["end"] + r["last"] + b["start"] + b["end"] + b["last"])


def test_the_reference_loop_round_trips_and_is_left_out_when_unknown(with_dispatch, tmp_path) -> None:
    timed = dataclasses.replace(with_dispatch, dispatch=dataclasses.replace(D, loop_s=0.04))
    again = load_profile(str(timed.save(tmp_path / "t.json")))
    assert again.dispatch.loop_s == 0.04 and again.dispatch == timed.dispatch
    assert "loop_s" not in json.loads(with_dispatch.to_json())["dispatch"]      # older profiles stay as they were


def test_a_slower_host_scales_the_block_calls_and_nothing_else(with_dispatch) -> None:
    timed = dataclasses.replace(with_dispatch, dispatch=dataclasses.replace(D, loop_s=0.04))
    slow = timed.with_host_speed(1.5)
    assert slow.dispatch.seconds["a"]["bwd"] == pytest.approx(1.5 * 9e-4)
    assert slow.dispatch.between == {"fwd": pytest.approx(7.5e-4), "bwd": pytest.approx(1.5e-3)}
    assert slow.dispatch.loop_s == pytest.approx(0.06) and slow.dispatch.samples == D.samples
    assert (slow.gpu, slow.cpu_expert, slow.adam, slow.links) == (timed.gpu, timed.cpu_expert, timed.adam, timed.links)
    cost, slow_cost = ProfileCost(timed, MOE_S), ProfileCost(slow, MOE_S)
    assert slow_cost.host_s("e", "fwd") == pytest.approx(1.5 * cost.host_s("e", "fwd"))
    assert slow_cost.gpu_s("e", 256, "fwd") == cost.gpu_s("e", 256, "fwd")
    assert timed.with_host_speed(1.0).dispatch == timed.dispatch
    plain = load_profile("a800-paper")
    assert plain.with_host_speed(2.0) is plain                          # no dispatch costs: nothing to scale
    with pytest.raises(ValueError, match="positive"):
        timed.with_host_speed(0.0)


def test_a_waiting_receive_slows_the_kernels_and_not_the_host() -> None:
    """Kernels issued while a receive of the rank waits take recv_slowdown times their time
    (NCCL's receive kernel holds SMs); the host's part of a block does not change, so blocks
    bound by their kernels show the slowdown and blocks bound by the host hide it."""
    cost = _Cost({"a": 2.0, "g": 0.2}, {"a": 1.0, "g": 1.0})
    bound_by_kernel, bound_by_host = [("a", 8, "fwd")], [("g", 8, "fwd")] * 3
    for slowdown, attention in ((1.0, 2.0), (1.5, 3.0)):
        r = _rank(cost)
        r.recv_slowdown, r.recvs_waiting = dict.fromkeys("aeg", slowdown), 1
        assert _issued(r, bound_by_kernel)[0] == pytest.approx([attention])
        r = _rank(cost)
        r.recv_slowdown, r.recvs_waiting = dict.fromkeys("aeg", slowdown), 1
        assert _issued(r, bound_by_host)[0] == pytest.approx([1.0, 1.0, 1.0])
    # each kind its own figure
    r = _rank(cost)
    r.recv_slowdown, r.recvs_waiting = {"a": 1.25, "e": 1.0, "g": 1.0}, 1
    assert _issued(r, bound_by_kernel)[0] == pytest.approx([2.5])
    # no receive waiting: the profile's slowdown does not apply
    r = _rank(cost)
    r.recv_slowdown = dict.fromkeys("aeg", 1.5)
    assert _issued(r, bound_by_kernel)[0] == pytest.approx([2.0])


def test_a_recomputing_backward_splits_its_host_work_at_its_first_backward_call() -> None:
    """A backward that recomputes: its recompute's host work between blocks ("rec": from the
    action's start to its first backward call, less the recompute's calls, per layer) apart
    from the backward's ("bwd": from there to its end, less its calls). A backward without a
    recompute is all "bwd". Before session 22 the first was both, charged to the backward."""
    from aptmoe.calibration.dispatch import dispatch_from_trace

    tr = Trace("real")
    t = 0.0
    # two layers recomputed (0.1 s of calls each, 0.3 s between) then two backward (0.2 each, 0.5 between)
    for name, cat, dur, gap in [("0B0@0:a", "recompute", 0.1, 0.3), ("0B0@1:a", "recompute", 0.1, 0.3),
                                ("0B0@1:a", "backward", 0.2, 0.5), ("0B0@0:a", "backward", 0.2, 0.5)]:
        tr.add(name, 0, "compute", t, t + dur, cat, layer=int(name[4]))
        t += dur + gap
    tr.add("0B0", 0, "compute", 0.0, t, "backward")
    # a backward without recompute: two layers, 0.2 of calls and 0.4 between each
    t0 = t = 10.0
    for name in ("0B1@1:a", "0B1@0:a"):
        tr.add(name, 0, "compute", t, t + 0.2, "backward", layer=int(name[4]))
        t += 0.6
    tr.add("0B1", 0, "compute", t0, t, "backward")
    d = dispatch_from_trace(tr, "cpu")
    assert d.between["rec"] == pytest.approx(0.3)
    from aptmoe.calibration.dispatch import between_spans

    assert sorted(between_spans(tr)["bwd"]) == pytest.approx([0.4, 0.5])


def test_a_recomputed_layer_takes_the_recompute_figure_where_the_profile_has_it(with_dispatch) -> None:
    """On CPU ranks, where the work between blocks holds the stream: with `rec` measured, each
    recomputed layer of a backward takes `rec` more, and the backward layers `bwd` as before;
    a profile without it charges the recompute nothing apart (its `bwd` holds it)."""
    from aptmoe.config import ClusterConfig, ModelConfig, PopularityConfig, RunConfig, ScheduleConfig, TrainConfig
    from aptmoe.sim.simulate import simulate

    cfg = RunConfig(model=ModelConfig(name="tiny", embedding_dim=64, hidden_dim=128, num_heads=4, num_layers=2,
                                      num_experts=4, seq_length=16),
                    cluster=ClusterConfig(gpus_per_node=1, topo="C1+G1", gpu_memory_bytes=10**15),
                    train=TrainConfig(batch_size=16, num_chunks=2, num_warmup_steps=1, num_training_steps=1),
                    schedule=ScheduleConfig(pipeline="GPipe", recompute="all"), popularity=PopularityConfig(gini=0.6))
    cpu = dataclasses.replace(D, device="cpu")
    rec = 7e-4
    spans = []
    for between in (cpu.between, {**cpu.between, "rec": rec}):
        prof = dataclasses.replace(with_dispatch, dispatch=dataclasses.replace(cpu, between=between))
        tr = Trace("sim")
        simulate(cfg, ProfileCost(prof, cfg.model), trace=tr)
        spans.append({e.name: e.dur_s for e in tr.events if e.name in ("0B0", "0B1", "0F0")})
    without, with_rec = spans
    assert with_rec["0F0"] == pytest.approx(without["0F0"])
    for b in ("0B0", "0B1"):
        assert with_rec[b] - without[b] == pytest.approx(cfg.model.num_layers * rec)


def test_a_layers_combine_comes_after_its_experts(with_dispatch) -> None:
    """Host-bound blocks (a tiny model): with `combine` measured, a layer's first expert call
    holds `between` less the combine, and the next layer's attention holds the combine."""
    from aptmoe.config import ClusterConfig, ModelConfig, PopularityConfig, RunConfig, ScheduleConfig, TrainConfig
    from aptmoe.sim.simulate import simulate

    cfg = RunConfig(model=ModelConfig(name="tiny", embedding_dim=64, hidden_dim=128, num_heads=4, num_layers=4,
                                      num_experts=4, seq_length=16),
                    cluster=ClusterConfig(gpus_per_node=2, topo="C1+G1", gpu_memory_bytes=10**15),
                    train=TrainConfig(batch_size=32, num_chunks=4, num_warmup_steps=1, num_training_steps=1),
                    schedule=ScheduleConfig(pipeline="GPipe", num_stages=2), popularity=PopularityConfig(gini=0.6))
    combine = {"fwd": 2e-4, "bwd": 4e-4}
    split = dataclasses.replace(with_dispatch, dispatch=dataclasses.replace(D, combine=combine))
    spans = []
    for profile in (with_dispatch, split):
        tr = Trace("sim")
        simulate(cfg, ProfileCost(profile, cfg.model), trace=tr)
        first = next(e for e in tr.events if e.name.startswith("0F0@0:e"))
        spans.append((first.dur_s, next(e for e in tr.events if e.name == "0F0@1:a").dur_s))
    (e0, a0), (e1, a1) = spans
    assert e0 - e1 == pytest.approx(combine["fwd"]) and a1 - a0 == pytest.approx(combine["fwd"])


def test_merge_takes_one_field_of_a_section_and_keeps_the_rest(with_dispatch, tmp_path, capsys) -> None:
    pytest.importorskip("torch")
    from aptmoe.calibration.merge import main as merge_main

    src = dataclasses.replace(with_dispatch, dispatch=dataclasses.replace(D, combine={"fwd": 1e-4}))
    (tmp_path / "c.json").write_text(src.to_json())
    other = dataclasses.replace(with_dispatch, dispatch=dataclasses.replace(D, between={"fwd": 9e-4, "bwd": 2e-3},
                                                                             combine={"fwd": 3e-4}))
    (tmp_path / "o.json").write_text(other.to_json())
    assert merge_main([str(tmp_path / "c.json"), "--take", f"dispatch.combine={tmp_path / 'o.json'}", "--out",
                       str(tmp_path / "m.json")]) == 0
    merged = load_profile(str(tmp_path / "m.json"))
    assert merged.dispatch.combine == {"fwd": 3e-4} and merged.dispatch.between == D.between
    assert "combine from a run of" in merged.sources["dispatch"]
    assert "dispatch.combine from: " in merged.made_by.command
    # a field the other file lacks is one line and no file
    assert merge_main([str(tmp_path / "c.json"), "--take", "dispatch.nothing=a800-paper", "--out",
                       str(tmp_path / "n.json")]) == 2
    assert capsys.readouterr().err.count("\n") == 1 and not (tmp_path / "n.json").exists()


@pytest.mark.parametrize("gpus, ranks", [(0, 1), (1, 1), (2, 2), (8, 2)])
def test_a_gpu_probe_runs_on_at_most_two_gpus_of_one_socket_and_says_how_many(gpus, ranks, monkeypatch) -> None:
    import torch

    from aptmoe.calibration import dispatch

    got = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(dispatch, "_run_probe",
                        lambda args, what, schedules, keep: got.append((args, what, schedules, keep)))
    dispatch.run_on_gpus(["--pipeline", "Mobius"], "the probe on {gpus} GPU", ("Mobius",), keep=Path("kept"))
    (args, what, schedules, keep), = got
    assert args == ["--pipeline", "Mobius", "--device", "cuda", "--gpus", str(ranks), "--topo", f"C1+G{ranks}"]
    assert what == f"the probe on {ranks} GPU" and schedules == ("Mobius",) and keep == Path("kept")


def test_the_probe_keeps_its_runs_for_a_reshape_or_a_lease_s_profile(tmp_path, capsys) -> None:
    """`python -m aptmoe.calibration.dispatch --keep DIR` keeps each probe run as a stored run
    (results.json and the trace, xz-compressed) that dispatch_shape reads back as it measured it,
    and prints each pass's own start and end beside the block calls."""
    pytest.importorskip("torch")
    from aptmoe.calibration.dispatch import dispatch_from_trace, main, probe_run_trace
    from aptmoe.calibration.dispatch_shape import read_runs

    assert main(["--device", "cpu", "--ranks", "1", "--repeats", "1", "--keep", str(tmp_path / "kept")]) == 0
    out = capsys.readouterr().out
    run = tmp_path / "kept" / "run-1"
    assert sorted(f.name for f in run.iterdir()) == ["results.json.xz", "trace-GPipe.json.xz"]
    again = dispatch_from_trace(probe_run_trace(run), "cpu")
    assert again.action is not None and again.loop_s is not None
    for p, parts in again.action.items():      # the figures printed are the kept run's
        for k, v in parts.items():
            assert f"{p} {k}" in out and f"{v * 1e3:.4f}" in out, (p, k)
    new, layers = read_runs([run], "cpu")
    assert layers == 4 and new == again


def test_the_stored_kernel_loading_pairs_give_the_figures_the_probe_cites() -> None:
    """PROBE_KERNEL_LOADING's comment and docs/measured/session36 cite the ten pairs of probe runs
    kept there: eager over lazy a median 1.134x a step, 8 of 10 slower eager, loops 1.18x."""
    import statistics
    from pathlib import Path

    from aptmoe.host import run_loop_s

    root = Path(__file__).resolve().parents[1] / "docs" / "measured" / "session36" / "kernel-loading"
    pairs = [(root / "call1" / f"probe-{i}-lazy", root / "call1" / f"probe-{i}-eager") for i in range(1, 5)]
    pairs += [(root / "call2-probe" / f"A{i}", root / "call2-probe" / f"B{i}") for i in range(1, 7)]
    steps, loops = [], []
    for lazy, eager in pairs:
        a, b = (read_json(d / "results.json")["schedules"]["GPipe"] for d in (lazy, eager))
        assert (a["kernel_loading"], b["kernel_loading"]) == ("lazy", "eager")
        steps.append(b["iteration_s"] / a["iteration_s"])
        loops.append(run_loop_s(b["host_loop_s"]) / run_loop_s(a["host_loop_s"]))
    assert round(statistics.median(steps), 3) == 1.134 and sum(r > 1 for r in steps) == 8
    assert round(statistics.median(loops), 2) == 1.18
