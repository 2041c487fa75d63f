"""Calibration files: schema, loader, and the `CostSource` that reads them.

A calibration file ("profile") is versioned JSON (``"schema": "aptmoe-calibration/1"``)
that the simulator reads directly (DESIGN §3). Its sections:

- ``name``, ``description`` (optional), ``made_by`` {tool, command, date},
  ``hardware`` (fingerprint), ``skipped`` [{part, reason}], ``sources`` {section: origin};
- ``links``: ``h2d`` / ``d2h`` each ``pinned`` and ``pageable`` as a fit
  {latency_s, GBps, points: [[bytes, seconds], ...]}; ``root_GBps`` {h2d, d2h}: aggregate
  bandwidth of one socket root by the number of GPUs copying at once ({"1": .., "2": ..});
  ``duplex_GBps`` {h2d, d2h}: per direction with both directions busy; ``p2p``
  {intra_node, inter_node} fits;
- ``gpu``: curves {kind, d, h, heads, seq_length, experts, dtype, direction, tokens,
  seconds, and for kinds l and m vocab}; the dims a kind does not depend on are null (e: d, h;
  a: d, heads, seq_length; g and c: d, experts; l and m: d, vocab); kinds c, l and m are GPU
  work outside the blocks (calibration/glue.py): a layer's combine and split, the last stage's
  loss, the first stage's token embedding;
- ``cpu_expert``: curves {d, h, dtype, direction, threads, tokens, seconds};
- ``adam``: {cpu_s_per_param: {threads: s}, gpu_s_per_param: s or null, and optionally
  cpu_shared: {ranks: R, s_per_param: {threads: s}}, the CPU figure with R ranks of one
  host updating at once on disjoint cores (they share the host's memory bandwidth)};
- ``host_memory`` (optional): {GBps: {threads: s}, cpu_alone_GBps: {threads: s}, and
  optionally beside: {threads: [[copies GB/s, CPU GB/s], ...]}}, the host memory's bandwidth
  for CPU work and copies together (a read-bound CPU stream plus the GPU's copies, both busy),
  the CPU stream's rate alone, and the stream's rate beside copies at each measured rate (h2d,
  d2h, both at once) (calibration/host_memory.py);
- ``issue_tolls`` (optional): {copy_s, chunk_s, cpu_job_s, dma_factor, memory_factor, and optionally
  expert_factor, other_expert_factor, both_expert_factor, adam_factor, copy_adam_factor}, what a
  GPU rank's issuing thread loses per copy landed, paced chunk and CPU job of its other threads,
  and its slowdown beside DMA, a memory stream, CPU experts computing on its rank's cores,
  another rank's of the host, or both, the executor's Adam chunks, and a native copy with
  them (calibration/issue_tolls.py, calibration/expert_neighbours.py, calibration/own_calls.py);
- ``pacer`` (optional): {late_s}, how long after its bytes have passed over the cap a copy on
  a capped link is seen to have landed: the pacing thread's sleep ends late, and the thread
  waiting for the copy wakes after it (calibration/pacer.py);
- ``cpu_job`` (optional): {take_s, down_s, up_s, resume_s, and optionally adam_gap_s}, how long an
  executor's CPU job waits beyond its copies' bytes and its experts: the worker taking it, its
  copies' launches and landings heard, the issuing thread's wake after it
  (calibration/cpu_jobs.py); ``adam_gap_s``: {policy: s}, the worker's own time between one Adam
  chunk and the next, by loading policy (aptmoe/adam_gaps.py, calibration/adam_gaps.py);
- ``recv_wait`` (optional): {blocks: [{kind, d, slowdown}, ...]}, how many times its time
  alone a block of each kind and width takes while a receive posted on its rank waits for the
  peer's send (NCCL's receive kernel holds SMs as it waits; calibration/p2p.py). A block not
  measured takes the median of those that were; absent, or under 1 (noise), a posted receive
  costs nothing;
- ``policy_host`` (optional): {seconds: {policy: {call: s}}, loop_s}, the host seconds the issuing
  thread spends in one call of a loading policy ("aptmoe", "stage") of each kind its stage
  walks make (aptmoe/policy_timing.py `CALLS`; ``backward_decide`` per layer of the stage it
  decides), and the reference loop timed beside them (aptmoe/policy_timing.py);
- ``roofline``: exactly the fields of `AnalyticHardware` (LinkSpecs as {latency_s, GBps}),
  the fallback for whatever has no curve.

Every ``sources`` value begins with one of `SOURCE_KINDS` ("measured: ...",
"assumption: ..."). Curves are tokens >= 1 strictly increasing, seconds > 0 and
non-decreasing (the generator smooths before writing). Any violation, on load, is a
`ProfileError` whose one-line message names the file, the field and the problem.

`ProfileCost` interpolates piecewise-linearly between measured points (monotone, exact at
them). Outside a curve's token range it follows the roofline's shape anchored at the
curve's end point (continuous and monotone); a block with no curve uses the roofline
itself. CPU thread counts between measured ones interpolate in 1/threads; outside, the
nearest curve is scaled by measured_threads / threads. Every such approximation is recorded
once in `ProfileCost.fallbacks` so that results can say which figures were not measured.
"""

from __future__ import annotations

import bisect
import dataclasses
import datetime
import functools
import importlib.resources
import json
import math
import numbers
import os
import statistics
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from aptmoe.analytic_cost import AnalyticCost, AnalyticHardware
from aptmoe.atomic import write_text_atomic
from aptmoe.config import DTYPE_BYTES, ConfigError, ModelConfig
from aptmoe.costs import ACTION_PARTS, BETWEEN_PASSES, BLOCK_KINDS, DIRECTIONS, MESSAGE_POSTS, LinkSpec
from aptmoe.isotonic import pava
from aptmoe import stored

SCHEMA = "aptmoe-calibration/1"

# policy_host's keys: aptmoe/policy_timing.py's POLICIES and CALLS (the core's policy module
# is not imported here: it imports the cost sources this module defines)
POLICY_HOST_POLICIES = ("aptmoe", "stage")
POLICY_HOST_CALLS = ("predicted_counts", "gate_counts", "forward_placement", "backward_decide", "backward_placement")
# A `sources` value starts with one of these (the longest match wins when printed).
SOURCE_KINDS = ("measured", "artifact lookup table", "datasheet", "derived", "assumption", "roofline")
# Sections every profile must account for in `sources`.
SOURCE_KEYS = ("links.h2d.pinned", "links.h2d.pageable", "links.d2h.pinned", "links.d2h.pageable",
               "links.root_GBps", "links.duplex_GBps", "links.p2p", "gpu", "cpu_expert", "adam", "roofline")

# The block dims each GPU curve kind depends on; the other dims must be null.
GPU_KIND_DIMS = {"e": ("d", "h"), "a": ("d", "heads", "seq_length"), "g": ("d", "experts"), "c": ("d", "experts"),
                 "l": ("d", "vocab"), "m": ("d", "vocab")}
# The GPU curves' kinds: the blocks', and the GPU's work outside them (calibration/glue.py):
# "c", a layer's between its blocks (the combine of its experts' outputs, the split of their
# gradient), over assignments (tokens x top_k) where the blocks' curves are over tokens; "l",
# the last stage's loss (final norm, head, cross-entropy), and "m", the first stage's token
# embedding, over a micro-batch's tokens.
GPU_CURVE_KINDS = (*BLOCK_KINDS, "c", "l", "m")
_GPU_DIMS = ("d", "h", "heads", "seq_length", "experts")
_GPU_OPTIONAL_DIMS = ("vocab",)     # absent from the files of kinds without it (those before it)
# The kinds of a step's ends, by CostSource.ends_gpu_s's part
END_KINDS = {"loss": "l", "embedding": "m"}


class ProfileError(ValueError):
    """A calibration file that cannot be used; the one-line message names file and field."""


# --------------------------------------------------------------------------- the data


@dataclass(frozen=True)
class MadeBy:
    tool: str          # "aptmoe 0.1.0"
    command: str       # the exact command line that produced the file
    date: str          # ISO 8601


@dataclass(frozen=True)
class Hardware:
    """Fingerprint of the host the figures describe (one node)."""

    gpu_name: str
    gpu_count: int
    gpu_memory_bytes: int
    cpu_model: str
    cpu_sockets: int
    cpu_cores: int                 # all sockets together
    host_memory_bytes: int
    torch_version: str | None


@dataclass(frozen=True)
class Skipped:
    part: str
    reason: str


@dataclass(frozen=True)
class LinkFit:
    """latency + bytes / bandwidth, with the measured [bytes, seconds] points it came from."""

    latency_s: float
    GBps: float
    points: tuple[tuple[int, float], ...] = ()

    def spec(self) -> LinkSpec:
        return LinkSpec(self.latency_s, self.GBps)


@dataclass(frozen=True)
class Links:
    h2d_pinned: LinkFit
    h2d_pageable: LinkFit
    d2h_pinned: LinkFit
    d2h_pageable: LinkFit
    root_h2d_GBps: dict[int, float]     # GPUs copying at once -> aggregate GB/s of one root
    root_d2h_GBps: dict[int, float]
    duplex_h2d_GBps: float              # per direction, both directions busy
    duplex_d2h_GBps: float
    p2p_intra: LinkFit
    p2p_inter: LinkFit


@dataclass(frozen=True)
class GpuCurve:
    kind: str
    d: int
    h: int | None
    heads: int | None
    seq_length: int | None
    experts: int | None
    dtype: str
    direction: str
    tokens: tuple[int, ...]
    seconds: tuple[float, ...]
    # Up to this many tokens the curve is a staircase: a GEMM runs its rows in tiles, so a
    # count between two measured points at or below it takes the upper one's time (the
    # calibration measures expert blocks every 32 tokens there, finer than the tiles).
    # None: a line between the points.
    step_to: int | None = None
    vocab: int | None = None        # kinds l and m: the token ids the head and embedding cover

    def to_dict(self) -> dict:
        """The curve as the profile file keeps it; step_to and vocab only where set (files
        written before them stay as they were)."""
        return {**{k: v for k, v in dataclasses.asdict(self).items() if k not in ("step_to", "vocab") or v is not None},
                "tokens": list(self.tokens), "seconds": list(self.seconds)}

    def matches(self, model: ModelConfig) -> bool:
        have = {"d": model.embedding_dim, "h": model.hidden_dim, "heads": model.num_heads,
                "seq_length": model.seq_length, "experts": model.num_experts, "vocab": model.vocab_size}
        return self.dtype == model.dtype and all(getattr(self, k) == have[k] for k in GPU_KIND_DIMS[self.kind])


@dataclass(frozen=True)
class CpuCurve:
    d: int
    h: int
    dtype: str
    direction: str
    threads: int
    tokens: tuple[int, ...]
    seconds: tuple[float, ...]

    def matches(self, model: ModelConfig) -> bool:
        return (self.d, self.h, self.dtype) == (model.embedding_dim, model.hidden_dim, model.dtype)


@dataclass(frozen=True)
class Adam:
    cpu_s_per_param: dict[int, float]   # threads -> seconds per fp32 parameter; {} = roofline
    gpu_s_per_param: float | None       # None = roofline
    shared_ranks: int | None = None     # ranks that updated at once for the figure below
    cpu_shared_s_per_param: dict[int, float] = dataclasses.field(default_factory=dict)
    # threads -> seconds of one optimizer.step() call over a tiny tensor: what each of the
    # executor's chunks (one optimizer each) pays on top of its parameters; {} = not measured
    cpu_call_s: dict[int, float] = dataclasses.field(default_factory=dict)


@dataclass(frozen=True)
class Dispatch:
    """Host seconds the executor spends on one block call, by block kind and direction.

    Measured by running the executor itself on a model so small that its kernels take no
    time (calibration/dispatch.py): each block's span is then what it costs to issue it (on
    a GPU: Python, autograd and kernel launches; on CPU ranks: all of it), and a stage's
    span less its blocks' is the host work between blocks (routing, combine), per layer.
    The simulator runs the host as a second clock beside the compute stream (sim/engine.py
    `_issue`). Optional in the schema: profiles without it model kernel time alone."""
    device: str                              # "cuda" or "cpu": where the blocks ran
    seconds: dict[str, dict[str, float]]     # kind (a, g, e) -> direction (fwd, bwd) -> s
    # pass -> s per layer between its blocks: fwd, bwd, and (since session 22) rec, a recomputed
    # layer's, measured apart from its backward's. Without rec, bwd holds a recomputing
    # backward's host work for both (the probe's median backward recomputes) and the simulator
    # charges it to the backward's layers.
    between: dict[str, float]
    samples: int                             # block calls the medians are taken over
    # The probe's issuing thread timing aptmoe.host.python_loop_s around its steps: how fast
    # the host ran when these seconds were measured (None in profiles made before it was kept)
    loop_s: float | None = None
    # Of `between`, the part after a layer's experts (the combine, up to the layer's next
    # call), by direction: the executor does it after waiting for the layer's CPU experts,
    # the routing before handing them over. Optional: where not measured, all of `between`
    # comes before the experts (session 18 found APTMoE's capped forwards spending 1550 us
    # from their last GPU expert to the next layer where the simulator put 184).
    combine: dict[str, float] | None = None
    # Host seconds the issuing thread spends posting one message: "send" (it posts every send
    # of the micro-batch it computed) and "recv" (a receive its next action needs that the net
    # thread has not posted yet), medians of the probe's posts on two or more ranks (the trace's
    # `post_us`; a receive's only on a GPU, where posting does not wait for the bytes). On two
    # H200s a run's compute thread spent 10.7 ms a rank-step so (docs/validation-h200-2gpu-v12-fresh).
    # Optional: None where the probe ran on one rank, and messages then cost the host nothing.
    post: dict[str, float] | None = None
    # pass (fwd, rec, bwd) -> part -> s: an action's host work outside its layers, measured
    # apart from `between` since session 33. "start" before its first block and "end" after its
    # last, on every stage; "first" what stage 0 adds (the embedding: at a forward's and a
    # recompute's start, its backward at a backward's end), "last" what the last stage adds (the
    # loss: at a forward's and a recompute's end, its backward at a backward's start). The
    # probe's one stage of 4 layers had spread all of it over its layers: its stage 0 is first
    # and last at once, so stages of one layer were charged a quarter of the head's work and
    # none of their own start and end, a stage of eight twice its share (docs/measured/session33).
    # With it, `between` is the time between a layer's blocks alone. Optional: None in profiles
    # made before.
    action: dict[str, dict[str, float]] | None = None

    def scaled(self, factor: float) -> "Dispatch":
        """The same costs on a host `factor` times as slow (2.0: every call takes twice as long)."""
        return dataclasses.replace(
            self, seconds={k: {d: v * factor for d, v in dirs.items()} for k, dirs in self.seconds.items()},
            between={d: v * factor for d, v in self.between.items()},
            loop_s=None if self.loop_s is None else self.loop_s * factor,
            combine=None if self.combine is None else {d: v * factor for d, v in self.combine.items()},
            post=None if self.post is None else {k: v * factor for k, v in self.post.items()},
            action=None if self.action is None else {p: {k: v * factor for k, v in parts.items()}
                                                     for p, parts in self.action.items()})


COPY_CONDITIONS = ("h2d", "d2h", "duplex_h2d", "duplex_d2h")     # HostMemory.copies_beside_adam


@dataclass(frozen=True)
class HostMemory:
    """What host memory gives CPU work and the links' copies together, by the CPU's threads.

    The copy engines take their link's rate first (PCIe is the narrower pipe) and the CPU's
    memory-bound work slows to what is left (sim/host_memory.py). Optional in the schema:
    without it CPU work never waits for copies."""
    GBps: dict[int, float]                  # threads -> CPU stream + copies, both busy
    cpu_alone_GBps: dict[int, float]        # threads -> the CPU stream alone
    # threads -> (copies' GB/s, the CPU stream's GB/s beside them) per measured condition; empty
    # in profiles made before it was measured: CPU work then gets GBps less the copies' rate
    beside: dict[int, tuple[tuple[float, float], ...]] = dataclasses.field(default_factory=dict)
    # threads -> ranks updating at once -> copy condition -> the copies' GB/s while Adam chunks
    # run back to back on that many threads of each of those ranks (the copying GPU's own among
    # them): "h2d", "d2h", and "duplex_h2d"/"duplex_d2h" (each direction's rate with both busy).
    # A 2-GPU run's loads fell from 52 to 40 GB/s beside the ranks' Adam, and to 23-25 beside it
    # and their GPU's offload (docs/validation-h200-2gpu-v12-fresh). The simulator caps a GPU's
    # copies at these while ranks update (sim/links.py); empty in profiles made before it was
    # measured: copies then keep their link's rate beside Adam.
    copies_beside_adam: dict[int, dict[int, dict[str, float]]] = dataclasses.field(default_factory=dict)

    def share(self, threads: int) -> "MemoryShare":
        """What CPU work on `threads` threads (the nearest measured count) gets beside copies."""
        near = nearest_count(self.GBps, threads)
        alone = self.cpu_alone_GBps[near]
        points = self.beside.get(near)
        if not points:                       # the first model: a fixed total, the copies first
            return MemoryShare(alone, ((0.0, self.GBps[near]), (self.GBps[near], 0.0)), measured=False)
        return MemoryShare(alone, monotone_share(((0.0, alone), *sorted(points))))


def nearest_count(table: typing.Mapping[int, typing.Any], n: int) -> int:
    """The key of `table` (thread counts, ranks) nearest `n`; of two as near, the smaller."""
    return min(table, key=lambda c: (abs(c - n), c))


def monotone_share(points: typing.Iterable[tuple[float, float]]) -> tuple[tuple[float, float], ...]:
    """(copies' rate, CPU rate) points made non-rising in the copies' rate by pooling adjacent
    violators (each violating run replaced by its mean): a CPU stream that ran faster beside
    more copies is noise, and the mean keeps the curve unbiased where a running minimum
    would bias it low."""
    pts = list(points)
    return tuple((x, float(-y)) for (x, _), y in zip(pts, pava([-y for _, y in pts])))


@dataclass(frozen=True)
class CopyLimits:
    """The most a GPU's copies in one direction get while its link and host memory are shared:
    with the GPU copying the other way too (the link's duplex rate), and while ranks of its host
    run Adam (the rate measured beside that many ranks updating). The simulator caps a GPU's
    flows at this, under its root's fair share (sim/links.py)."""
    duplex_GBps: dict[str, float]                            # direction -> GB/s with both busy
    beside_adam: dict[int, dict[str, float]] = dataclasses.field(default_factory=dict)   # ranks -> condition -> GB/s

    def GBps(self, direction: str, duplex: bool, updating: int) -> float:
        """The cap (GB/s; inf: none) of `direction`'s copies, the other direction busy too
        or not, with `updating` ranks of the host running Adam. Beside more ranks than were
        measured, the figure of the most measured: a rate never extrapolated. Adam never
        speeds a copy up: the figures come from calibrations on different leases (h200-2gpu's
        duplex h2d 44.9 GB/s, its copies beside one rank's Adam 52.5 both ways at once)."""
        condition = f"duplex_{direction}" if duplex else direction
        without = self.duplex_GBps[direction] if duplex else math.inf
        counts = [n for n in self.beside_adam if n <= updating and condition in self.beside_adam[n]]
        return min(without, self.beside_adam[max(counts)][condition]) if updating and counts else without


@dataclass(frozen=True)
class MemoryShare:
    """The host memory a CPU stream gets while the links copy: piecewise-linear in the copies'
    total rate through measured points, and beyond the last one along the last segment (never
    below 0). The simulator gives the copies their links' rate and CPU work this."""
    cpu_alone_GBps: float                              # what a CPU job draws at most
    points: tuple[tuple[float, float], ...]            # (copies' GB/s, CPU GB/s): two or more, the first at 0
    measured: bool = True                              # False: the total model (no points measured)

    def cpu_GBps(self, copies_GBps: float) -> float:
        pts = self.points
        i = 1
        while i < len(pts) - 1 and copies_GBps > pts[i][0]:
            i += 1                           # the segment that holds it, or the last one beyond
        (x0, y0), (x1, y1) = pts[i - 1], pts[i]
        return max(0.0, y0 + (y1 - y0) * (copies_GBps - x0) / (x1 - x0) if x1 > x0 else y1)


@dataclass(frozen=True)
class IssueTolls:
    """What the thread that issues a GPU rank's blocks loses to the rank's other threads.

    Each wake of a Python thread (a copy landing, a paced chunk, a CPU expert job) takes the
    GIL that the issuing thread drops around every launch, and it waits for it back; DMA
    copies and the CPU's memory stream slow it without a wake (calibration/issue_tolls.py).
    Optional in the schema: without it the issuing thread runs at its calibrated speed
    whatever runs beside it (sim/issuing.py)."""
    copy_s: float            # per copy landed (the copy engine's wake and its next launch)
    chunk_s: float           # per 4 MiB chunk of a capped copy (the pacer's wake)
    cpu_job_s: float         # per CPU expert job
    dma_factor: float        # slowdown while copies stream (>= 1)
    memory_factor: float     # slowdown while the CPU worker streams memory (>= 1)
    # Slowdowns while CPU experts compute, on the rank's own worker cores, on another rank's
    # of the same host, or both (calibration/expert_neighbours.py: the host's shared parts,
    # as much from another process as from its own). Optional: where not measured, a rank's
    # own CPU experts count as its memory stream and another's as nothing, as before.
    expert_factor: float | None = None
    other_expert_factor: float | None = None
    both_expert_factor: float | None = None
    # Slowdown while the CPU worker runs the executor's Adam chunks back to back (one fused
    # call per chunk: its memory stream and its wakes together). In the S8 runs of the 2-GPU
    # H200 grid the issuing thread's calls took 1.3-1.6x their time alone beside the rank's
    # Adam where a bare memory stream gave 1.01 (docs/validation-h200-2gpu-v4). Optional: where
    # not measured, memory_factor and a CPU job's toll per chunk, as before.
    adam_factor: float | None = None
    # Slowdown while a copy streams at the link's native speed *and* the CPU worker runs Adam:
    # the two share the host's memory, and beside both the runs' calls took far more than the
    # two factors' product (S8 on the 2-GPU H200: 2.4-3.9x where dma x adam is 1.25). Read
    # from the executor's own run (calibration/own_calls.py). Optional: where not measured,
    # the product, as before; on a capped link always the product (its copies stream a sixth).
    copy_adam_factor: float | None = None

    def experts(self, own: bool, other: bool) -> float:
        """The slowdown of CPU experts computing on the rank's cores (`own`), another's (`other`)."""
        if own and other:
            return self.both_expert_factor if self.both_expert_factor is not None else \
                (self.expert_factor if self.expert_factor is not None else self.memory_factor)
        if own:
            return self.expert_factor if self.expert_factor is not None else self.memory_factor
        if other:
            return self.other_expert_factor if self.other_expert_factor is not None else 1.0
        return 1.0


@dataclass(frozen=True)
class CpuJob:
    """How long one of the executor's CPU jobs (a layer's CPU experts in one pass) waits
    beyond its copies' bytes and its experts' compute (exec/runtime.py `_submit_cpu`): each is
    a Python thread woken in turn. `take_s`: from the hand-over until the CPU worker runs it
    with its inputs computed; `down_s`, `up_s`: the copy down's and the copy up's launch
    and landing heard, besides their bytes; `resume_s`: the issuing thread's wake when the
    outputs are in, over a layer with no job. Read from the executor's own traces
    (calibration/cpu_jobs.py). Optional in the schema: without it a job takes its copies and
    its experts only (on the 2-GPU H200, S8 G0.3, 0.7-1.1 ms a job short, session 19)."""
    take_s: float
    down_s: float
    up_s: float
    resume_s: float
    # loading policy ("aptmoe", "stage") -> the CPU worker's own seconds after each Adam chunk,
    # before the next job (aptmoe/adam_gaps.py); {} = not measured: none
    adam_gap_s: dict[str, float] = dataclasses.field(default_factory=dict)


@dataclass(frozen=True)
class Pacer:
    """How long after its bytes have passed over the cap a copy on a capped link is seen to
    have landed: the link's pacing thread wakes late from its sleep, and the thread waiting
    for the copy after it (exec/link.py). The link does not wait for either. Optional in the
    schema: without it a capped copy lands exactly when its bytes have passed."""
    late_s: float


@dataclass(frozen=True)
class RecvWait:
    """How much slower a rank's blocks run while a receive it posted waits for the peer's
    send: NCCL's receive kernel is launched when the receive is posted and holds its SMs until
    the data arrives, and a kernel then needs more waves of thread blocks or fewer; the
    2-GPU H200 grid saw MoE-M attention 1.6x and its experts 1.3x beside one
    (docs/validation-h200-2gpu). The executor posts each receive ahead of the send that feeds
    it. Optional in the schema: without it a posted receive costs the GPU nothing."""
    blocks: tuple[tuple[str, int, float], ...]     # (kind, d, time beside a waiting receive / alone)

    def slowdown(self, kind: str, d: int) -> tuple[float, bool]:
        """The figure for a block of `kind` and width `d`, and whether it was measured (else
        the median over the blocks that were)."""
        for k, w, x in self.blocks:
            if k == kind and w == d:
                return x, True
        return statistics.median(x for _, _, x in self.blocks), False


@dataclass(frozen=True)
class PolicyHost:
    """Host seconds the issuing thread spends in one call of a loading policy, by policy
    ("aptmoe", "stage") and call kind (aptmoe/policy_timing.py: APTMoE's splits in numpy, tens
    of microseconds a call, at every layer of every micro-batch), and `loop_s`, the reference
    loop (aptmoe.host.python_loop_s) timed beside them: the simulator puts them at the dispatch
    probe's host speed (`ProfileCost.policy_s`). Optional in the schema: without it the
    policy's answers cost the host nothing."""
    seconds: dict[str, dict[str, float]]
    loop_s: float | None = None


@dataclass(frozen=True)
class Profile:
    name: str
    made_by: MadeBy
    hardware: Hardware
    skipped: tuple[Skipped, ...]
    sources: dict[str, str]
    links: Links
    gpu: tuple[GpuCurve, ...]
    cpu_expert: tuple[CpuCurve, ...]
    adam: Adam
    roofline: dict[str, Any]            # JSON form of AnalyticHardware's fields
    description: str = ""
    dispatch: Dispatch | None = None
    host_memory: HostMemory | None = None
    issue_tolls: IssueTolls | None = None
    pacer: Pacer | None = None
    recv_wait: RecvWait | None = None
    cpu_job: CpuJob | None = None
    policy_host: PolicyHost | None = None

    schema: typing.ClassVar[str] = SCHEMA

    # ---- JSON

    def to_dict(self) -> dict:
        L = self.links

        def fit(f: LinkFit) -> dict:
            return {"latency_s": f.latency_s, "GBps": f.GBps, "points": [list(p) for p in f.points]}

        def table(t: Mapping[int, float]) -> dict:
            return {str(k): t[k] for k in sorted(t)}

        d: dict[str, Any] = {"schema": SCHEMA, "name": self.name}
        if self.description:
            d["description"] = self.description
        d.update({
            "made_by": dataclasses.asdict(self.made_by),
            "hardware": dataclasses.asdict(self.hardware),
            "skipped": [dataclasses.asdict(s) for s in self.skipped],
            "sources": dict(self.sources),
            "links": {
                "h2d": {"pinned": fit(L.h2d_pinned), "pageable": fit(L.h2d_pageable)},
                "d2h": {"pinned": fit(L.d2h_pinned), "pageable": fit(L.d2h_pageable)},
                "root_GBps": {"h2d": table(L.root_h2d_GBps), "d2h": table(L.root_d2h_GBps)},
                "duplex_GBps": {"h2d": L.duplex_h2d_GBps, "d2h": L.duplex_d2h_GBps},
                "p2p": {"intra_node": fit(L.p2p_intra), "inter_node": fit(L.p2p_inter)},
            },
            "gpu": [c.to_dict() for c in self.gpu],
            "cpu_expert": [{**dataclasses.asdict(c), "tokens": list(c.tokens), "seconds": list(c.seconds)}
                           for c in self.cpu_expert],
            "adam": {"cpu_s_per_param": table(self.adam.cpu_s_per_param),
                     "gpu_s_per_param": self.adam.gpu_s_per_param,
                     **({"cpu_shared": {"ranks": self.adam.shared_ranks,
                                        "s_per_param": table(self.adam.cpu_shared_s_per_param)}}
                        if self.adam.shared_ranks else {}),
                     **({"cpu_call_s": table(self.adam.cpu_call_s)} if self.adam.cpu_call_s else {})},
            "roofline": json.loads(json.dumps(self.roofline)),
        })
        if self.dispatch is not None:
            d["dispatch"] = {k: v for k, v in dataclasses.asdict(self.dispatch).items()
                             if not (k in ("loop_s", "combine", "post", "action") and v is None)}
        if self.host_memory is not None:
            d["host_memory"] = {"GBps": table(self.host_memory.GBps),
                                "cpu_alone_GBps": table(self.host_memory.cpu_alone_GBps),
                                **({"beside": {str(t): [list(p) for p in pts]
                                               for t, pts in sorted(self.host_memory.beside.items())}}
                                   if self.host_memory.beside else {}),
                                **({"copies_beside_adam": {str(t): {str(n): dict(sorted(c.items()))
                                                                    for n, c in sorted(by.items())} for t, by in
                                                           sorted(self.host_memory.copies_beside_adam.items())}}
                                   if self.host_memory.copies_beside_adam else {})}
        if self.issue_tolls is not None:
            d["issue_tolls"] = {k: v for k, v in dataclasses.asdict(self.issue_tolls).items() if v is not None}
        if self.pacer is not None:
            d["pacer"] = dataclasses.asdict(self.pacer)
        if self.cpu_job is not None:
            d["cpu_job"] = {k: v for k, v in dataclasses.asdict(self.cpu_job).items() if v != {}}
        if self.recv_wait is not None:
            d["recv_wait"] = {"blocks": [{"kind": k, "d": w, "slowdown": x} for k, w, x in self.recv_wait.blocks]}
        if self.policy_host is not None:
            d["policy_host"] = {"seconds": {p: dict(sorted(c.items())) for p, c in sorted(self.policy_host.seconds.items())},
                                **({"loop_s": self.policy_host.loop_s} if self.policy_host.loop_s is not None else {})}
        return d

    def to_json(self) -> str:
        return _dumps(self.to_dict()) + "\n"

    @classmethod
    def from_dict(cls, data: Any, source: str = "<dict>") -> "Profile":
        return _Parser(source).profile(data)

    @classmethod
    def from_json(cls, text: str, source: str = "<string>") -> "Profile":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ProfileError(f"{source}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
        return cls.from_dict(data, source)

    def validate(self) -> "Profile":
        """Checks a programmatically built profile as the loader would; returns it as the
        loader would (numbers normalised to float), so that saving is a fixed point."""
        return Profile.from_dict(self.to_dict(), f"profile {self.name!r}")

    def save(self, path: str | os.PathLike) -> Path:
        """Validates, then writes atomically (temp file in the same folder + os.replace)."""
        text = self.validate().to_json()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, text)
        return path

    # ---- derived objects

    def cluster_defaults(self) -> dict:
        """Cluster fields this profile implies, as keyword arguments of `config_from_args`.

        A CPU-only profile measured no GPU: its runs default to the paper's 40 GB GPUs."""
        hw = self.hardware
        gpu = hw.gpu_name.upper()
        return dict(gpu_memory_bytes=int(hw.gpu_memory_bytes) or 40 * 10**9,
                    cores_per_socket=max(1, hw.cpu_cores // max(1, hw.cpu_sockets)),
                    intra_node_link="nvlink" if ("H100" in gpu or "H200" in gpu) else "pcie")

    def roofline_hardware(self) -> AnalyticHardware:
        return _roofline_hardware(self.roofline)

    def with_(self, **changes) -> "Profile":
        return dataclasses.replace(self, **changes)

    def with_host_speed(self, factor: float) -> "Profile":
        """This profile on a host whose issuing thread is `factor` times as slow as when it was
        calibrated (the ratio of a run's `python_loop_s` to the dispatch probe's): the host cost
        of every block call scales by it. Kernels, copies and CPU work on several threads keep
        their measured times: a single-thread loop says nothing of the cores' memory or vector
        units. A profile without dispatch costs is returned as it is."""
        if not factor > 0:
            raise ValueError(f"a host speed factor must be positive, got {factor!r}")
        if self.dispatch is None:
            return self
        return self.with_(dispatch=self.dispatch.scaled(factor))


def _roofline_hardware(roofline: Mapping[str, Any]) -> AnalyticHardware:
    hints = typing.get_type_hints(AnalyticHardware)
    kwargs = {k: LinkSpec(**v) if hints[k] is LinkSpec else v for k, v in roofline.items()}
    return AnalyticHardware(**kwargs)


def _dumps(obj: Any, indent: int = 0) -> str:
    """JSON with one key per line but lists of numbers (and [bytes, s] pairs) on one line."""
    pad, inner = " " * indent, " " * (indent + 1)

    def flat(x: Any) -> bool:
        return not isinstance(x, (dict, list)) or (isinstance(x, list) and all(
            not isinstance(y, (dict, list)) for y in x))

    if isinstance(obj, dict):
        if not obj:
            return "{}"
        items = [f"{inner}{json.dumps(k)}: {_dumps(v, indent + 1)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(obj, list):
        if all(flat(x) for x in obj):
            return json.dumps(obj, allow_nan=False, separators=(", ", ": "))
        return "[\n" + ",\n".join(inner + _dumps(x, indent + 1) for x in obj) + "\n" + pad + "]"
    return json.dumps(obj, allow_nan=False)


# --------------------------------------------------------------------------- validation


class _Parser:
    """Turns parsed JSON into a `Profile`, raising one-line `ProfileError`s."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, where: str, problem: str) -> typing.NoReturn:
        msg = f"{self.source}: {where}: {problem}" if where else f"{self.source}: {problem}"
        raise ProfileError(" ".join(msg.split("\n")))

    @staticmethod
    def _show(value: Any) -> str:
        text = repr(value)
        return text if len(text) <= 60 else text[:57] + "..."

    # ---- primitives

    def obj(self, data: Any, where: str, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> dict:
        if not isinstance(data, dict):
            self.fail(where, f"must be an object, got {type(data).__name__}")
        for k in required:
            if k not in data:
                self.fail(f"{where}.{k}" if where else k, "missing field")
        unknown = sorted(set(data) - set(required) - set(optional))
        if unknown:
            self.fail(f"{where}.{unknown[0]}" if where else unknown[0],
                      f"unknown field (schema {SCHEMA} expects {', '.join(required + optional)})")
        return data

    def string(self, value: Any, where: str, nullable: bool = False) -> str | None:
        if value is None and nullable:
            return None
        if not isinstance(value, str) or not value.strip():
            self.fail(where, f"must be a non-empty string, got {self._show(value)}")
        return value

    def integer(self, value: Any, where: str, minimum: int = 1, nullable: bool = False) -> int | None:
        if value is None and nullable:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            self.fail(where, f"must be an integer >= {minimum}, got {self._show(value)}")
        return value

    def number(self, value: Any, where: str, *, positive: bool = True, unit: str = "") -> float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not ok or (value <= 0 if positive else value < 0):
            bound = "> 0" if positive else ">= 0"
            self.fail(where, f"must be a number {bound}{' ' + unit if unit else ''}, got {self._show(value)}")
        return float(value)

    def list_(self, value: Any, where: str) -> list:
        if not isinstance(value, list):
            self.fail(where, f"must be a list, got {type(value).__name__}")
        return value

    def choice(self, value: Any, where: str, options: typing.Iterable[str]) -> str:
        options = tuple(options)
        if value not in options:
            self.fail(where, f"must be one of {', '.join(options)}, got {self._show(value)}")
        return value

    # ---- sections

    def profile(self, data: Any) -> Profile:
        if not isinstance(data, dict):
            self.fail("", f"must hold a JSON object, got {type(data).__name__}")
        if "schema" not in data:
            self.fail("schema", f"missing field (expected {SCHEMA!r})")
        if data["schema"] != SCHEMA:
            self.fail("schema", f"unknown schema version {self._show(data['schema'])}; this aptmoe reads {SCHEMA!r}")
        d = self.obj(data, "", ("schema", "name", "made_by", "hardware", "skipped", "sources", "links",
                                "gpu", "cpu_expert", "adam", "roofline"), ("description", "dispatch", "host_memory",
                                                                    "issue_tolls", "pacer", "recv_wait",
                                                                    "cpu_job", "policy_host"))
        description = d.get("description", "")
        if not isinstance(description, str):
            self.fail("description", "must be a string")
        return Profile(
            name=self.string(d["name"], "name"),
            made_by=self.made_by(d["made_by"]),
            hardware=self.hardware(d["hardware"]),
            skipped=tuple(self.skipped(d["skipped"])),
            sources=self.sources(d["sources"]),
            links=self.links(d["links"]),
            gpu=self.gpu_curves(d["gpu"]),
            cpu_expert=self.cpu_curves(d["cpu_expert"]),
            adam=self.adam(d["adam"]),
            roofline=self.roofline(d["roofline"]),
            description=description,
            dispatch=self.dispatch(d["dispatch"]) if "dispatch" in d else None,
            host_memory=self.host_memory(d["host_memory"]) if "host_memory" in d else None,
            issue_tolls=self.issue_tolls(d["issue_tolls"]) if "issue_tolls" in d else None,
            pacer=Pacer(self.number(self.obj(d["pacer"], "pacer", ("late_s",))["late_s"], "pacer.late_s",
                                    positive=False, unit="s")) if "pacer" in d else None,
            recv_wait=self.recv_wait(d["recv_wait"]) if "recv_wait" in d else None,
            cpu_job=self.cpu_job(d["cpu_job"]) if "cpu_job" in d else None,
            policy_host=self.policy_host(d["policy_host"]) if "policy_host" in d else None,
        )

    def policy_host(self, data: Any) -> PolicyHost:
        d = self.obj(data, "policy_host", ("seconds",), ("loop_s",))
        if not isinstance(d["seconds"], dict) or not d["seconds"]:
            self.fail("policy_host.seconds", "must be a non-empty object {policy: {call: seconds}}")
        seconds = {}
        for policy, calls in d["seconds"].items():
            where = f"policy_host.seconds.{policy}"
            if policy not in POLICY_HOST_POLICIES:
                self.fail(where, f"is not a loading policy; use one of {', '.join(POLICY_HOST_POLICIES)}")
            if not isinstance(calls, dict):
                self.fail(where, f"must be an object {{call: seconds}}, got {type(calls).__name__}")
            for call in calls:
                if call not in POLICY_HOST_CALLS:
                    self.fail(f"{where}.{call}", f"is not a policy call the stage walks make; use one of "
                                                 f"{', '.join(POLICY_HOST_CALLS)}")
            seconds[policy] = {c: self.number(v, f"{where}.{c}", positive=False, unit="s") for c, v in calls.items()}
        loop_s = self.number(d["loop_s"], "policy_host.loop_s", unit="s") if "loop_s" in d else None
        return PolicyHost(seconds, loop_s)

    def cpu_job(self, data: Any) -> CpuJob:
        fields = ("take_s", "down_s", "up_s", "resume_s")
        d = self.obj(data, "cpu_job", fields, ("adam_gap_s",))
        gaps = d.get("adam_gap_s", {})
        if not isinstance(gaps, dict):
            self.fail("cpu_job.adam_gap_s", f"must be an object {{policy: seconds}}, got {type(gaps).__name__}")
        for policy in gaps:
            if policy not in POLICY_HOST_POLICIES:
                self.fail(f"cpu_job.adam_gap_s.{policy}", f"is not a loading policy with CPU Adam; use one of "
                                                          f"{', '.join(POLICY_HOST_POLICIES)}")
        return CpuJob(**{f: self.number(d[f], f"cpu_job.{f}", positive=False, unit="s") for f in fields},
                      adam_gap_s={p: self.number(v, f"cpu_job.adam_gap_s.{p}", positive=False, unit="s")
                                  for p, v in sorted(gaps.items())})

    def recv_wait(self, data: Any) -> RecvWait:
        blocks = self.obj(data, "recv_wait", ("blocks",))["blocks"]
        if not isinstance(blocks, list) or not blocks:
            self.fail("recv_wait.blocks", "must be a non-empty list of {kind, d, slowdown}")
        out = []
        for i, b in enumerate(blocks):
            where = f"recv_wait.blocks[{i}]"
            b = self.obj(b, where, ("kind", "d", "slowdown"))
            out.append((self.choice(b["kind"], f"{where}.kind", BLOCK_KINDS), self.integer(b["d"], f"{where}.d"),
                        self.number(b["slowdown"], f"{where}.slowdown")))
        return RecvWait(tuple(out))

    def issue_tolls(self, data: Any) -> IssueTolls:
        fields = [f.name for f in dataclasses.fields(IssueTolls)]
        optional = tuple(f.name for f in dataclasses.fields(IssueTolls) if f.default is not dataclasses.MISSING)
        d = self.obj(data, "issue_tolls", tuple(f for f in fields if f not in optional), optional)
        out = {}
        for f in fields:
            if f not in d:
                continue
            where = f"issue_tolls.{f}"
            if f.endswith("_factor"):
                v = self.number(d[f], where)
                if v < 1:
                    self.fail(where, f"is a slowdown and must be >= 1, got {self._show(d[f])}")
            else:
                v = self.number(d[f], where, positive=False, unit="s")
            out[f] = v
        return IssueTolls(**out)

    def host_memory(self, data: Any) -> HostMemory:
        d = self.obj(data, "host_memory", ("GBps", "cpu_alone_GBps"), ("beside", "copies_beside_adam"))
        total = self.table(d["GBps"], "host_memory.GBps", "threads")
        alone = self.table(d["cpu_alone_GBps"], "host_memory.cpu_alone_GBps", "threads")
        if alone.keys() != total.keys():
            self.fail("host_memory.cpu_alone_GBps", f"has thread counts {sorted(alone)}, GBps has {sorted(total)}")
        beside = {}
        if "beside" in d and not isinstance(d["beside"], dict):
            self.fail("host_memory.beside", f"must be an object {{threads: [[copies GB/s, CPU GB/s], ...]}}, "
                                            f"got {type(d['beside']).__name__}")
        for key, pts in d.get("beside", {}).items():
            where = f"host_memory.beside.{key}"
            if not (isinstance(key, str) and key.isdigit()):
                self.fail(where, "key must be a positive integer (threads) written as a string")
            t = int(key)
            if t not in total:
                self.fail(where, f"is a thread count GBps does not have ({sorted(total)})")
            rows = self.list_(pts, where)
            if not rows:
                self.fail(where, "is empty: give [copies GB/s, CPU GB/s] pairs, or leave the count out")
            pairs = []
            for i, row in enumerate(rows):
                row = self.list_(row, f"{where}[{i}]")
                if len(row) != 2:
                    self.fail(f"{where}[{i}]", "must be [copies GB/s, CPU GB/s]")
                pairs.append((self.number(row[0], f"{where}[{i}][0]", unit="GB/s"),
                              self.number(row[1], f"{where}[{i}][1]", positive=False, unit="GB/s")))
            beside[t] = tuple(pairs)
        by_threads = d.get("copies_beside_adam", {})
        if not isinstance(by_threads, dict):
            self.fail("host_memory.copies_beside_adam", "must be an object {threads: {ranks updating: "
                                                        f"{{condition: GB/s}}}}}}, got {type(by_threads).__name__}")
        copies = {}
        for key, by_ranks in by_threads.items():
            where = f"host_memory.copies_beside_adam.{key}"
            if not key.isdigit() or int(key) not in total:
                self.fail(where, f"must be a thread count GBps has ({sorted(total)})")
            if not isinstance(by_ranks, dict):
                self.fail(where, f"must be an object {{ranks updating: {{condition: GB/s}}}}, got {self._show(by_ranks)}")
            copies[int(key)] = {}
            for n, conditions in by_ranks.items():
                if not (n.isdigit() and int(n) >= 1):
                    self.fail(f"{where}.{n}", "must be how many ranks updated at once (1, 2, ...), written as a string")
                copies[int(key)][int(n)] = {c: self.number(v, f"{where}.{n}.{c}", unit="GB/s")
                                            for c, v in self.obj(conditions, f"{where}.{n}", (), COPY_CONDITIONS).items()}
        return HostMemory(total, alone, beside, copies)

    def dispatch(self, data: Any) -> Dispatch:
        d = self.obj(data, "dispatch", ("device", "seconds", "between", "samples"),
                     ("loop_s", "combine", "post", "action"))
        device = self.choice(d["device"], "dispatch.device", ("cuda", "cpu"))
        by_kind = self.obj(d["seconds"], "dispatch.seconds", (), BLOCK_KINDS)
        seconds = {}
        for kind, dirs in by_kind.items():
            where = f"dispatch.seconds.{kind}"
            dirs = self.obj(dirs, where, (), ("fwd", "bwd"))
            seconds[kind] = {k: self.number(v, f"{where}.{k}", unit="s") for k, v in dirs.items()}
        between = {k: self.number(v, f"dispatch.between.{k}", positive=False, unit="s")
                   for k, v in self.obj(d["between"], "dispatch.between", (), BETWEEN_PASSES).items()}
        loop_s = self.number(d["loop_s"], "dispatch.loop_s", unit="s") if "loop_s" in d else None
        combine = None
        if "combine" in d:
            combine = {k: self.number(v, f"dispatch.combine.{k}", positive=False, unit="s")
                       for k, v in self.obj(d["combine"], "dispatch.combine", (), DIRECTIONS).items()}
            for k, v in combine.items():
                if v > between.get(k, 0.0):
                    self.fail(f"dispatch.combine.{k}", f"is a part of dispatch.between.{k} and must not exceed it "
                                                       f"({v} > {between.get(k, 0.0)})")
        post = None
        if "post" in d:
            post = {k: self.number(v, f"dispatch.post.{k}", positive=False, unit="s")
                    for k, v in self.obj(d["post"], "dispatch.post", (), MESSAGE_POSTS).items()}
        action = None
        if "action" in d:
            action = {p: {k: self.number(v, f"dispatch.action.{p}.{k}", positive=False, unit="s")
                          for k, v in self.obj(parts, f"dispatch.action.{p}", (), ACTION_PARTS).items()}
                      for p, parts in self.obj(d["action"], "dispatch.action", (), BETWEEN_PASSES).items()}
        return Dispatch(device, seconds, between, self.integer(d["samples"], "dispatch.samples"), loop_s, combine,
                        post, action)

    def made_by(self, data: Any) -> MadeBy:
        d = self.obj(data, "made_by", ("tool", "command", "date"))
        tool = self.string(d["tool"], "made_by.tool")
        if not tool.startswith("aptmoe "):
            self.fail("made_by.tool", f"must read 'aptmoe <version>', got {tool!r}")
        date = self.string(d["date"], "made_by.date")
        try:
            datetime.datetime.fromisoformat(date)
        except ValueError:
            self.fail("made_by.date", f"must be an ISO 8601 date, got {date!r}")
        return MadeBy(tool, self.string(d["command"], "made_by.command"), date)

    def hardware(self, data: Any) -> Hardware:
        names = tuple(f.name for f in dataclasses.fields(Hardware))
        d = self.obj(data, "hardware", names)
        w = "hardware."
        return Hardware(
            gpu_name=self.string(d["gpu_name"], w + "gpu_name"),
            gpu_count=self.integer(d["gpu_count"], w + "gpu_count", minimum=0),
            gpu_memory_bytes=self.integer(d["gpu_memory_bytes"], w + "gpu_memory_bytes", minimum=0),
            cpu_model=self.string(d["cpu_model"], w + "cpu_model"),
            cpu_sockets=self.integer(d["cpu_sockets"], w + "cpu_sockets"),
            cpu_cores=self.integer(d["cpu_cores"], w + "cpu_cores"),
            host_memory_bytes=self.integer(d["host_memory_bytes"], w + "host_memory_bytes"),
            torch_version=self.string(d["torch_version"], w + "torch_version", nullable=True),
        )

    def skipped(self, data: Any) -> list[Skipped]:
        out = []
        for i, item in enumerate(self.list_(data, "skipped")):
            w = f"skipped[{i}]"
            s = self.obj(item, w, ("part", "reason"))
            out.append(Skipped(self.string(s["part"], w + ".part"), self.string(s["reason"], w + ".reason")))
        return out

    def sources(self, data: Any) -> dict[str, str]:
        if not isinstance(data, dict):
            self.fail("sources", f"must be an object, got {type(data).__name__}")
        for k in SOURCE_KEYS:
            if k not in data:
                self.fail(f"sources.{k}", "missing field (say where the figures came from)")
        for k, v in data.items():
            self.string(v, f"sources.{k}")
            if not v.startswith(SOURCE_KINDS):
                self.fail(f"sources.{k}", f"must begin with one of {', '.join(SOURCE_KINDS)}; got {self._show(v)}")
        return dict(data)

    def fit(self, data: Any, where: str) -> LinkFit:
        d = self.obj(data, where, ("latency_s", "GBps", "points"))
        points = []
        for i, p in enumerate(self.list_(d["points"], where + ".points")):
            w = f"{where}.points[{i}]"
            if not isinstance(p, list) or len(p) != 2:
                self.fail(w, f"must be a [bytes, seconds] pair, got {self._show(p)}")
            points.append((self.integer(p[0], w + "[0] (bytes)"), self.number(p[1], w + "[1]", unit="s")))
        return LinkFit(self.number(d["latency_s"], where + ".latency_s", positive=False, unit="s"),
                       self.number(d["GBps"], where + ".GBps", unit="GB/s"), tuple(points))

    def table(self, data: Any, where: str, key: str, allow_empty: bool = False) -> dict[int, float]:
        if not isinstance(data, dict):
            self.fail(where, f"must be an object {{{key}: value}}, got {type(data).__name__}")
        if not data and not allow_empty:
            self.fail(where, "must not be empty")
        out = {}
        for k, v in data.items():
            if not (isinstance(k, str) and k.isdigit() and int(k) >= 1):
                self.fail(f"{where}.{k}", f"key must be a positive integer ({key}) written as a string")
            out[int(k)] = self.number(v, f"{where}.{k}")
        return {k: out[k] for k in sorted(out)}

    def links(self, data: Any) -> Links:
        d = self.obj(data, "links", ("h2d", "d2h", "root_GBps", "duplex_GBps", "p2p"))
        fits = {}
        for direction in ("h2d", "d2h"):
            dd = self.obj(d[direction], f"links.{direction}", ("pinned", "pageable"))
            for mem in ("pinned", "pageable"):
                fits[f"{direction}_{mem}"] = self.fit(dd[mem], f"links.{direction}.{mem}")
        root = self.obj(d["root_GBps"], "links.root_GBps", ("h2d", "d2h"))
        duplex = self.obj(d["duplex_GBps"], "links.duplex_GBps", ("h2d", "d2h"))
        p2p = self.obj(d["p2p"], "links.p2p", ("intra_node", "inter_node"))
        return Links(
            **fits,
            root_h2d_GBps=self.table(root["h2d"], "links.root_GBps.h2d", "GPUs copying at once"),
            root_d2h_GBps=self.table(root["d2h"], "links.root_GBps.d2h", "GPUs copying at once"),
            duplex_h2d_GBps=self.number(duplex["h2d"], "links.duplex_GBps.h2d", unit="GB/s"),
            duplex_d2h_GBps=self.number(duplex["d2h"], "links.duplex_GBps.d2h", unit="GB/s"),
            p2p_intra=self.fit(p2p["intra_node"], "links.p2p.intra_node"),
            p2p_inter=self.fit(p2p["inter_node"], "links.p2p.inter_node"),
        )

    def curve_points(self, d: dict, where: str) -> tuple[tuple[int, ...], tuple[float, ...]]:
        tokens = self.list_(d["tokens"], where + ".tokens")
        seconds = self.list_(d["seconds"], where + ".seconds")
        if not tokens:
            self.fail(where + ".tokens", "must not be empty (drop the curve instead)")
        if len(tokens) != len(seconds):
            self.fail(where, f"tokens has {len(tokens)} entries but seconds has {len(seconds)}")
        t = tuple(self.integer(x, f"{where}.tokens[{i}]") for i, x in enumerate(tokens))
        s = tuple(self.number(x, f"{where}.seconds[{i}]", unit="s") for i, x in enumerate(seconds))
        for i in range(1, len(t)):
            if t[i] <= t[i - 1]:
                self.fail(f"{where}.tokens[{i}]", f"must be strictly increasing, got {t[i]} after {t[i - 1]}")
            if s[i] < s[i - 1]:
                self.fail(f"{where}.seconds[{i}]", f"must be non-decreasing in tokens (monotone), "
                                                   f"got {s[i]!r} after {s[i - 1]!r}")
        return t, s

    def gpu_curves(self, data: Any) -> tuple[GpuCurve, ...]:
        out, seen = [], {}
        for i, item in enumerate(self.list_(data, "gpu")):
            w = f"gpu[{i}]"
            d = self.obj(item, w, ("kind", *_GPU_DIMS, "dtype", "direction", "tokens", "seconds"),
                         ("step_to", *_GPU_OPTIONAL_DIMS))
            kind = self.choice(d["kind"], w + ".kind", GPU_CURVE_KINDS)
            dims = {}
            for k in (*_GPU_DIMS, *_GPU_OPTIONAL_DIMS):
                if k in GPU_KIND_DIMS[kind]:
                    dims[k] = self.integer(d.get(k), f"{w}.{k}")
                elif d.get(k) is not None:
                    self.fail(f"{w}.{k}", f"must be null for kind {kind!r} (it depends on "
                                          f"{', '.join(GPU_KIND_DIMS[kind])} only)")
                else:
                    dims[k] = None
            c = GpuCurve(kind=kind, **dims, dtype=self.choice(d["dtype"], w + ".dtype", DTYPE_BYTES),
                         direction=self.choice(d["direction"], w + ".direction", DIRECTIONS),
                         tokens=(), seconds=())
            key = (c.kind, *dims.values(), c.dtype, c.direction)
            if key in seen:
                self.fail(w, f"duplicates gpu[{seen[key]}] (same kind, dims, dtype and direction)")
            seen[key] = i
            t, s = self.curve_points(d, w)
            step_to = self.integer(d.get("step_to"), w + ".step_to", nullable=True)
            out.append(dataclasses.replace(c, tokens=t, seconds=s, step_to=step_to))
        return tuple(out)

    def cpu_curves(self, data: Any) -> tuple[CpuCurve, ...]:
        out, seen = [], {}
        for i, item in enumerate(self.list_(data, "cpu_expert")):
            w = f"cpu_expert[{i}]"
            d = self.obj(item, w, ("d", "h", "dtype", "direction", "threads", "tokens", "seconds"))
            key = (self.integer(d["d"], w + ".d"), self.integer(d["h"], w + ".h"),
                   self.choice(d["dtype"], w + ".dtype", DTYPE_BYTES),
                   self.choice(d["direction"], w + ".direction", DIRECTIONS),
                   self.integer(d["threads"], w + ".threads"))
            if key in seen:
                self.fail(w, f"duplicates cpu_expert[{seen[key]}] (same d, h, dtype, direction, threads)")
            seen[key] = i
            out.append(CpuCurve(*key, *self.curve_points(d, w)))
        return tuple(out)

    def adam(self, data: Any) -> Adam:
        d = self.obj(data, "adam", ("cpu_s_per_param", "gpu_s_per_param"), ("cpu_shared", "cpu_call_s"))
        gpu = d["gpu_s_per_param"]
        ranks, shared = None, {}
        if "cpu_shared" in d:
            sh = self.obj(d["cpu_shared"], "adam.cpu_shared", ("ranks", "s_per_param"))
            ranks = sh["ranks"]
            if not isinstance(ranks, int) or isinstance(ranks, bool) or ranks < 2:
                self.fail("adam.cpu_shared.ranks", f"must be an integer >= 2, got {ranks!r}")
            shared = self.table(sh["s_per_param"], "adam.cpu_shared.s_per_param", "threads")
        calls = self.table(d["cpu_call_s"], "adam.cpu_call_s", "threads") if "cpu_call_s" in d else {}
        return Adam(self.table(d["cpu_s_per_param"], "adam.cpu_s_per_param", "threads", allow_empty=True),
                    None if gpu is None else self.number(gpu, "adam.gpu_s_per_param", unit="s"), ranks, shared,
                    calls)

    def roofline(self, data: Any) -> dict[str, Any]:
        hints = typing.get_type_hints(AnalyticHardware)
        names = tuple(f.name for f in dataclasses.fields(AnalyticHardware))
        d = self.obj(data, "roofline", names)
        out: dict[str, Any] = {}
        for k in names:
            w = f"roofline.{k}"
            if hints[k] is LinkSpec:
                f = self.obj(d[k], w, ("latency_s", "GBps"))
                out[k] = {"latency_s": self.number(f["latency_s"], w + ".latency_s", positive=False, unit="s"),
                          "GBps": self.number(f["GBps"], w + ".GBps", unit="GB/s")}
            elif hints[k] is str:
                out[k] = self.string(d[k], w)
            else:
                out[k] = self.number(d[k], w, positive=not k.endswith("_s"))
        try:
            _roofline_hardware(out)
        except (ConfigError, TypeError) as e:
            self.fail("roofline", str(e))
        return out


# --------------------------------------------------------------------------- files


def _builtin_dir():
    return importlib.resources.files("aptmoe").joinpath("profiles")


def list_profiles() -> list[str]:
    """Names of the built-in profiles (``aptmoe/profiles/<name>.json``)."""
    return sorted(p.name[:-5] for p in _builtin_dir().iterdir() if p.name.endswith(".json"))


def default_planning_profile(on_gpu: bool) -> str:
    """The built-in profile aptmoe-run's APTMoE policy planned with when it was given none and
    no built-in profile was made on its kind of machine (`machine_profile`); validate takes a
    stored run without a record of its profile to have planned with it."""
    return "h200" if on_gpu else "a800-paper"


@functools.lru_cache(maxsize=8)
def machine_profile(gpu_name: str, gpu_count: int, cpu_cores: int) -> str | None:
    """The built-in profile calibrated on a machine like this one (same GPU model and count,
    same physical cores), the latest of them where several are, or None. On nvidia-h200-x2 the
    default had been `h200`, made on the 4-GPU kind, whose CPU figures are another host's;
    `h200-2gpu` is this host's. `h200` stays for the stored runs it planned, but `h200-4gpu`
    (2026-11-30) has the parts calibrated since (dispatch, host memory, receive wait, CPU jobs)."""
    found = []
    for name in list_profiles():
        try:
            prof = load_profile(name)
        except ProfileError:
            continue
        hw = prof.hardware
        if (hw.gpu_name, hw.gpu_count, hw.cpu_cores) == (gpu_name, gpu_count, cpu_cores):
            when = datetime.datetime.fromisoformat(prof.made_by.date)
            found.append((when if when.tzinfo else when.replace(tzinfo=datetime.timezone.utc), name))
    return max(found)[1] if found else None


def load_profile(name_or_path: str | os.PathLike) -> Profile:
    """A built-in profile by bare name (no slash, no .json), or a calibration file by path:
    plain, or the ``.json.xz`` (``.json.gz``) a stored run keeps (aptmoe.stored), which a
    plain path that is not there also reads."""
    text_name = os.fspath(name_or_path)
    builtin = ("/" not in text_name and os.sep not in text_name
               and not text_name.endswith((".json", ".json.gz", ".json.xz")))
    if builtin:
        res = _builtin_dir().joinpath(f"{text_name}.json")
        if not res.is_file():
            raise ProfileError(f"profile {text_name!r} is not built in; built-in profiles: "
                               f"{', '.join(list_profiles()) or 'none'} (or give a path to a .json file)")
        return Profile.from_json(res.read_text(encoding="utf-8"), f"aptmoe/profiles/{text_name}.json")
    source = os.fspath(stored.kept(text_name))
    try:
        text = stored.read_text(source)
    except FileNotFoundError:
        raise ProfileError(f"{text_name}: no such calibration file") from None
    except (OSError, UnicodeDecodeError, *stored.CORRUPT) as e:
        raise ProfileError(f"{source}: cannot read: {e}") from None
    return Profile.from_json(text, source)


# --------------------------------------------------------------------------- interpolation


def interp_monotone(tokens: typing.Sequence[int], seconds: typing.Sequence[float], x: float,
                    step_to: float = 0) -> float:
    """Piecewise-linear through (tokens, seconds), for tokens[0] <= x <= tokens[-1]; between
    two points at or below `step_to`, a staircase instead: x takes the upper point's time
    (GpuCurve.step_to).

    Exact at the measured points and monotone between them when `seconds` is.
    """
    if not tokens[0] <= x <= tokens[-1]:
        raise ValueError(f"{x} is outside [{tokens[0]}, {tokens[-1]}]")
    i = bisect.bisect_left(tokens, x)
    if tokens[i] == x or tokens[i] <= step_to:          # an interval wholly in the staircase
        return float(seconds[i])
    t0, t1, s0, s1 = tokens[i - 1], tokens[i], seconds[i - 1], seconds[i]
    return float(s0 + (s1 - s0) * (x - t0) / (t1 - t0))


def _count(what: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ConfigError(f"{what} must be a non-negative integer, got {value!r}")
    return int(value)


def _positive(what: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ConfigError(f"{what} must be a positive integer, got {value!r}")
    return int(value)


def _direction(direction: str) -> str:
    if direction not in DIRECTIONS:
        raise ConfigError(f"direction {direction!r} is unknown; use one of {', '.join(DIRECTIONS)}")
    return direction


# --------------------------------------------------------------------------- the cost source


class ProfileCost:
    """`CostSource` from a calibration file, for one model; the roofline fills the gaps.

    `fallbacks` collects one short line per approximation used (no curve, outside the
    measured tokens or threads); the simulator prints and stores them with its results.
    """

    def __init__(self, profile: Profile | str, model: ModelConfig, *, pinned: bool = True,
                 link_cap_GBps: float | None = None, ranks_per_host: int = 1) -> None:
        if isinstance(profile, (str, os.PathLike)):
            profile = load_profile(profile)
        if link_cap_GBps is not None and not link_cap_GBps > 0:
            raise ConfigError(f"link cap must be positive GB/s or None, got {link_cap_GBps}")
        self.profile = profile
        self.model = model
        self.pinned = pinned
        self.link_cap_GBps = link_cap_GBps
        self.ranks_per_host = ranks_per_host
        self.roofline = AnalyticCost(model, profile.roofline_hardware(), link_cap_GBps)
        self.fallbacks: set[str] = set()
        suffix = ("" if pinned else "/pageable") + ("" if link_cap_GBps is None else f"@{link_cap_GBps:g}GBps")
        self.name = f"profile:{profile.name}{suffix}"
        self._gpu = {(c.kind, c.direction): c for c in profile.gpu if c.matches(model)}
        self._cpu: dict[str, dict[int, CpuCurve]] = {}
        for c in profile.cpu_expert:
            if c.matches(model):
                self._cpu.setdefault(c.direction, {})[c.threads] = c
        self._memo: dict[tuple, float] = {}

    def __repr__(self) -> str:
        return f"ProfileCost({self.model.name!r}, {self.name!r})"

    # ---- labels for fallbacks

    def _gpu_label(self, kind: str, direction: str) -> str:
        m = self.model
        dims = {"e": f"d{m.embedding_dim} h{m.hidden_dim}",
                "a": f"d{m.embedding_dim} heads{m.num_heads} L{m.seq_length}",
                "g": f"d{m.embedding_dim} E{m.num_experts}"}[kind]
        return f"gpu {kind} {direction} {dims} {m.dtype}"

    def _cpu_label(self, direction: str) -> str:
        m = self.model
        return f"cpu e {direction} d{m.embedding_dim} h{m.hidden_dim} {m.dtype}"

    def _on_curve(self, tokens: tuple[int, ...], seconds: tuple[float, ...], n: int,
                  roofline: Callable[[int], float], label: str, step_to: int | None = None) -> float:
        lo, hi = tokens[0], tokens[-1]
        if lo <= n <= hi:
            return interp_monotone(tokens, seconds, n, step_to or 0)
        # Outside: the roofline's shape, anchored at the curve's end, stays continuous.
        edge, end_s = (lo, seconds[0]) if n < lo else (hi, seconds[-1])
        side = "below" if n < lo else "above"
        self.fallbacks.add(f"{label}: {side} measured tokens {lo}..{hi}, roofline scaled to the curve's end")
        r_edge = roofline(edge)
        return end_s * roofline(n) / r_edge if r_edge > 0 else roofline(n)

    # ---- CostSource

    def gpu_s(self, kind: str, tokens: int, direction: str) -> float:
        key = ("gpu", kind, tokens, direction)
        if key in self._memo:
            return self._memo[key]
        if kind not in BLOCK_KINDS:
            raise ConfigError(f"block kind {kind!r} is unknown; use one of {', '.join(BLOCK_KINDS)}")
        n = _count("tokens", tokens)
        _direction(direction)
        curve = self._gpu.get((kind, direction))
        if n == 0:
            value = 0.0
        elif curve is None:
            self.fallbacks.add(f"{self._gpu_label(kind, direction)}: no curve, roofline")
            value = self.roofline.gpu_s(kind, n, direction)
        else:
            value = self._on_curve(curve.tokens, curve.seconds, n,
                                   lambda x: self.roofline.gpu_s(kind, x, direction),
                                   self._gpu_label(kind, direction), curve.step_to)
        self._memo[key] = value
        return value

    def host_s(self, kind: str, direction: str) -> float:
        d = self.profile.dispatch
        return 0.0 if d is None else d.seconds.get(kind, {}).get(direction, 0.0)

    def between_s(self, direction: str) -> float:
        d = self.profile.dispatch
        return 0.0 if d is None else d.between.get(direction, 0.0)

    def combine_s(self, direction: str) -> float:
        d = self.profile.dispatch
        return 0.0 if d is None or d.combine is None else d.combine.get(direction, 0.0)

    def glue_gpu_s(self, assignments: int, direction: str) -> float:
        return self._outside_gpu_s("c", _count("assignments", assignments), direction,
                                   lambda m: f"d{m.embedding_dim} E{m.num_experts}", "a layer's GPU work between its blocks")

    def ends_gpu_s(self, tokens: int, part: str, direction: str) -> float:
        if part not in END_KINDS:
            raise ValueError(f"part {part!r} is not one of {', '.join(END_KINDS)}")
        return self._outside_gpu_s(END_KINDS[part], _count("tokens", tokens), direction,
                                   lambda m: f"d{m.embedding_dim} V{m.vocab_size}", f"the {part}'s GPU time")

    def _outside_gpu_s(self, kind: str, n: int, direction: str, dims: Callable[[ModelConfig], str],
                       what: str) -> float:
        """GPU work outside the blocks from the curve of `kind` at `n` (0 at 0; outside the
        curve in proportion to `n`, the rows it streams). A profile from before the kind leaves
        the work out, as it was, and says so (`what` ... left out)."""
        key = ("outside", kind, n, direction)
        if key in self._memo:
            return self._memo[key]
        _direction(direction)
        curve = self._gpu.get((kind, direction))
        label = f"gpu {kind} {direction} {dims(self.model)} {self.model.dtype}"
        if n == 0:
            value = 0.0
        elif curve is None:
            self.fallbacks.add(f"{label}: no curve, {what} left out")
            value = 0.0
        else:
            value = self._on_curve(curve.tokens, curve.seconds, n, float, label)
        self._memo[key] = value
        return value

    def action_s(self, pass_: str, part: str) -> float:
        d = self.profile.dispatch
        return 0.0 if d is None or d.action is None else d.action.get(pass_, {}).get(part, 0.0)

    def post_s(self, message: str) -> float:
        d = self.profile.dispatch
        return 0.0 if d is None or d.post is None else d.post.get(message, 0.0)

    def host_runs_ahead(self) -> bool:
        return self.profile.dispatch is None or self.profile.dispatch.device == "cuda"

    def cpu_expert_s(self, tokens: int, direction: str, threads: int) -> float:
        key = ("cpu", tokens, direction, threads)
        if key in self._memo:
            return self._memo[key]
        n = _count("tokens", tokens)
        t = _positive("threads", threads)
        _direction(direction)
        curves = self._cpu.get(direction, {})
        label = self._cpu_label(direction)

        def on(c: CpuCurve) -> float:
            return self._on_curve(c.tokens, c.seconds, n,
                                  lambda x: self.roofline.cpu_expert_s(x, direction, c.threads),
                                  f"{label} {c.threads} threads")

        if n == 0:
            value = 0.0
        elif not curves:
            self.fallbacks.add(f"{label}: no curve, roofline")
            value = self.roofline.cpu_expert_s(n, direction, t)
        else:
            value = _by_threads(curves, t, on, lambda: self.fallbacks.add(
                f"{label}: {t} threads outside measured {min(curves)}..{max(curves)}, "
                f"scaled by measured/threads"))
        self._memo[key] = value
        return value

    def h2d(self) -> LinkSpec:
        L = self.profile.links
        return (L.h2d_pinned if self.pinned else L.h2d_pageable).spec().capped(self.link_cap_GBps)

    def d2h(self) -> LinkSpec:
        L = self.profile.links
        return (L.d2h_pinned if self.pinned else L.d2h_pageable).spec().capped(self.link_cap_GBps)

    def root_GBps(self, gpus_sharing: int, direction: str = "h2d") -> float:
        """From the concurrent table, linear between measured counts, flat beyond them;
        never more than `gpus_sharing` single links (which carries the cap and pageable)."""
        n = _positive("gpus_sharing", gpus_sharing)
        if direction == "h2d":
            return min(_table_at(self.profile.links.root_h2d_GBps, n), n * self.h2d().GBps)
        if direction == "d2h":
            return min(_table_at(self.profile.links.root_d2h_GBps, n), n * self.d2h().GBps)
        raise ConfigError(f"direction {direction!r} is unknown; use h2d or d2h")

    def duplex_GBps(self) -> tuple[float, float]:
        """(h2d, d2h) bandwidth of one GPU's link with both directions busy."""
        L = self.profile.links
        return (min(L.duplex_h2d_GBps, self.h2d().GBps), min(L.duplex_d2h_GBps, self.d2h().GBps))

    def p2p(self, same_node: bool) -> LinkSpec:
        L = self.profile.links
        return (L.p2p_intra if same_node else L.p2p_inter).spec()

    def _adam_shared(self) -> bool:
        """Whether this host's ranks have a figure for updating at once (and say so if it was
        measured with another number of ranks)."""
        adam = self.profile.adam
        if self.ranks_per_host > 1 and adam.cpu_shared_s_per_param:
            if adam.shared_ranks != self.ranks_per_host:
                self.fallbacks.add(f"adam cpu: measured with {adam.shared_ranks} ranks at once, "
                                   f"used for {self.ranks_per_host}")
            return True
        return False

    def adam_cpu_s(self, num_params: int, threads: int) -> float:
        # Ranks of one host update at nearly the same time (every rank's last backward ends
        # the step) and share the memory bandwidth: the figure measured that way, where there
        # is one (what the policy plans with; the simulator times each chunk alone and slows
        # it only while another rank updates: adam_shared_slowdown).
        adam = self.profile.adam
        return self._adam_cpu_s(num_params, threads,
                                adam.cpu_shared_s_per_param if self._adam_shared() else adam.cpu_s_per_param)

    def adam_cpu_alone_s(self, num_params: int, threads: int) -> float:
        return self._adam_cpu_s(num_params, threads, self.profile.adam.cpu_s_per_param)

    def adam_shared_slowdown(self, threads: int) -> float:
        # On the 2-GPU H200 grid (docs/validation-h200-2gpu-v2) a chunk took 1.55-1.79 ms while
        # the other rank's Adam ran (median per cell) and 1.14-1.36 ms alone: the profile's two
        # figures (0.42 and 0.31 ns per parameter at 14 threads). The ranks overlapped in 32-96%
        # of their chunks, so one figure for every chunk over-predicted the rest.
        adam = self.profile.adam
        if not (self._adam_shared() and adam.cpu_s_per_param):
            return 1.0
        t = _positive("threads", threads)
        # (a thread count outside the measured ones: adam_cpu_s names that fallback)
        shared = _by_threads(adam.cpu_shared_s_per_param, t, lambda x: x, lambda: None)
        alone = _by_threads(adam.cpu_s_per_param, t, lambda x: x, lambda: None)
        return max(1.0, shared / alone)

    def _adam_cpu_s(self, num_params: int, threads: int, table: Mapping[int, float]) -> float:
        p = _count("num_params", num_params)
        t = _positive("threads", threads)
        adam = self.profile.adam
        if not table:
            self.fallbacks.add("adam cpu: not measured, roofline")
            return self.roofline.adam_cpu_s(p, t)
        # one step() call: its fixed cost (where measured; not scaled by threads) and its parameters
        calls = adam.cpu_call_s
        call = calls[nearest_count(calls, t)] if calls else 0.0
        return call + p * _by_threads(table, t, lambda per_param: per_param, lambda: self.fallbacks.add(
            f"adam cpu: {t} threads outside measured {min(table)}..{max(table)}, scaled by measured/threads"))

    def memory_share(self, threads: int) -> "MemoryShare | None":
        """What CPU work on `threads` threads (the nearest measured count) gets of host memory
        beside the links' copies; None where it was not measured, and CPU work then never
        waits for copies."""
        hm = self.profile.host_memory
        if hm is None:
            self.fallbacks.add("host memory: not measured, CPU work never waits for the links' copies")
            return None
        share = hm.share(_positive("threads", threads))
        if not share.measured:
            self.fallbacks.add("host memory: the CPU stream beside copies of other rates not measured, "
                               "CPU work gets the measured total less the copies' rate")
        return share

    def copy_limits(self, threads: int) -> CopyLimits:
        """What caps a GPU's copies beside its other direction and its host's Adam, with the
        rank's CPU work on `threads` threads (the nearest measured count)."""
        hm = self.profile.host_memory
        beside = hm.copies_beside_adam[nearest_count(hm.copies_beside_adam, _positive("threads", threads))] \
            if hm is not None and hm.copies_beside_adam else {}
        if not beside:
            self.fallbacks.add("host memory: copies beside Adam not measured, they keep their link's rate")
        h2d, d2h = self.duplex_GBps()
        return CopyLimits({"h2d": h2d, "d2h": d2h}, beside)

    def pacer_late_s(self) -> float:
        """How late a capped copy is seen to have landed after its bytes (0: not measured)."""
        if self.profile.pacer is None:
            self.fallbacks.add("pacer: not measured, a capped copy lands exactly when its bytes have passed")
            return 0.0
        return self.profile.pacer.late_s

    def recv_slowdown(self, kind: str) -> float:
        """How many times its time alone a block of `kind` (at this model's width) takes while
        a receive of its rank waits (1: not measured; a measured ratio under 1 is the timing's
        noise: a waiting receive never speeds a block up)."""
        if self.profile.recv_wait is None:
            self.fallbacks.add("recv wait: not measured, a posted receive costs the blocks beside it nothing")
            return 1.0
        x, measured = self.profile.recv_wait.slowdown(kind, self.model.embedding_dim)
        if not measured:
            self.fallbacks.add(f"recv wait {kind} d{self.model.embedding_dim}: not measured, the median of the "
                               f"blocks that were")
        return max(1.0, x)

    def cpu_job(self) -> CpuJob | None:
        """How long a CPU job waits beyond its copies and its experts (None: not measured)."""
        if self.profile.cpu_job is None and self.profile.dispatch is not None:
            self.fallbacks.add("cpu job: not measured, a CPU job takes its copies and its experts only")
        return self.profile.cpu_job

    def adam_gap_s(self, policy: str) -> float:
        """The CPU worker's own seconds after each Adam chunk under loading policy `policy`
        ("aptmoe", "stage"), before it takes its next job; 0 where not measured."""
        job = self.profile.cpu_job
        if job is None or policy not in job.adam_gap_s:
            if self.profile.dispatch is not None:
                self.fallbacks.add(f"adam gap {policy}: not measured, the CPU worker goes from one Adam chunk "
                                   "to the next at once")
            return 0.0
        return job.adam_gap_s[policy]

    def policy_s(self, policy: str, call: str) -> float:
        """Host seconds of one call of the loading policy `policy` ("aptmoe", "stage") of kind
        `call` (aptmoe/policy_timing.py `CALLS`), at the dispatch probe's host speed where both
        timed the reference loop; 0 where not measured."""
        p = self.profile.policy_host
        if p is None:
            return 0.0
        s = p.seconds.get(policy, {}).get(call, 0.0)
        d = self.profile.dispatch
        if p.loop_s and d is not None and d.loop_s:
            s *= d.loop_s / p.loop_s
        return s

    def issue_tolls(self) -> IssueTolls | None:
        """What the issuing thread loses to the rank's other threads (None: not measured,
        and it runs at its calibrated speed whatever runs beside it)."""
        t = self.profile.issue_tolls
        if t is None and self.profile.dispatch is not None and self.profile.dispatch.device == "cuda":
            self.fallbacks.add("issue tolls: not measured, the issuing thread is as fast beside copies "
                               "and CPU jobs as alone")
        return t

    def adam_gpu_s(self, num_params: int) -> float:
        p = _count("num_params", num_params)
        per_param = self.profile.adam.gpu_s_per_param
        if per_param is None:
            self.fallbacks.add("adam gpu: not measured, roofline")
            return self.roofline.adam_gpu_s(p)
        return p * per_param


_T = typing.TypeVar("_T")


def _by_threads(by_threads: Mapping[int, _T], threads: int, value: Callable[[_T], float],
                outside: Callable[[], None]) -> float:
    """Between measured thread counts: linear in 1/threads; outside: the nearest measured
    count scaled by measured/threads (ideal scaling; `outside` records the fallback)."""
    counts = sorted(by_threads)
    if threads in by_threads:
        return value(by_threads[threads])
    if counts[0] < threads < counts[-1]:
        i = bisect.bisect_left(counts, threads)
        t0, t1 = counts[i - 1], counts[i]
        w = (1 / threads - 1 / t1) / (1 / t0 - 1 / t1)
        return w * value(by_threads[t0]) + (1 - w) * value(by_threads[t1])
    outside()
    near = counts[0] if threads < counts[0] else counts[-1]
    return value(by_threads[near]) * near / threads


def _table_at(table: Mapping[int, float], n: int) -> float:
    """Linear between the measured GPU counts, flat beyond them."""
    keys = sorted(table)
    n = min(max(n, keys[0]), keys[-1])
    return interp_monotone(keys, [table[k] for k in keys], n)


def cost_for(cfg, profile: Profile | str) -> ProfileCost:
    """The costs of `cfg`'s model on a profile's machine, with the config's link cap and
    pinning: what both back-ends and the APTMoE policy read."""
    if not isinstance(profile, Profile):
        profile = load_profile(profile)
    return ProfileCost(profile, cfg.model, pinned=cfg.schedule.pinned, link_cap_GBps=cfg.cluster.link_bandwidth_GBps,
                       ranks_per_host=cfg.cluster.gpus_per_node)
