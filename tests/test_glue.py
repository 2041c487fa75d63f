"""The GPU's work outside the blocks: a layer's between its blocks (the combine of its experts'
outputs, the split of their gradient; kind "c") and the step's ends (the last stage's loss, kind
"l", the first stage's token embedding, kind "m"), timed by calibration/glue.py, kept as the
profile's GPU curves, and run by the simulator on the compute stream."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from aptmoe.calibration.glue import KINDS
from aptmoe.config import Pipeline
from aptmoe.profile import GpuCurve, ProfileCost, ProfileError, load_profile
from aptmoe.trace import Trace, is_block_call

G = 250e-6          # seconds of glue per layer and pass, far above any block of the tiny model


def _with_glue(cfg, fwd: float | None = G, bwd: float | None = G, host: bool = False):
    """h200-1gpu for `cfg`'s model, without its host costs unless `host`, with constant curves
    of kind c (None: no curve for that direction) and none of kinds l and m (the step's ends
    would add their own GPU time to the closed forms)."""
    base = load_profile("h200-1gpu")
    m = cfg.model
    curves = [GpuCurve(kind="c", d=m.embedding_dim, h=None, heads=None, seq_length=None, experts=m.num_experts,
                       dtype=m.dtype, direction=d, tokens=(1, 1 << 20), seconds=(s, s))
              for d, s in (("fwd", fwd), ("bwd", bwd)) if s is not None]
    p = base.with_(gpu=tuple(c for c in base.gpu if c.kind not in KINDS) + tuple(curves))
    return p if host else p.with_(dispatch=None)


def _sim(cfg, profile):
    from aptmoe.sim.simulate import simulate
    tr = Trace("sim")
    return simulate(cfg, profile, trace=tr), tr


def _cfg(**kw):
    from test_sim import _cfg as cfg
    return cfg(**{"pipeline": Pipeline.GPIPE, "gpus": 1, "layers": 4, "stages": 1, "chunks": 2, "experts": 4, **kw})


def test_each_layer_pass_runs_its_glue_on_the_gpu_between_its_blocks():
    """Closed form, GPipe on one GPU with no host cost: the compute stream is the step, and
    each MoE layer's pass (one gate block each) adds the glue once; a forward's next
    attention starts G after its last expert, a backward's first expert G after what came
    before it."""
    pytest.importorskip("simpy")
    cfg = _cfg()
    plain, tr0 = _sim(cfg, _with_glue(cfg, None, None))
    glued, tr = _sim(cfg, _with_glue(cfg))
    passes = sum(1 for e in tr.events if is_block_call(e) and e.name.endswith(":g") and e.rank == 0)
    assert passes == sum(1 for e in tr0.events if is_block_call(e) and e.name.endswith(":g") and e.rank == 0) > 0
    steps = cfg.train.num_training_steps
    assert glued.iteration_s - plain.iteration_s == pytest.approx(passes * G / steps, rel=1e-6)
    calls = sorted((e for e in tr.events if is_block_call(e) and e.rank == 0), key=lambda e: e.start_s)
    fwd_to_attn = [b.start_s - a.end_s for a, b in zip(calls, calls[1:])
                   if a.cat == "forward" and ":e" in a.name and b.name.endswith(":a") and a.name[:3] == b.name[:3]]
    assert fwd_to_attn and fwd_to_attn == pytest.approx([G] * len(fwd_to_attn), abs=1e-12)
    into_bwd_experts = [b.start_s - a.end_s for a, b in zip(calls, calls[1:])
                        if b.cat == "backward" and ":e" in b.name and ":e" not in a.name]
    assert into_bwd_experts and min(into_bwd_experts) == pytest.approx(G, abs=1e-12)
    # not an event of its own, and not counted as the blocks' busy time: the executor's trace
    # has none for it either
    assert {e.cat for e in tr.events} == {e.cat for e in tr0.events}
    blocks = lambda t: sum(e.end_s - e.start_s for e in t.events if is_block_call(e))   # noqa: E731
    assert blocks(tr) == pytest.approx(blocks(tr0), rel=1e-9)


def test_a_host_behind_the_gpu_hides_the_glue():
    """Where the host issues slower than the GPU runs (each block call far longer than its
    kernels), the GPU waits for the host anyway: the glue, run while the host issues, adds
    nothing to the step."""
    pytest.importorskip("simpy")
    cfg = _cfg()
    slow = _with_glue(cfg, host=True)
    disp = slow.dispatch
    slow_host = slow.with_(dispatch=dataclasses.replace(
        disp, seconds={k: {d: 0.05 for d in v} for k, v in disp.seconds.items()}))
    no_glue = slow_host.with_(gpu=tuple(c for c in slow_host.gpu if c.kind != "c"))
    assert _sim(cfg, slow_host)[0].iteration_s == pytest.approx(_sim(cfg, no_glue)[0].iteration_s, rel=1e-9)


def test_a_profile_without_the_curves_leaves_the_glue_out_and_says_so():
    pytest.importorskip("simpy")
    cfg = _cfg()
    res, _ = _sim(cfg, _with_glue(cfg, None, None))
    assert any("no curve, a layer's GPU work between its blocks left out" in f for f in res.fallbacks)
    res, _ = _sim(cfg, _with_glue(cfg))
    assert not any("gpu c " in f for f in res.fallbacks)


def test_cost_reads_the_curve_at_assignments_and_scales_beyond_it():
    cfg = _cfg()
    p = _with_glue(cfg).with_(gpu=tuple(c if c.kind != "c" else dataclasses.replace(
        c, tokens=(16, 256), seconds=(10e-6, 40e-6)) for c in load_profile("h200-1gpu").gpu + _with_glue(cfg).gpu))
    cost = ProfileCost(p, cfg.model)
    assert cost.glue_gpu_s(0, "fwd") == 0.0
    assert cost.glue_gpu_s(16, "fwd") == pytest.approx(10e-6)
    assert cost.glue_gpu_s(136, "bwd") == pytest.approx(25e-6)
    assert cost.glue_gpu_s(512, "fwd") == pytest.approx(80e-6)       # in proportion past the end
    assert any("above measured tokens 16..256" in f for f in cost.fallbacks)
    with pytest.raises(ValueError):
        cost.glue_gpu_s(16, "sideways")


def _round_trip(p, tmp_path, kinds: str):
    """`p` saved and loaded back: its curves of `kinds` unchanged; the file's path and JSON."""
    path = tmp_path / "p.json"
    p.save(path)
    assert [c for c in load_profile(str(path)).gpu if c.kind in kinds] == [c for c in p.gpu if c.kind in kinds]
    return path, json.loads(path.read_text())


def test_a_profile_keeps_its_glue_curves_and_checks_their_dims(tmp_path):
    path, doc = _round_trip(_with_glue(_cfg(), host=True), tmp_path, "c")
    c = next(x for x in doc["gpu"] if x["kind"] == "c")
    c["h"] = 128
    path.write_text(json.dumps(doc))
    with pytest.raises(ProfileError, match=r"\.h.*must be null for kind 'c'"):
        load_profile(str(path))
    c["h"], c["kind"] = None, "z"
    path.write_text(json.dumps(doc))
    with pytest.raises(ProfileError, match=r"kind"):
        load_profile(str(path))


def test_the_timed_glue_is_the_executors_own_code():
    """The samplers run `LayerRun.output` and `output_grads` on a routing of the asked tokens
    (here on the CPU, timed by the host clock): each direction's time grows with the tokens,
    and the forward's result is the residual plus each token's expert output, weighted."""
    from aptmoe.calibration.glue import LayerGlue, glue_samplers
    from aptmoe.calibration.profiler import _series
    from aptmoe.calibration.timing import Reps, host_sample

    block = LayerGlue(64, 4, torch.float32, torch.device("cpu"))
    run = block.run(32)
    y = run.output().reshape(32, 64)
    want = run.r.reshape(32, 64).clone()
    for e, out in run.gpu_out.items():
        idx = run.routing.token_index[e]
        want[idx] += out * run.w_flat[run.routing.positions[e]].unsqueeze(-1)
    assert torch.allclose(y, want, atol=1e-6)
    assert set(glue_samplers(block, 8, lambda w, s: (lambda: 0.0))) == {"fwd", "bwd"}
    _, got, _ = _series(block, (1, 4096), host_sample, Reps(1, 3, 1, 0.05), samplers=glue_samplers)
    assert all(len(v) == 2 and v[0] > 0 for v in got.values())


def test_the_command_refuses_bad_input_in_one_line(tmp_path, capsys):
    from aptmoe.calibration import glue

    out = tmp_path / "p.json"
    assert glue.main(["--models", "XL", "--onto", "h200-1gpu", "--out", str(out)]) == 2
    assert "--models takes S,M,L" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert glue.main(["--onto", "h200-1gpu", "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "no CUDA GPU 0 here" in err
    assert not out.exists()


def test_put_curves_replaces_only_the_same_curves():
    from aptmoe.calibration.glue import put_curves

    def c(d, direction, s, kind="c"):
        return {"kind": kind, "d": d, "experts": 8, "dtype": "fp32", "direction": direction, "seconds": [s]}

    gpu = [c(1024, "fwd", 1.0), c(2048, "fwd", 2.0), c(1024, "fwd", 9.0, kind="g")]
    put_curves(gpu, [c(1024, "fwd", 3.0), c(1024, "bwd", 4.0)])
    assert [(x["kind"], x["d"], x["direction"], x["seconds"][0]) for x in gpu] == [
        ("c", 2048, "fwd", 2.0), ("g", 1024, "fwd", 9.0), ("c", 1024, "fwd", 3.0), ("c", 1024, "bwd", 4.0)]


def test_the_command_takes_the_curves_of_another_profile(tmp_path, capsys):
    """A machine of the same GPU gets the curves another profile has: only the curves of kind
    c change, and the profile's source says where they came from."""
    from aptmoe.calibration import glue

    cfg = _cfg()
    src = tmp_path / "src.json"
    _with_glue(cfg, host=True).save(src)
    out = tmp_path / "p.json"
    assert glue.main(["--curves-from", str(src), "--onto", "h200-2gpu", "--out", str(out)]) == 0
    got, base = load_profile(str(out)), load_profile("h200-2gpu")
    taken = [c for c in load_profile(str(src)).gpu if c.kind == "c"]
    # the taken curves join the profile's own of other dims (h200-2gpu's of the presets' widths)
    assert [c for c in got.gpu if c.kind == "c"] == [c for c in base.gpu if c.kind == "c" and c not in taken] + taken
    assert all((c.d, c.experts) == (cfg.model.embedding_dim, cfg.model.num_experts) for c in taken)
    assert [c for c in got.gpu if c.kind != "c"] == [c for c in base.gpu if c.kind != "c"]
    assert got.cpu_expert == base.cpu_expert and got.dispatch == base.dispatch
    assert "taken from" in got.sources["gpu"]
    # a profile without such curves: one line, no file
    bare = tmp_path / "bare.json"
    base.with_(gpu=tuple(c for c in base.gpu if c.kind not in KINDS)).save(bare)
    bad = tmp_path / "bad.json"
    assert glue.main(["--curves-from", str(bare), "--onto", "h200-2gpu", "--out", str(bad)]) == 1
    assert "has no curves of kinds c, l or m" in capsys.readouterr().err and not bad.exists()


# --------------------------------------------------------------------------- the step's ends

ENDS = {("l", "fwd"): 1.0e-3, ("l", "bwd"): 2.0e-3, ("m", "fwd"): 0.3e-3, ("m", "bwd"): 0.5e-3}


def _with_ends(cfg, ends=ENDS, host: bool = False, vocab: int | None = None):
    """_with_glue's profile without glue, with constant curves of kinds l and m (`ends`)."""
    m = cfg.model
    p = _with_glue(cfg, None, None, host=host)
    curves = [GpuCurve(kind=k, d=m.embedding_dim, h=None, heads=None, seq_length=None, experts=None, dtype=m.dtype,
                       direction=d, tokens=(1, 1 << 20), seconds=(s, s), vocab=vocab or m.vocab_size)
              for (k, d), s in ends.items()]
    return p.with_(gpu=tuple(c for c in p.gpu if c.kind not in ("l", "m")) + tuple(curves))


@pytest.mark.parametrize("recompute", ["none", "all"])
def test_the_loss_and_the_embedding_run_on_the_gpu_at_the_steps_ends(recompute):
    """Closed form, GPipe on one GPU (its one stage is the first and the last) with no host
    cost: each forward adds the embedding's and the loss's forward, each backward their
    backwards, and each recompute their forwards again; nothing else moves."""
    pytest.importorskip("simpy")
    cfg = _cfg(recompute=recompute)
    plain, tr0 = _sim(cfg, _with_ends(cfg, {}))
    ended, tr = _sim(cfg, _with_ends(cfg))
    chunks, steps = cfg.micro_batches, cfg.train.num_training_steps
    fwd = ENDS[("l", "fwd")] + ENDS[("m", "fwd")]
    bwd = ENDS[("l", "bwd")] + ENDS[("m", "bwd")]
    recomputes = chunks if recompute == "all" else 0
    assert ended.iteration_s - plain.iteration_s == pytest.approx((chunks * (fwd + bwd) + recomputes * fwd) / steps,
                                                                  rel=1e-6)
    blocks = lambda t: sum(e.end_s - e.start_s for e in t.events if is_block_call(e))   # noqa: E731
    assert blocks(tr) == pytest.approx(blocks(tr0), rel=1e-9)
    # a forward action's span holds its embedding and its loss
    span = lambda t, cat: sorted(e.end_s - e.start_s for e in t.events if e.cat == cat and "@" not in e.name)  # noqa: E731
    assert [b - a for a, b in zip(span(tr0, "forward"), span(tr, "forward"))] == pytest.approx([fwd] * chunks, abs=1e-9)


def test_on_cpu_ranks_the_ends_are_the_hosts_time_alone():
    """Where the host issues and computes on one thread (CPU ranks), the dispatch probe's host
    time holds the ends' work: the curves add nothing."""
    pytest.importorskip("simpy")
    cfg = _cfg()
    host = _with_ends(cfg, host=True)
    cpu = host.with_(dispatch=dataclasses.replace(host.dispatch, device="cpu"))
    none = _with_ends(cfg, {}, host=True)
    assert _sim(cfg, cpu)[0].iteration_s == pytest.approx(
        _sim(cfg, none.with_(dispatch=dataclasses.replace(none.dispatch, device="cpu")))[0].iteration_s, rel=1e-12)


def test_the_ends_cost_reads_its_curves_and_says_where_it_has_none():
    cfg = _cfg()
    m = cfg.model
    p = _with_ends(cfg).with_(gpu=tuple(dataclasses.replace(c, tokens=(16, 256), seconds=(10e-6, 40e-6))
                                        if c.kind == "l" else c for c in _with_ends(cfg).gpu))
    cost = ProfileCost(p, m)
    assert cost.ends_gpu_s(0, "loss", "fwd") == 0.0
    assert cost.ends_gpu_s(136, "loss", "bwd") == pytest.approx(25e-6)
    assert cost.ends_gpu_s(512, "loss", "fwd") == pytest.approx(80e-6)      # in proportion past the end
    assert cost.ends_gpu_s(16, "embedding", "bwd") == pytest.approx(ENDS[("m", "bwd")])
    with pytest.raises(ValueError, match="part 'head'"):
        cost.ends_gpu_s(16, "head", "fwd")
    # another vocabulary's curves do not fit this model: left out, and said
    other = ProfileCost(_with_ends(cfg, vocab=m.vocab_size * 2), m)
    assert other.ends_gpu_s(16, "loss", "fwd") == 0.0
    assert any(f"gpu l fwd d{m.embedding_dim} V{m.vocab_size}" in f and "the loss's GPU time left out" in f
               for f in other.fallbacks)


def test_a_profile_keeps_its_ends_curves_with_their_vocabulary_and_checks_it(tmp_path):
    path, doc = _round_trip(_with_ends(_cfg(), host=True), tmp_path, "lm")
    assert all("vocab" not in c for c in doc["gpu"] if c["kind"] not in "lm")     # older kinds' entries as they were
    loss = next(x for x in doc["gpu"] if x["kind"] == "l")
    del loss["vocab"]
    path.write_text(json.dumps(doc))
    with pytest.raises(ProfileError, match=r"\.vocab"):
        load_profile(str(path))
    loss["vocab"] = 256
    next(x for x in doc["gpu"] if x["kind"] == "e")["vocab"] = 256
    path.write_text(json.dumps(doc))
    with pytest.raises(ProfileError, match=r"\.vocab.*must be null for kind 'e'"):
        load_profile(str(path))


def test_the_timed_ends_are_the_executors_own_code():
    """The samplers run the executor's `lm_loss` and embedding on the asked tokens (here on the
    CPU, timed by the host clock, and as glue.py times them, with autograd off but for the
    backwards' graphs): four curves, each sample of positive time, the backward's gradients
    landing in the head and the table."""
    from aptmoe.calibration.glue import StepEnds, ends_samplers
    from aptmoe.calibration.profiler import _series
    from aptmoe.calibration.timing import Reps, host_sample

    ends = StepEnds(64, 256, torch.float32, torch.device("cpu"))
    with torch.no_grad():
        done, got, _ = _series(ends, (8, 512), host_sample, Reps(1, 3, 1, 0.05), samplers=ends_samplers)
    assert done == [8, 512] and set(got) == {"l fwd", "l bwd", "m fwd", "m bwd"}
    assert all(len(v) == 2 and v[0] > 0 for v in got.values())
    assert ends.head.grad.abs().sum() > 0 and ends.embedding.grad.abs().sum() > 0


def test_put_curves_replaces_the_ends_by_their_vocabulary_too():
    from aptmoe.calibration.glue import put_curves

    def c(kind, vocab, s):
        return {"kind": kind, "d": 1024, "experts": None, "vocab": vocab, "dtype": "fp32", "direction": "fwd",
                "seconds": [s]}

    gpu = [c("l", 256, 1.0), c("l", 512, 2.0), c("m", 256, 3.0)]
    put_curves(gpu, [c("l", 256, 4.0)])
    assert [(x["kind"], x["vocab"], x["seconds"][0]) for x in gpu] == [("l", 512, 2.0), ("m", 256, 3.0),
                                                                      ("l", 256, 4.0)]
