"""Timeline plots of a trace (simulated or measured): a row per rank and stream.

The plot reads only the shared trace schema (`aptmoe.trace`), so the same code draws the
simulator's prediction and the executor's measurement. Bars are coloured by category; the
three APTMoE loading phases are shades of red from light (inter-stage, lowest priority) to
dark (inter-expert, highest). Where events nest on one row (a stage's ``2F0`` around its
per-block ``2F0@12:a``), only the finest level is drawn; zero-length markers are thin ticks.
Bars are batched per (row, category) into one ``broken_barh`` call, so traces of tens of
thousands of events draw in about a second.
"""

from __future__ import annotations

import io
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from PIL import Image  # noqa: E402  (matplotlib's own PNG writer)

from aptmoe.atomic import atomic_path  # noqa: E402
from aptmoe.trace import TRACE_STREAMS, Trace  # noqa: E402

PIPELINE_COLORS = {"GPipe": "#8c8c8c", "GPipeOffload": "#9c6fb0", "Mobius": "#4c78a8", "APTMoE": "#e0503f"}

CATEGORY_COLORS = {
    "forward": "#4c78a8",
    "backward": "#54a24b",
    "recompute": "#9ecf8f",           # a lighter backward: forward again before it
    "cpu-expert": "#f58518",
    "cpu-job": "#fdd0a2",             # a light cpu-expert: hand-over to outputs landed
    "load-inter-stage": "#f4b6b0",     # light: lowest priority
    "load-inter-layer": "#e0503f",     # medium
    "load-inter-expert": "#7f0d12",    # dark: highest priority
    "load-stage": "#8497ad",           # the baselines' whole-stage loading
    "offload": "#9c6fb0",
    "update": "#e8c547",
    "send": "#8c8c8c",
    "recv": "#c4c4c4",
    "wait": "#fbe3b5",
}
OTHER_COLOR = "#b5aca6"
MARKER_COLOR = "#222222"
DPI = 120
WIDTH_IN = 14.0


@dataclass
class Timeline:
    """What the plot draws, in seconds from the trace's first event."""

    rows: list[tuple[int, str]]                                   # (rank, stream), top to bottom
    bars: dict[tuple[int, str], list[tuple[float, float]]] = field(default_factory=dict)  # (row, cat) -> [(x, w)]
    ticks: dict[int, list[float]] = field(default_factory=dict)  # row -> marker times
    t0_s: float = 0.0
    span_s: float = 0.0

    def categories(self) -> list[str]:
        present = {cat for _, cat in self.bars}
        known = [c for c in CATEGORY_COLORS if c in present]
        return known + sorted(present - set(known))


def _row_key(rank_stream: tuple[int, str]) -> tuple:
    rank, stream = rank_stream
    return (rank, TRACE_STREAMS.index(stream) if stream in TRACE_STREAMS else len(TRACE_STREAMS), stream)


def finest(intervals: list[tuple[float, float, int]]) -> list[int]:
    """Indices of the intervals (start, end, index) that contain no other interval.

    A zero-length interval never makes its container disappear (markers are not work).
    Of identical intervals the last one is kept.
    """
    order = sorted(intervals, key=lambda t: (t[0], -t[1]))
    keep = []
    n = len(order)
    for i, (s, e, idx) in enumerate(order):
        contains = False
        j = i + 1
        while j < n and order[j][0] < e:
            sj, ej, _ = order[j]
            if sj < ej <= e:
                contains = True
                break
            j += 1
        if not contains:
            keep.append(idx)
    return keep


def build_timeline(trace: Trace) -> Timeline:
    """Group events into rows and bars; nested events are reduced to their finest level."""
    events = trace.events
    if not events:
        return Timeline(rows=[])
    t0 = min(e.start_s for e in events)
    t1 = max(e.end_s for e in events)
    per_row: dict[tuple[int, str], list[int]] = defaultdict(list)
    for i, e in enumerate(events):
        per_row[(e.rank, e.stream)].append(i)
    rows = sorted(per_row, key=_row_key)
    tl = Timeline(rows=rows, t0_s=t0, span_s=t1 - t0)
    bars: dict[tuple[int, str], list[tuple[float, float]]] = defaultdict(list)
    for r, key in enumerate(rows):
        work = []
        for i in per_row[key]:
            e = events[i]
            if e.cat == "marker" or e.end_s <= e.start_s:
                tl.ticks.setdefault(r, []).append(e.start_s - t0)
            else:
                work.append((e.start_s, e.end_s, i))
        for i in finest(work):
            e = events[i]
            bars[(r, e.cat or "other")].append((e.start_s - t0, e.end_s - e.start_s))
    tl.bars = dict(bars)
    return tl


def _draw(ax, tl: Timeline, span_s: float) -> set[str]:
    """Bars and markers of one timeline on `ax`; returns the categories drawn."""
    for (r, cat), xr in tl.bars.items():
        ax.broken_barh(xr, (r - 0.4, 0.8), facecolors=CATEGORY_COLORS.get(cat, OTHER_COLOR), linewidth=0)
    for r, xs in tl.ticks.items():
        ax.vlines(xs, r - 0.45, r + 0.45, colors=MARKER_COLOR, linewidth=0.5)
    ax.set_yticks(range(len(tl.rows)))
    ax.set_yticklabels([f"rank {rk} {st}" for rk, st in tl.rows], fontsize=8)
    ax.set_ylim(len(tl.rows) - 0.5 if tl.rows else 0.5, -0.5)
    ax.set_xlim(0, span_s * 1.005 if span_s > 0 else 1.0)
    ax.grid(axis="x", linewidth=0.3, alpha=0.5)
    ax.set_axisbelow(True)
    if not tl.rows:
        ax.text(0.5, 0.5, "no events", ha="center", va="center", transform=ax.transAxes)
    return set(tl.categories())


def _legend(ax, categories: set[str], markers: bool) -> None:
    ordered = [c for c in CATEGORY_COLORS if c in categories] + sorted(categories - set(CATEGORY_COLORS))
    handles = [Patch(facecolor=CATEGORY_COLORS.get(c, OTHER_COLOR), label=c) for c in ordered]
    if markers:
        handles.append(Line2D([], [], color=MARKER_COLOR, linewidth=0.8, label="marker"))
    if handles:
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize=8, frameon=False)


PALETTE_COLORS = 256
PALETTE_MEAN_LEVELS = 1.0     # the most a palette may move the mean pixel (of 255 levels)


def palette_png(png: bytes) -> bytes:
    """A PNG redrawn in a palette of at most 256 colours, or the input where the palette would
    change the picture (a mean pixel moved PALETTE_MEAN_LEVELS or more) or save nothing.

    Why: a plot here is a few dozen flat colours and the anti-aliased edges between them (a
    timeline 270 colours in all, a scatter of translucent markers up to 1,600), so a palette keeps
    it as drawn (the stored plots' mean pixel moved 0.04 levels at most) in 34-42% of the bytes
    of matplotlib's RGBA; the repository keeps dozens of them and the tree that travels to the
    GPU machine has a size limit. Median cut without dithering: flat fills stay flat."""
    with Image.open(io.BytesIO(png)) as im:
        rgb = im.convert("RGB")
    # 0 = median cut, 0 = no dither (named Image.Quantize/Dither only since Pillow 9.1)
    pal = rgb.quantize(colors=PALETTE_COLORS, method=0, dither=0)
    moved = np.abs(np.asarray(rgb, dtype=np.int16) - np.asarray(pal.convert("RGB"), dtype=np.int16)).max(axis=2)
    if moved.mean() >= PALETTE_MEAN_LEVELS:
        return png
    out = io.BytesIO()
    pal.save(out, format="PNG", optimize=True)
    return out.getvalue() if out.tell() < len(png) else png


def save_png(fig, path: str | os.PathLike, dpi: float | None = None) -> Path:
    """Write `fig` to `path` as a palette PNG (palette_png), atomically; returns the path."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi if dpi is not None else fig.dpi)
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_bytes(palette_png(buf.getvalue()))
    return path


def _save(fig, path: str | os.PathLike) -> Path:
    fig.tight_layout()
    return save_png(fig, path, DPI)


def plot_trace(trace: Trace, path: str | os.PathLike, title: str | None = None) -> Path:
    """Draw `trace` as a PNG at `path` (written atomically); returns the path."""
    tl = build_timeline(trace)
    n = max(len(tl.rows), 1)
    height = min(max(1.4 + 0.3 * n, 2.6), 40.0)
    fig, ax = plt.subplots(figsize=(WIDTH_IN, height), dpi=DPI)
    try:
        cats = _draw(ax, tl, tl.span_s)
        ax.set_xlabel("time (s)")
        _legend(ax, cats, bool(tl.ticks))
        ax.set_title(title if title is not None else default_title(trace), fontsize=10)
        return _save(fig, path)
    finally:
        plt.close(fig)


def plot_overlay(predicted: Trace, measured: Trace, path: str | os.PathLike, title: str = "") -> Path:
    """A prediction above its measurement on one time axis (each from its own first event)."""
    tls = [build_timeline(predicted), build_timeline(measured)]
    span = max(tl.span_s for tl in tls)
    rows = [max(len(tl.rows), 1) for tl in tls]
    height = min(max(2.0 + 0.3 * sum(rows), 4.0), 60.0)
    fig, axes = plt.subplots(2, 1, figsize=(WIDTH_IN, height), dpi=DPI, sharex=True,
                             gridspec_kw={"height_ratios": rows})
    try:
        cats: set[str] = set()
        for ax, tl, tr, what in zip(axes, tls, (predicted, measured), ("predicted", "measured")):
            cats |= _draw(ax, tl, span)
            ax.set_title(f"{what}: {tl.span_s:.3f} s, {len(tr.events)} events", fontsize=9, loc="left")
        axes[-1].set_xlabel("time (s)")
        _legend(axes[0], cats, any(tl.ticks for tl in tls))
        if title:
            fig.suptitle(title, fontsize=10)
        return _save(fig, path)
    finally:
        plt.close(fig)


def default_title(trace: Trace) -> str:
    m = trace.meta
    parts = [str(m[k]) for k in ("pipeline", "model") if m.get(k)]
    if m.get("gini") is not None:
        parts.append(f"G={m['gini']}")
    if m.get("topo"):
        parts.append(str(m["topo"]))
    if m.get("calibration"):
        parts.append(f"calibration {m['calibration']}")
    span = trace.span_s()
    return f"{trace.source} trace: " + ", ".join(parts + [f"{len(trace.events)} events over {span:.3f} s"])


def plot_trace_file(in_json: str | os.PathLike, out_png: str | os.PathLike | None = None,
                    title: str | None = None) -> Path:
    """Load a trace in the shared schema (sim or real) and draw it; default out: ``<in>.png``."""
    trace = Trace.load(in_json)
    out = Path(out_png) if out_png is not None else Path(in_json).with_suffix(".png")
    return plot_trace(trace, out, title)


def plot_predicted_vs_measured(runs: list[dict], path: str | os.PathLike, title: str = "", band: float = 0.10) -> Path:
    """One point per run (dicts with pipeline, set, measured_s, predicted_s): predicted against
    measured step time on log axes, coloured by schedule, hollow for held-back runs; the
    diagonal and a +-`band` corridor show where a prediction is right."""
    pts = [r for r in runs if r.get("measured_s") and r.get("predicted_s")]
    fig, ax = plt.subplots(figsize=(5.6, 5.0))
    if pts:
        lo = min(min(r["measured_s"], r["predicted_s"]) for r in pts) * 0.8
        hi = max(max(r["measured_s"], r["predicted_s"]) for r in pts) * 1.25
        ax.plot([lo, hi], [lo, hi], color="#444444", lw=0.8)
        ax.fill_between([lo, hi], [lo * (1 - band), hi * (1 - band)], [lo * (1 + band), hi * (1 + band)],
                        color="#dddddd", lw=0, label=f"within {band:.0%}")
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
    for name, color in PIPELINE_COLORS.items():
        for held in (False, True):
            sel = [r for r in pts if r["pipeline"] == name and (r.get("set") == "held-back") == held]
            if sel:
                ax.scatter([r["measured_s"] for r in sel], [r["predicted_s"] for r in sel], s=28,
                           facecolors="none" if held else color, edgecolors=color,
                           label=f"{name}{' (held back)' if held else ''}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("measured s/step")
    ax.set_ylabel("predicted s/step")
    ax.set_title(title, fontsize=9)
    if pts:
        ax.legend(fontsize=7, loc="upper left")
    else:
        ax.text(0.5, 0.5, "no run has both a measurement and a prediction", ha="center", transform=ax.transAxes)
    ax.grid(True, which="both", lw=0.3, alpha=0.5)
    path = _save(fig, path)
    plt.close(fig)
    return path
