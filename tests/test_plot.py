"""Timeline plots: row and bar assembly (nesting, markers), file size, speed."""

from __future__ import annotations

import random
import time

import pytest

from aptmoe.plot import build_timeline, finest, plot_trace, plot_trace_file
from aptmoe.trace import Trace


def nested_trace() -> Trace:
    """Rank 0: a stage-level forward 2F0 around three per-block events, a marker inside it;
    the load stream with two phases; rank 1: one backward with no children."""
    tr = Trace("sim", meta={"pipeline": "APTMoE"})
    tr.add("2F0", 0, "compute", 1.0, 2.0, "forward", stage=2, mb=0)
    tr.add("2F0@12:a", 0, "compute", 1.0, 1.2, "forward", layer=12)
    tr.add("2F0@12:g", 0, "compute", 1.2, 1.3, "forward", layer=12)
    tr.add("2F0@12:e3", 0, "compute", 1.5, 2.0, "forward", layer=12, experts=[3])
    tr.add("2D", 0, "compute", 1.4, 1.4, "marker")
    tr.add("3LF", 0, "load", 0.5, 0.5, "marker")
    tr.add("3LF@12:e1", 0, "load", 0.5, 0.9, "load-inter-stage", bytes=10)
    tr.add("3LF@12:e2", 0, "load", 0.9, 1.1, "load-inter-expert", bytes=10)
    tr.add("1B0", 1, "compute", 3.0, 4.0, "backward")
    return tr


def test_nested_events_are_drawn_once() -> None:
    tl = build_timeline(nested_trace())
    assert tl.rows == [(0, "compute"), (0, "load"), (1, "compute")]
    assert tl.t0_s == 0.5 and tl.span_s == pytest.approx(3.5)
    fwd = tl.bars[(0, "forward")]
    assert len(fwd) == 3                                    # the three blocks, not the stage around them
    assert sum(w for _, w in fwd) == pytest.approx(0.8)     # not 0.8 + 1.0
    assert sorted(x for x, _ in fwd) == pytest.approx([0.5, 0.7, 1.0])
    assert tl.bars[(1, "load-inter-stage")] == [(0.0, pytest.approx(0.4))]
    assert tl.bars[(1, "load-inter-expert")] == [(pytest.approx(0.4), pytest.approx(0.2))]
    assert tl.bars[(2, "backward")] == [(2.5, 1.0)]         # a stage with no children is drawn
    assert tl.ticks == {0: [pytest.approx(0.9)], 1: [0.0]}   # markers are ticks, not bars
    assert tl.categories() == ["forward", "backward", "load-inter-stage", "load-inter-expert"]


def test_finest_level_rules() -> None:
    # a marker-like zero-length interval never hides its container
    assert finest([(0.0, 1.0, 0), (0.5, 0.5, 1)]) == [0, 1]
    # identical intervals: one of them is kept
    assert len(finest([(0.0, 1.0, 0), (0.0, 1.0, 1)])) == 1
    # partial overlap is not nesting
    assert sorted(finest([(0.0, 1.0, 0), (0.5, 1.5, 1)])) == [0, 1]
    # three levels: only the innermost
    assert finest([(0.0, 3.0, 0), (0.0, 2.0, 1), (0.5, 1.0, 2)]) == [2]


def test_png_from_trace_file(tmp_path) -> None:
    tr = nested_trace()
    tr.save(tmp_path / "t.json")
    png = plot_trace_file(tmp_path / "t.json")
    assert png == tmp_path / "t.png"
    data = png.read_bytes()
    assert data[:4] == b"\x89PNG" and len(data) < 1_000_000


def test_plots_are_written_in_a_palette_that_keeps_the_picture(tmp_path) -> None:
    """A timeline is written as a palette PNG, pixel for pixel the RGBA matplotlib drew to
    within a few levels of 255 where they differ at all, in fewer bytes; a picture a palette
    would change (noise of 4,096 colours) is kept as it came."""
    import io

    import numpy as np
    from PIL import Image

    from aptmoe.plot import palette_png

    png = plot_trace(nested_trace(), tmp_path / "t.png")
    with Image.open(png) as im:
        assert im.mode == "P" and len(im.getcolors(256)) <= 256
        drawn = np.asarray(im.convert("RGB"), dtype=int)
    # the same figure through matplotlib's own writer: what the palette replaced
    import matplotlib.pyplot as plt
    from aptmoe.plot import DPI, WIDTH_IN, _draw, build_timeline

    tl = build_timeline(nested_trace())
    fig, ax = plt.subplots(figsize=(WIDTH_IN, 2.6), dpi=DPI)
    _draw(ax, tl, tl.span_s)
    rgba = io.BytesIO()
    fig.savefig(rgba, format="png", dpi=DPI)
    plt.close(fig)
    repacked = palette_png(rgba.getvalue())
    assert len(repacked) < 0.7 * len(rgba.getvalue())
    with Image.open(io.BytesIO(rgba.getvalue())) as a, Image.open(io.BytesIO(repacked)) as b:
        ref, got = np.asarray(a.convert("RGB"), dtype=int), np.asarray(b.convert("RGB"), dtype=int)
    assert ref.shape == got.shape and np.abs(ref - got).max() <= 16 and np.abs(ref - got).mean() < 0.5
    assert drawn.shape[1] == ref.shape[1]

    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    raw = io.BytesIO()
    noise.save(raw, format="PNG")
    assert palette_png(raw.getvalue()) == raw.getvalue()


def test_empty_trace_draws(tmp_path) -> None:
    png = plot_trace(Trace("real"), tmp_path / "empty.png")
    assert png.stat().st_size > 0


def test_twenty_thousand_events_quickly(tmp_path) -> None:
    rng = random.Random(0)
    cats = ["forward", "backward", "cpu-expert", "load-inter-stage", "load-inter-layer", "load-inter-expert",
            "offload", "update", "send"]
    streams = {"forward": "compute", "backward": "compute", "cpu-expert": "cpu", "offload": "offload",
               "update": "cpu", "send": "net"}
    tr = Trace("sim")
    t = [0.0] * 8
    for i in range(20_000):
        r = i % 8
        cat = rng.choice(cats)
        d = rng.uniform(1e-5, 1e-3)
        tr.add(f"e{i}", r, streams.get(cat, "load"), t[r], t[r] + d, cat)
        t[r] += d
    t0 = time.perf_counter()
    png = plot_trace(tr, tmp_path / "big.png")
    assert time.perf_counter() - t0 < 5.0
    assert png.stat().st_size < 1_000_000


def test_predicted_against_measured_draws_a_point_per_run(tmp_path) -> None:
    from aptmoe.plot import plot_predicted_vs_measured

    runs = [{"pipeline": "Mobius", "set": "fit", "measured_s": 1.0, "predicted_s": 0.8},
            {"pipeline": "APTMoE", "set": "held-back", "measured_s": 2.0, "predicted_s": 2.1},
            {"pipeline": "GPipe", "set": "fit", "measured_s": None, "predicted_s": 0.5}]      # not run: no point
    out = plot_predicted_vs_measured(runs, tmp_path / "m.png", title="t")
    assert out.stat().st_size > 1000 and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*"))                # written whole (atomic)
    plot_predicted_vs_measured([], tmp_path / "empty.png")
