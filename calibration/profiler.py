"""Profiles this machine into a calibration file (`aptmoe.profile`, schema aptmoe-calibration/1).

What is measured, and how (the file's ``sources`` repeats it, with the figures used):

- host links: `copy_` between a pinned or pageable host buffer and each GPU alone, both
  directions, sizes 64 KiB .. 1 GiB; pinned copies run on a side stream and are timed with
  CUDA events, pageable ones on the host clock up to a synchronisation (the driver stages
  them through its own pinned buffer, partly on the host). latency + bytes / bandwidth is
  fitted with `reference.fit_link` to the per-size medians over the GPUs.
- the socket root: n GPUs copying at once (threads, one per GPU, each with its own stream,
  released together by a barrier), aggregate bytes over the wall-time window;
- duplex: both directions of GPU 0 at once, released together by one event;
- GPU to GPU: a device-to-device copy GPU 0 -> GPU 1 (what `tensor.to('cuda:1')` does).
- GPU blocks (attention, gate, expert FFN), forward and backward, by token count, on GPU 0,
  timed with CUDA events behind a device-side hold: device execution time, without the
  host's launch gaps;
- one expert on the CPU, forward and backward, by token count and thread count, threads
  bound to the first cores;
- Adam: one `torch.optim.Adam` step on the CPU per thread count, and on GPU 0.

Every figure is the median of repetitions after warm-up, over fresh random inputs; curves
are made non-decreasing in tokens by pool-adjacent-violators (`aptmoe.isotonic.pava`).

Without a GPU only the CPU parts are measured; the rest comes from the roofline preset and
is listed in ``skipped``. torch is imported here, never by the core or the simulator.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import statistics
import sys
import threading
import time
import warnings
import dataclasses
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator, Sequence

import psutil
import torch

from aptmoe.analytic_cost import AnalyticCost, AnalyticHardware, a800_pcie_hardware, h200_hardware
from aptmoe import version
from aptmoe.calibration import cpu_ranks
from aptmoe.calibration.cli import MODEL_SIZES, PARTS     # what --skip can leave out; the presets: one list each
from aptmoe.calibration.cpu_jobs import PROBE as CPU_JOB_PROBE
from aptmoe.calibration.cpu_jobs import measure_cpu_job
from aptmoe.calibration.dispatch import PROBE, PROBE_KERNEL_LOADING, measure_dispatch
from aptmoe.calibration.issue_tolls import CAP_GBps, COPY_MIB, measure_issue_tolls
from aptmoe.calibration.own_calls import PROBE as OWN_CALLS_PROBE
from aptmoe.calibration.pacer import CAP_GBps as PACER_CAP
from aptmoe.calibration.pacer import COPIES as PACER_COPIES
from aptmoe.calibration.pacer import COPY_BYTES as PACER_BYTES
from aptmoe.calibration.pacer import ROUNDS as PACER_ROUNDS
from aptmoe.calibration.pacer import measure_pacer_late
from aptmoe.calibration.host_memory import (HostMemoryResult, adam_stream, as_executor_host, host_memory_source,
                                           measure_host_memory)
from aptmoe.calibration.p2p import P2P, RECV_REPS, RECV_SEQUENCES, Width, measure_p2p_group
from aptmoe.calibration.reference import fit_link
from aptmoe.calibration.timing import Reps, cuda_sample, hold_stream, host_sample, median_of, medians, samples
from aptmoe.config import VOCAB_SIZE, moe_model
from aptmoe.host import allowed_cores, physical_cores
from aptmoe.policy_timing import Shape as PolicyShape
from aptmoe.policy_timing import measure_policy_host
from aptmoe.exec import model as exec_model
from aptmoe.exec.block_adam import FUSED_CPU, BlockAdam
from aptmoe.costs import LinkSpec
from aptmoe.isotonic import pava
from aptmoe.profile import (Adam, CpuCurve, CpuJob, Dispatch, GpuCurve, Hardware, HostMemory, IssueTolls, LinkFit, Pacer, Links, MadeBy, PolicyHost, Profile,
                            RecvWait, Skipped, nearest_count)

POLICY_SHAPE = PolicyShape()             # the plans the policies are timed through
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SIG_DIGITS = 4
KiB, MiB = 1 << 10, 1 << 20
# Messages between CPU ranks (gloo): boundary activations of the models CPU ranks run. Beyond
# about 256 KiB gloo between ranks on one core each took 1.5-2 ms, and 64 KiB was bimodal
# (0.08 or 2.5 ms) on the 2-core development machine: the fit is over the whole range.
P2P_CPU_BYTES = (4 * KiB, 16 * KiB, 64 * KiB, 256 * KiB, 1 * MiB)
# Device-side hold before each timed GPU block: longer than the host takes to enqueue one
# block's kernels (an attention backward is ~40 launches of ~10 us).
GPU_HOLD_S = 1e-3
# Pageable copies when nothing could be measured: DESIGN §2 gives 7-10 GB/s on both hosts.
ASSUMED_PAGEABLE_GBPS = 8.0


# --------------------------------------------------------------------------- options and sizes


@dataclass(frozen=True)
class Options:
    models: tuple[str, ...] = MODEL_SIZES
    dtypes: tuple[str, ...] = ("fp32", "bf16")
    threads: tuple[int, ...] = (7, 14, 28)
    gate_experts: tuple[int, ...] = (8, 16, 64)
    seq_length: int = 128
    heads: int = 32
    quick: bool = False
    max_gpus: int | None = None              # None: every visible GPU
    skip: frozenset[str] = frozenset()       # parts of PARTS left to the roofline
    gpu_max_tokens: int | None = None        # None: the mode's default
    cpu_max_tokens: int | None = None
    cpu_point_limit_s: float | None = None   # stop a CPU series after a point this slow
    blocks_on: str = "auto"                  # "cpu": time the "GPU" blocks on the CPU (for CPU ranks)
    block_threads: int | None = None         # threads for blocks on the CPU (None: half the cores)
    dispatch_repeats: int = 1                # dispatch probe runs, each figure their median
    dispatch_ranks: int | None = None        # the probe's ranks (None: one GPU, or two CPU ranks)


@dataclass(frozen=True)
class Sizes:
    """How much to measure: the full mode, or `--quick` (fewer sizes, counts, repetitions)."""

    copy_bytes: tuple[int, ...]
    root_bytes: int               # one copy of the concurrent and duplex runs
    root_copies: int              # copies per GPU per repetition there
    gpu_tokens: tuple[int, ...]   # gate and expert
    attn_sequences: tuple[int, ...]
    cpu_tokens: tuple[int, ...]
    cpu_point_limit_s: float      # a CPU series stops after the first point whose fwd + bwd exceed it
    adam_params: int
    adam_tensors: int
    link_reps: Reps
    gpu_reps: Reps
    cpu_reps: Reps
    adam_reps: Reps
    toll_rounds: int = 7          # rounds of the issuing loop beside each neighbour (issue_tolls.py)
    # expert blocks on a GPU: gpu_tokens and every multiple of EXPERT_STEP up to EXPERT_DENSE_TO
    # in the full mode. Their GEMMs run in row tiles: on the H200 an MoE-L expert's forward took
    # the same time from 129 to 192 tokens and one step more from 193 (0.99 ms, then 1.29), so
    # a line through the powers of two alone put it 23% short at G 0.3 in three matrices (v4-v6)
    expert_tokens: tuple[int, ...] = ()
    cpu_rounds: int = 1           # passes over the CPU counts, each point the median of theirs (cpu_ranks.py)


EXPERT_STEP, EXPERT_DENSE_TO = 32, 1024   # beyond 1024 tokens a 64-token step is at most 6%
# CPU experts in the full mode: these counts as well as the powers of two. APTMoE sends the
# experts that few tokens chose to the CPU (in the stored 2-GPU runs 5,665 of 5,673 CPU expert
# jobs had under 128 tokens), and the curve between powers of two is not a line. MoE-S's forward
# on the H200 host's 14 threads: the runs' jobs nearest 8 tokens took a median of 1.0 ms, those
# nearest each count from 16 to 80 1.5-2.5 ms, where the calibration's points were 1.25 ms at 16
# and 1.72 at 32 (session 24, docs/measured/session24/runs-by-count.txt)
CPU_DENSE_TOKENS = (3, 6, 10, 12, 14, 20, 24, 28, 40, 48, 56, 80, 96, 112)


def _powers(lo: int, hi: int, step: int = 1) -> tuple[int, ...]:
    """lo, lo * 2**step, ... up to hi."""
    out, x = [], lo
    while x <= hi:
        out.append(x)
        x <<= step
    return tuple(out)


def sizes_for(opts: Options) -> Sizes:
    if opts.quick:
        s = Sizes(copy_bytes=_powers(64 * KiB, 64 * MiB, 2), root_bytes=64 * MiB, root_copies=4,
                  gpu_tokens=(1, 16, 256, 2048), attn_sequences=(1, 4, 16), cpu_tokens=(1, 16, 256),
                  cpu_point_limit_s=0.15, adam_params=4 * MiB, adam_tensors=4,
                  link_reps=Reps(1, 5, 2, 0.2), gpu_reps=Reps(2, 5, 3, 0.2, warmup_s=0.02),
                  cpu_reps=Reps(1, 3, 3, 0.3, warmup_s=0.05), adam_reps=Reps(1, 3, 1, 0.5), toll_rounds=3)
    else:
        s = Sizes(copy_bytes=_powers(64 * KiB, 1 << 30, 2), root_bytes=256 * MiB, root_copies=8,
                  gpu_tokens=_powers(1, 16384), attn_sequences=_powers(1, 128),
                  cpu_tokens=tuple(sorted(set(_powers(1, 4096)) | set(CPU_DENSE_TOKENS))),
                  cpu_point_limit_s=0.6, adam_params=64 * MiB, adam_tensors=16,
                  link_reps=Reps(2, 10, 3, 1.0), gpu_reps=Reps(3, 15, 5, 1.0, warmup_s=0.05),
                  # CPU points: up to 9 repetitions each within the budget (5 until 2026-11-30,
                  # when 34 of the 2-GPU profile's 142 medians came out of order)
                  cpu_reps=Reps(1, 9, 3, 1.0, warmup_s=0.1), adam_reps=Reps(2, 5, 3, 3.0), cpu_rounds=3)
    dense = () if opts.quick else tuple(range(EXPERT_STEP, EXPERT_DENSE_TO + 1, EXPERT_STEP))
    s = replace(s, expert_tokens=tuple(sorted(set(s.gpu_tokens) | set(dense))))
    if opts.gpu_max_tokens is not None:
        cap = opts.gpu_max_tokens
        s = replace(s, gpu_tokens=tuple(t for t in s.gpu_tokens if t <= cap) or (1,),
                    expert_tokens=tuple(t for t in s.expert_tokens if t <= cap) or (1,),
                    attn_sequences=tuple(q for q in s.attn_sequences if q * opts.seq_length <= cap) or (1,))
    if opts.cpu_max_tokens is not None:
        s = replace(s, cpu_tokens=tuple(t for t in s.cpu_tokens if t <= opts.cpu_max_tokens) or (1,))
    if opts.cpu_point_limit_s is not None:
        s = replace(s, cpu_point_limit_s=opts.cpu_point_limit_s)
    return s


def model_dims(size: str) -> tuple[int, int]:
    """(d, h) of a Table I model (S, M, L, from the config presets) or given as "DxH"."""
    if "x" in size:
        d, h = size.split("x", 1)
        return int(d), int(h)
    m = moe_model(size, 8)
    return m.embedding_dim, m.hidden_dim


# --------------------------------------------------------------------------- the machine


def _cpuinfo() -> list[dict[str, str]]:
    """/proc/cpuinfo as one dict per logical CPU ([] where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    out = []
    for block in text.strip().split("\n\n"):
        entry = {}
        for line in block.splitlines():
            key, _, value = line.partition(":")
            entry[key.strip()] = value.strip()
        out.append(entry)
    return out


def _topology(cpu: int) -> tuple[int, int]:
    """(socket, core) of a logical CPU; unknown: its own core on socket 0."""
    base = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
    try:
        return int((base / "physical_package_id").read_text()), int((base / "core_id").read_text())
    except (OSError, ValueError):
        return 0, cpu


def cpus_in_binding_order(cpus: Sequence[int]) -> list[int]:
    """One logical CPU per physical core (socket 0 first), then their SMT siblings: the
    first t entries are t distinct cores whenever the machine has them, so t threads do
    not share a core's arithmetic units."""
    seen: set[tuple[int, int]] = set()
    first, siblings = [], []
    for cpu in sorted(cpus, key=lambda c: (_topology(c)[0], c)):
        key = _topology(cpu)
        (siblings if key in seen else first).append(cpu)
        seen.add(key)
    return first + siblings


def thread_counts(requested: Sequence[int], available: int) -> tuple[int, ...]:
    """The requested counts the machine has, plus its maximum when a request exceeds it."""
    counts = {t for t in requested if t <= available}
    if max(requested) > available:
        counts.add(available)
    return tuple(sorted(counts))


@dataclass(frozen=True)
class Machine:
    gpus: tuple[int, ...]             # CUDA device indices profiled
    cpus: tuple[int, ...]             # logical CPUs, in binding order
    threads: tuple[int, ...]          # CPU thread counts to measure
    hardware: Hardware

    @property
    def gpu_name(self) -> str:
        return self.hardware.gpu_name


def probe_machine(opts: Options) -> Machine:
    gpus: tuple[int, ...] = ()
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        gpus = tuple(range(n if opts.max_gpus is None else min(n, opts.max_gpus)))
    cpus = cpus_in_binding_order(allowed_cores())
    info = _cpuinfo()
    model = next((e["model name"] for e in info if e.get("model name")), "") or platform.processor() or "unknown"
    sockets = len({e["physical id"] for e in info if "physical id" in e}) or 1
    hardware = Hardware(
        gpu_name=torch.cuda.get_device_name(gpus[0]) if gpus else "none",
        gpu_count=len(gpus),
        gpu_memory_bytes=torch.cuda.get_device_properties(gpus[0]).total_memory if gpus else 0,
        cpu_model=model, cpu_sockets=sockets,
        cpu_cores=physical_cores(),
        host_memory_bytes=psutil.virtual_memory().total,
        torch_version=torch.__version__)
    return Machine(gpus, tuple(cpus), thread_counts(opts.threads, len(cpus)), hardware)


def _bind(cpus: Sequence[int]) -> bool:
    """Binds every thread of this process to `cpus`; False where the OS offers no way.

    Every thread, not only the main one: OpenMP's workers, created earlier, keep the mask
    they were born with, and Linux applies sched_setaffinity(pid) to the main thread alone.
    """
    if hasattr(os, "sched_setaffinity"):
        for t in psutil.Process().threads():
            with contextlib.suppress(OSError):        # a thread may end meanwhile
                os.sched_setaffinity(t.id, cpus)
        return True
    try:
        psutil.Process().cpu_affinity(list(cpus))
        return True
    except (AttributeError, OSError, psutil.Error):
        return False


@contextlib.contextmanager
def pinned_threads(cpus: Sequence[int]) -> Iterator[bool]:
    """torch computes with len(cpus) threads bound to `cpus`; both restored afterwards.
    Yields whether the binding took effect."""
    old_threads, old_mask = torch.get_num_threads(), allowed_cores()
    bound = _bind(cpus)
    torch.set_num_threads(len(cpus))
    try:
        yield bound
    finally:
        torch.set_num_threads(old_threads)
        if bound:
            _bind(old_mask)


# --------------------------------------------------------------------------- blocks


class TimedBlock:
    """A block module of the executor (`aptmoe.exec.model`) with what timing needs: its
    parameters, a fresh random input that needs a gradient (so that the backward computes
    input and weight gradients, as in a pipeline stage) and a forward with one output."""

    module: torch.nn.Module

    def __init__(self, module: torch.nn.Module, d: int, dtype: torch.dtype, device: torch.device) -> None:
        self.module, self.d, self.dtype, self.device = module, d, dtype, device
        self.params = list(module.parameters())

    def inputs(self, tokens: int) -> torch.Tensor:
        return torch.randn(tokens, self.d, dtype=self.dtype, device=self.device, requires_grad=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)


class ExpertBlock(TimedBlock):
    """`aptmoe.exec.model.ExpertBlock`: relu(x W1^T) W2^T, W1 [h, d], W2 [d, h]. Timed as the
    executor runs an expert, outside autograd (`expert_samplers`)."""

    def __init__(self, d: int, h: int, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__(exec_model.ExpertBlock(d, h, device=device, dtype=dtype), d, dtype, device)
        self.h = h

    def weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.module.w1.detach(), self.module.w2.detach()

    def grads(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Its gradient buffers, allocated (zeros) at first use."""
        m = self.module
        if m.w1.grad is None:
            m.w1.grad, m.w2.grad = (as_executor_host(torch.zeros_like(m.w1)), as_executor_host(torch.zeros_like(m.w2)))
        return m.w1.grad, m.w2.grad


class GateBlock(TimedBlock):
    """`aptmoe.exec.model.GateBlock`: softmax(x Wg^T) and its top-k (k = 1, the seed's
    simulated gate); the timed output is the gate weights."""

    def __init__(self, d: int, experts: int, dtype: torch.dtype, device: torch.device, top_k: int = 1) -> None:
        super().__init__(exec_model.GateBlock(d, experts, top_k, device=device, dtype=dtype), d, dtype, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)[1]


class AttentionBlock(TimedBlock):
    """`aptmoe.exec.model.AttentionBlock`: LayerNorm, Q/K/V projections, causal
    softmax(Q K^T / sqrt(dh)) V per head (torch's fused scaled_dot_product_attention),
    output projection, residual, LayerNorm. Tokens are whole sequences; the timed output
    is the MoE input LN2(r)."""

    def __init__(self, d: int, heads: int, seq_length: int, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__(exec_model.AttentionBlock(d, heads, device=device, dtype=dtype), d, dtype, device)
        self.heads, self.seq_length = heads, seq_length

    def inputs(self, tokens: int) -> torch.Tensor:
        return torch.randn(tokens // self.seq_length, self.seq_length, self.d, dtype=self.dtype,
                           device=self.device, requires_grad=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)[1]


Sampler = Callable[[Callable[[], object], Callable[[], object]], Callable[[], float]]


def block_samplers(block: TimedBlock, tokens: int, sampler: Sampler) -> dict[str, Callable[[], float]]:
    """A sample per direction. fwd: the block over fresh inputs with autograd recording, as
    in training. bwd: out.backward(random grad) after an untimed forward (input and weight
    gradients, set to None first so that no accumulation is timed)."""
    state: dict[str, torch.Tensor] = {}

    def setup_fwd() -> None:
        state.clear()
        state["x"] = block.inputs(tokens)

    def fwd() -> None:
        state["y"] = block.forward(state["x"])

    def setup_bwd() -> None:
        state.clear()
        for p in block.params:
            p.grad = None
        y = block.forward(block.inputs(tokens))
        state["y"], state["g"] = y, torch.randn_like(y)

    def bwd() -> None:
        state["y"].backward(state["g"])

    return {"fwd": sampler(fwd, setup_fwd), "bwd": sampler(bwd, setup_bwd)}


def monotone(seconds: Sequence[float]) -> tuple[tuple[float, ...], list[float]]:
    """Non-decreasing seconds (the schema requires it) by pool-adjacent-violators, rounded;
    and each point's relative change, for the record.

    Isotonic least squares rather than a running maximum: in the launch-bound flat part of
    a GPU curve the medians scatter by a few percent around one value, and the running
    maximum would lift the whole part to its highest sample; pooling takes their mean.
    """
    raw = [max(s, 1e-9) for s in seconds]
    smooth = [round_sig(float(v)) for v in pava(raw)]
    return tuple(smooth), [abs(v / r - 1) for v, r in zip(smooth, raw)]


def round_sig(x: float, digits: int = SIG_DIGITS) -> float:
    return float(f"{x:.{digits - 1}e}")        # monotone: a sorted list stays sorted


# --------------------------------------------------------------------------- measurements


@dataclass
class Measured:
    """Everything measured so far; the tasks fill it, `build_profile` reads it."""

    copies: dict[tuple[str, str, int], list[tuple[int, float]]] = field(default_factory=dict)
    root: dict[str, dict[int, float]] = field(default_factory=lambda: {"h2d": {}, "d2h": {}})
    duplex: tuple[float, float] | None = None
    p2p: list[tuple[int, float]] = field(default_factory=list)
    gpu: list[GpuCurve] = field(default_factory=list)
    cpu: list[CpuCurve] = field(default_factory=list)
    moved: dict[str, list[float]] = field(default_factory=lambda: {"gpu": [], "cpu": []})   # by `monotone`
    cpu_cut: list[str] = field(default_factory=list)       # series stopped by the point limit
    cpu_bound: bool = True
    cpu_ranks: dict[int, int] = field(default_factory=dict)  # threads -> ranks at once, on their CPU workers
    adam_cpu: dict[int, float] = field(default_factory=dict)
    adam_cpu_impl: str = ""
    adam_gpu: float | None = None
    adam_gpu_impl: str = ""
    adam_shared: dict[int, float] = field(default_factory=dict)
    adam_shared_ranks: int | None = None
    adam_cpu_call: dict[int, float] = field(default_factory=dict)
    dispatch: Dispatch | None = None
    host_memory: dict[int, HostMemoryResult] = field(default_factory=dict)
    issue_tolls: IssueTolls | None = None
    issue_tolls_notes: list[str] = field(default_factory=list)
    pacer_late: float | None = None
    pacer_device: str = "cpu"                # where the pacer's copies went
    cpu_job: CpuJob | None = None
    cpu_job_refused: str = ""                # why the CPU-job probe measured nothing (too few jobs)
    recv_wait: dict[tuple[str, int], float] = field(default_factory=dict)   # (kind, d) -> beside / alone (p2p part)
    recv_backend: str = ""
    policy_host: PolicyHost | None = None


def _keep_p2p(m: Measured, backend: str, measured: P2P) -> None:
    m.p2p, m.recv_wait, m.recv_backend = measured.points, measured.recv_slowdown, backend


def _random_bytes(n: int, device: torch.device | str = "cpu", pinned: bool = False) -> torch.Tensor:
    """n random (never zero-filled) bytes; a random 16 MiB chunk tiled, which is fast."""
    buf = torch.empty(n, dtype=torch.uint8, device=device, pin_memory=pinned)
    chunk = min(n, 16 * MiB)
    pattern = torch.randint(1, 256, (chunk,), dtype=torch.uint8, device=device)
    full = n // chunk * chunk
    buf[:full].view(-1, chunk).copy_(pattern)
    buf[full:].copy_(pattern[: n - full])
    return buf


def measure_copies(gpu: int, sizes: Sequence[int], reps: Reps, m: Measured) -> None:
    """One GPU alone: h2d and d2h, pinned and pageable, every size."""
    dev = torch.device("cuda", gpu)
    stream = torch.cuda.Stream(dev)
    n = max(sizes)
    device_buf = _random_bytes(n, dev)
    for memory in ("pinned", "pageable"):
        host = _random_bytes(n, pinned=memory == "pinned")
        for direction in ("h2d", "d2h"):
            pts = []
            for size in sizes:
                src, dst = (host[:size], device_buf[:size]) if direction == "h2d" else (device_buf[:size], host[:size])
                if memory == "pinned":
                    sample = cuda_sample(lambda: dst.copy_(src, non_blocking=True), stream)
                else:
                    def work(src=src, dst=dst) -> None:
                        dst.copy_(src)                      # what .to() does with pageable memory
                        torch.cuda.synchronize(dev)
                    sample = host_sample(work)
                pts.append((size, median_of(sample, reps)))
            m.copies[(direction, memory, gpu)] = pts
        del host


def measure_root(gpus: Sequence[int], nbytes: int, copies: int, reps: Reps, m: Measured) -> None:
    """Aggregate pinned bandwidth with `gpus` copying at once, each direction."""
    devs = [torch.device("cuda", g) for g in gpus]
    hosts = [_random_bytes(nbytes, pinned=True) for _ in gpus]
    bufs = [_random_bytes(nbytes, d) for d in devs]
    streams = [torch.cuda.Stream(d) for d in devs]
    for direction in ("h2d", "d2h"):
        def window() -> float:
            starts, ends = [0.0] * len(gpus), [0.0] * len(gpus)
            barrier = threading.Barrier(len(gpus))
            errors: list[BaseException] = []

            def worker(i: int) -> None:
                try:
                    src, dst = (hosts[i], bufs[i]) if direction == "h2d" else (bufs[i], hosts[i])
                    with torch.cuda.device(devs[i]), torch.cuda.stream(streams[i]):
                        barrier.wait()
                        starts[i] = time.perf_counter()
                        for _ in range(copies):
                            dst.copy_(src, non_blocking=True)
                        streams[i].synchronize()
                        ends[i] = time.perf_counter()
                except BaseException as e:          # re-raised in the main thread
                    barrier.abort()
                    errors.append(e)

            threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(gpus))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            if errors:
                raise errors[0]
            return max(ends) - min(starts)

        seconds = median_of(window, reps)
        m.root[direction][len(gpus)] = len(gpus) * copies * nbytes / seconds / 1e9


def measure_duplex(gpu: int, nbytes: int, copies: int, reps: Reps, m: Measured) -> None:
    """Per-direction GB/s of one GPU with both directions busy, released by one event."""
    dev = torch.device("cuda", gpu)
    host_src, host_dst = _random_bytes(nbytes, pinned=True), _random_bytes(nbytes, pinned=True)
    dev_src, dev_dst = _random_bytes(nbytes, dev), _random_bytes(nbytes, dev)
    gate, up, down = (torch.cuda.Stream(dev) for _ in range(3))

    def sample() -> tuple[float, float]:
        go = torch.cuda.Event(enable_timing=True)
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
        hold_stream(gate, 2e-3)           # both streams queue their copies behind one release
        go.record(gate)
        for stream, (src, dst), end in zip((up, down), ((host_src, dev_dst), (dev_src, host_dst)), ends):
            with torch.cuda.stream(stream):
                stream.wait_event(go)
                for _ in range(copies):
                    dst.copy_(src, non_blocking=True)
                end.record(stream)
        torch.cuda.synchronize(dev)
        return tuple(copies * nbytes / (go.elapsed_time(e) / 1e3) / 1e9 for e in ends)

    h2d, d2h = medians(samples(sample, reps))
    m.duplex = (h2d, d2h)


def _series(block: TimedBlock, tokens: Sequence[int], sampler: Sampler, reps: Reps,
            limit_s: float | None = None, samplers=None) -> tuple[list[int], dict[str, list[float]], bool]:
    """Medians of fwd and bwd (or whatever the samplers name) at each token count; with
    `limit_s`, stops after the first point whose fwd + bwd exceed it (returns whether it stopped
    early). `samplers`: `block_samplers` (autograd, as a GPU block runs) unless given."""
    done: list[int] = []
    out: dict[str, list[float]] = {}
    for n in tokens:
        for direction, sample in (samplers or block_samplers)(block, n, sampler).items():
            out.setdefault(direction, []).append(median_of(sample, reps))
        done.append(n)
        if limit_s is not None and out["fwd"][-1] + out["bwd"][-1] > limit_s and n != tokens[-1]:
            return done, out, True
    return done, out, False


def measure_gpu_block(kind: str, size: str, dtype: str, opts: Options, sizes: Sizes, gpu: int | None,
                      m: Measured, experts: int | None = None, cpus: Sequence[int] = ()) -> None:
    """A block's curves on GPU `gpu`, or, with gpu None, on the CPU cores `cpus` (where an
    executor's CPU ranks run their "GPU" blocks)."""
    dev = torch.device("cuda", gpu) if gpu is not None else torch.device("cpu")
    d, h = model_dims(size)
    tdtype = TORCH_DTYPES[dtype]
    dims: dict[str, int | None] = dict(d=d, h=None, heads=None, seq_length=None, experts=None)
    if kind == "e":
        block: TimedBlock = ExpertBlock(d, h, tdtype, dev)
        # the dense grid on a GPU only: on CPU cores (CPU ranks' blocks) a point costs seconds
        dims["h"], tokens = h, (sizes.expert_tokens or sizes.gpu_tokens) if gpu is not None else sizes.gpu_tokens
    elif kind == "g":
        block = GateBlock(d, experts or 8, tdtype, dev)
        dims["experts"], tokens = experts, sizes.gpu_tokens
    else:
        block = AttentionBlock(d, opts.heads, opts.seq_length, tdtype, dev)
        dims.update(heads=opts.heads, seq_length=opts.seq_length)
        tokens = tuple(q * opts.seq_length for q in sizes.attn_sequences)
    samplers = expert_samplers if kind == "e" else block_samplers
    if gpu is None:
        with pinned_threads(cpus) as bound:
            done, secs, _ = _series(block, tokens, host_sample, sizes.gpu_reps, samplers=samplers)
        m.cpu_bound &= bound
    else:
        stream = torch.cuda.current_stream(dev)
        with torch.cuda.device(dev):
            done, secs, _ = _series(block, tokens, lambda w, s: cuda_sample(w, stream, s, hold_s=GPU_HOLD_S),
                                    sizes.gpu_reps, samplers=samplers)
    for direction, raw in secs.items():
        values, moved = monotone(raw)
        m.moved["gpu"] += moved
        # a staircase where the points are denser than the GEMM's row tiles (expert blocks on a GPU)
        dense = kind == "e" and gpu is not None and sizes.expert_tokens != sizes.gpu_tokens
        step_to = EXPERT_DENSE_TO if dense else None
        m.gpu.append(GpuCurve(kind=kind, **dims, dtype=dtype, direction=direction,
                              tokens=tuple(done), seconds=values, step_to=step_to and min(step_to, done[-1])))


def measure_gpu_glue(size: str, dtype: str, sizes: Sizes, gpu: int, m: Measured, experts: int) -> None:
    """A layer's GPU work between its blocks with `experts` experts (calibration/glue.py)."""
    from aptmoe.calibration.glue import glue_curves
    d, _ = model_dims(size)
    for direction, values in glue_curves(d, experts, TORCH_DTYPES[dtype], gpu, sizes.gpu_tokens,
                                         sizes.gpu_reps).items():
        m.gpu.append(GpuCurve(kind="c", d=d, h=None, heads=None, seq_length=None, experts=experts, dtype=dtype,
                              direction=direction, tokens=tuple(sizes.gpu_tokens), seconds=values))


def measure_gpu_ends(size: str, dtype: str, sizes: Sizes, gpu: int, m: Measured) -> None:
    """The step's ends, the loss and the token embedding, at `size`'s width and the models'
    vocabulary (kinds l and m; calibration/glue.py)."""
    from aptmoe.calibration.glue import ends_curves
    d, _ = model_dims(size)
    for (kind, direction), values in ends_curves(d, VOCAB_SIZE, TORCH_DTYPES[dtype], gpu, sizes.gpu_tokens,
                                                 sizes.gpu_reps).items():
        m.gpu.append(GpuCurve(kind=kind, d=d, h=None, heads=None, seq_length=None, experts=None, dtype=dtype,
                              direction=direction, tokens=tuple(sizes.gpu_tokens), seconds=values, vocab=VOCAB_SIZE))


COLD_POOL_BYTES = 1 << 30     # more weights than any CPU cache holds

PINNED_TEXT = "host tensors pinned as the executor's are where a GPU is present"


class ExpertPool(TimedBlock):
    """Several CPU experts used in turn, a new one for every sample, so that each sample
    reads its weights from memory as a pipeline does (its CPU experts are different
    experts, or the same one after whole stages of other work). Timing one expert again
    and again measured its weights from the last-level cache: on the 4xH200 host 0.19 ms
    for a token of an MoE-S expert (33.5 MB, which would be 176 GB/s from one rank's cores),
    against 5-10 ms in the executor's trace."""

    def __init__(self, d: int, h: int, dtype: torch.dtype, device: torch.device,
                 pool_bytes: int = COLD_POOL_BYTES) -> None:
        one = 2 * d * h * torch.finfo(dtype).bits // 8
        n = max(2, -(-pool_bytes // one))
        self.blocks = [ExpertBlock(d, h, dtype, device) for _ in range(n)]
        for b in self.blocks:
            for p in b.params:
                p.data = as_executor_host(p.data)
            # The gradient buffers now, not at each expert's first backward: allocating and
            # pinning them there put the cost of a fresh 32-470 MB pinned buffer into the first
            # timed backwards of a pool. On the one-GPU H200 (session 10) that made the first
            # thread count's small-token backward 10.3 ms (MoE-S, 1-128 tokens after pooling)
            # against 1.1 ms at the next, which found the buffers made. The executor's are made
            # once, before its first step.
            b.grads()
        self.d, self.h, self.dtype, self.device = d, h, dtype, device
        self.params = [p for b in self.blocks for p in b.params]
        self.at = 0
        self._states: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._states_tokens = -1

    def inputs(self, tokens: int) -> torch.Tensor:
        self.at = (self.at + 1) % len(self.blocks)      # every sample's setup moves to the next expert
        return self.blocks[self.at].inputs(tokens)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks[self.at].forward(x)

    def weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.blocks[self.at].weights()

    def grads(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.blocks[self.at].grads()

    def backward_state(self, tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Moves to the next expert and gives what its backward on `tokens` tokens needs: (its
        input, its kept pre-activation, the output's gradient), from a forward that ran a
        whole pool of experts ago. In a step an expert's backward comes long after its
        forward, with other experts, activations and Adam between them, so its weights come
        from memory; timed right after an untimed forward of the same expert, its weights
        came from the last-level cache (300 MiB on the H200 host; an MoE-M expert is 128 MiB)."""
        if self._states_tokens != tokens:
            self._states = []                              # free the last count's first
            for i, b in enumerate(self.blocks):
                x = b.inputs(tokens).detach()
                out, hidden = exec_model.expert_forward(x, *b.weights(), keep=True)
                self._states.append((x, hidden, torch.randn_like(out)))
            self._states_tokens, self.at = tokens, len(self.blocks) - 1
        self.at = (self.at + 1) % len(self.blocks)
        return self._states[self.at]


def expert_samplers(pool, tokens: int, sampler: Sampler, *, warm_backward: bool = False
                    ) -> dict[str, Callable[[], float]]:
    """A sample per direction, as the executor runs an expert on either device
    (`expert_forward` and `expert_backward` of aptmoe.exec.model): fwd keeps the
    pre-activation for a backward; bwd adds its weight gradients into the expert's gradient
    buffer (a later micro-batch's case: the first one writes instead, moving a third fewer
    bytes). `pool`: an ExpertBlock or an ExpertPool. A pool's bwd takes the next expert,
    whose forward ran a pool ago (`ExpertPool.backward_state`), unless `warm_backward`: then
    an untimed forward of the same expert just before, as the calibration did until
    2026-11-30 (calibration/cpu_expert_sweep.py puts the two side by side)."""
    state: dict[str, object] = {}
    cold = isinstance(pool, ExpertPool) and not warm_backward

    def setup_fwd() -> None:
        state.clear()
        state["x"] = pool.inputs(tokens).detach()

    def fwd() -> None:
        state["y"] = exec_model.expert_forward(state["x"], *pool.weights(), keep=True)

    def setup_bwd() -> None:
        state.clear()
        if cold:
            x, hidden, g = pool.backward_state(tokens)
            state.update(x=x, h=hidden, g=g)
            return
        x = pool.inputs(tokens).detach()
        out, hidden = exec_model.expert_forward(x, *pool.weights(), keep=True)
        state.update(x=x, h=hidden, g=torch.randn_like(out))

    def bwd() -> None:
        exec_model.expert_backward(state["x"], state["h"], state["g"], *pool.weights(), *pool.grads(),
                                       first=False)

    return {"fwd": sampler(fwd, setup_fwd), "bwd": sampler(bwd, setup_bwd)}


class _BlockCache:
    """Keeps the last CPU expert pool, so that its weights are drawn once for all thread counts."""

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.block: ExpertPool | None = None

    def get(self, size: str, dtype: str) -> ExpertPool:
        if self.key != (size, dtype):
            self.block = None                          # free the old weights first
            d, h = model_dims(size)
            self.block, self.key = ExpertPool(d, h, TORCH_DTYPES[dtype], torch.device("cpu")), (size, dtype)
        return self.block

    def clear(self) -> None:
        self.key = self.block = None


def measure_cpu_expert(size: str, dtype: str, threads: int, machine: Machine, sizes: Sizes,
                       cache: _BlockCache, m: Measured) -> None:
    """A CPU expert's curves at `threads`: on a machine with GPUs as its ranks run them, on each
    rank's CPU worker, every rank at once (calibration/cpu_ranks.py), where a rank's share of
    the cores holds `threads`; otherwise on this process's main thread, bound to the first
    `threads` cores."""
    ranks, allowed = len(machine.gpus), allowed_cores()
    if ranks and threads <= len(allowed) // ranks:
        done, secs, cut = cpu_ranks.at_once(size, dtype, threads, ranks, allowed, sizes.cpu_tokens, sizes.cpu_reps,
                                            sizes.cpu_point_limit_s, sizes.cpu_rounds, COLD_POOL_BYTES)
        m.cpu_ranks[threads] = ranks
    else:
        block = cache.get(size, dtype)
        with pinned_threads(machine.cpus[:threads]) as bound:
            done, secs, cut = _series(block, sizes.cpu_tokens, host_sample, sizes.cpu_reps,
                                      sizes.cpu_point_limit_s, samplers=expert_samplers)
        m.cpu_bound &= bound
    if cut:
        m.cpu_cut.append(f"{size} {dtype} {threads}t: {done[-1]}")
    d, h = model_dims(size)
    for direction, raw in secs.items():
        values, moved = monotone(raw)
        m.moved["cpu"] += moved
        m.cpu.append(CpuCurve(d=d, h=h, dtype=dtype, direction=direction, threads=threads,
                              tokens=tuple(done), seconds=values))


def _adam(params: list[torch.Tensor]) -> tuple[Callable[[], None], str]:
    """One step over `params` as the executor takes it (aptmoe.exec.block_adam: torch's fused
    kernel, one call per tensor, where this torch has it for the device), and its name. One
    step is taken here, so that a kernel this torch lacks fails now, not while timing."""
    adam = BlockAdam(params, lr=1e-4)
    grads = [p.grad for p in params]

    def step() -> None:
        adam.begin_step()
        for i, g in enumerate(grads):
            adam.step_chunk(i, g)

    step()
    return step, "fused" if adam.fused or all(o.defaults.get("fused") for o in adam.opts) else "for-loop"


def _adam_params(total: int, tensors: int, device: torch.device) -> list[torch.Tensor]:
    params = [as_executor_host(torch.randn(total // tensors, device=device)).requires_grad_() for _ in range(tensors)]
    for p in params:
        p.grad = as_executor_host(torch.randn_like(p))
    return params


ADAM_CALL_PARAMS = 4096        # a tensor whose update is all call overhead
ADAM_CALLS = 200               # calls per timed batch (one call is tens of microseconds)
ADAM_TRIES = 3                 # timings of a block's call and a small call, until the block's is the longer


class MeasurementError(ValueError):
    """A part whose timing came out impossible (a busy machine): one line, no file written."""


def _adam_pool(sizes: Sizes) -> tuple[Callable[[], None], int]:
    """One Adam call on the next of `adam_tensors` blocks of `adam_params / adam_tensors`
    parameters, each with its own optimizer (calibration/host_memory.py `adam_stream`): the
    executor's CPU worker makes one call per 4 M-parameter chunk of a block, and the next
    chunk's state is cold. Stepped instead as one optimizer over 16 tensors back to back, the
    H200 gave 0.229 ns/param at 14 threads, where the executor's chunks took 0.284-0.305 and
    this layout 0.280-0.287 (docs/validation-h200-v4)."""
    return adam_stream(as_executor_host, sizes.adam_params // sizes.adam_tensors, sizes.adam_tensors)


def _adam_call_reps(sizes: Sizes) -> Reps:
    """Every block of the pool at least once untimed, then up to four calls on each."""
    r = sizes.adam_reps
    return Reps(sizes.adam_tensors, 4 * sizes.adam_tensors, sizes.adam_tensors, r.budget_s)


def measure_adam_cpu(threads: int, machine: Machine, sizes: Sizes, m: Measured) -> None:
    """The fixed cost of one step() call, and per parameter beyond it, one call at a time on
    the next block of a pool (`_adam_pool`), as the executor updates."""
    with pinned_threads(machine.cpus[:threads]) as bound:
        # a chunk's call, as the CPU worker makes it (the step counter moves once per block)
        small = BlockAdam(_adam_params(ADAM_CALL_PARAMS, 1, torch.device("cpu")), lr=1e-4)
        grad = small.chunks[0].grad
        small.begin_step()

        def batch() -> float:
            t = time.perf_counter()
            for _ in range(ADAM_CALLS):
                small.step_chunk(0, grad)
            return (time.perf_counter() - t) / ADAM_CALLS

        batch()
        step, params = _adam_pool(sizes)
        # A CPU busy with other work can stretch the small calls past a block's (seen with the
        # test suite beside a calibration on a 2-core machine): no time per parameter is left,
        # and a rate of 0 s would make the update free. Timed again, then refused.
        for _ in range(ADAM_TRIES):
            call = statistics.median(batch() for _ in range(5))
            seconds = median_of(host_sample(step), _adam_call_reps(sizes))
            if seconds > call:
                break
        else:
            raise MeasurementError(
                f"CPU Adam at {threads} threads: a call on {params:,} parameters took {seconds * 1e6:.0f} us, "
                f"no longer than a {ADAM_CALL_PARAMS}-parameter call ({call * 1e6:.0f} us), {ADAM_TRIES} times: "
                "the CPU was too busy to time it; run again with the machine otherwise idle")
        del step
    m.cpu_bound &= bound
    m.adam_cpu[threads] = (seconds - call) / params
    m.adam_cpu_call[threads] = call
    m.adam_cpu_impl = "fused" if FUSED_CPU else "for-loop"


def _adam_shared_child(cpus: list[int], sizes: Sizes, barrier, results) -> None:
    """One rank of the shared measurement: Adam on its own cores, started with the others;
    seconds per call and the parameters a call updates."""
    with pinned_threads(cpus):
        step, params = _adam_pool(sizes)
        barrier.wait()
        results.put((median_of(host_sample(step), _adam_call_reps(sizes)), params))


def measure_adam_cpu_shared(threads: int, ranks: int, machine: Machine, sizes: Sizes, m: Measured) -> None:
    """Adam with `ranks` processes updating at once, each on its own `threads` cores, as the
    ranks of one host do at the end of a step. Alone, one rank's update runs at the rate its
    cores allow; together they share the host's memory bandwidth (Adam reads and writes
    about 28 bytes per parameter): on the 4xH200 host the executor's ranks updated at
    0.76-1.4 ns per parameter where one rank alone was measured at 0.25."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(ranks), ctx.Queue()
    cpus = list(machine.cpus)
    procs = [ctx.Process(target=_adam_shared_child, daemon=True,
                         args=(cpus[r * threads:(r + 1) * threads], sizes, barrier, results)) for r in range(ranks)]
    for p in procs:
        p.start()
    try:
        seconds = [results.get(timeout=600) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()
    per_call = statistics.median(s for s, _ in seconds)
    # less the fixed cost of the call, as alone (the nearest thread count measured; the
    # simulator adds it back per chunk)
    calls = m.adam_cpu_call
    call = calls[nearest_count(calls, threads)] if calls else 0.0
    m.adam_shared[threads] = max(per_call - call, 0.0) / seconds[0][1]
    m.adam_shared_ranks = ranks


def measure_host_memory_bound(threads: int, machine: Machine, gpu: int, m: Measured) -> None:
    """This rank on the first `threads` cores; with two GPUs or more, each other rank's Adam on
    the next `threads` (as `measure_adam_cpu_shared` binds them), where they fit."""
    cpus = list(machine.cpus)
    ranks = len(machine.gpus) if len(machine.gpus) >= 2 and len(machine.gpus) * threads <= len(cpus) else 1
    others = [cpus[r * threads:(r + 1) * threads] for r in range(1, ranks)]
    with pinned_threads(cpus[:threads]) as bound:
        m.host_memory[threads] = measure_host_memory(threads, gpu, cpus[threads:], others,
                                                     cpus[ranks * threads:] or None)
    m.cpu_bound &= bound


def adam_shared_ranks(machine: Machine) -> int:
    """How many ranks update at once on this host: one per GPU, or the executor's two CPU
    ranks where there is at most one GPU."""
    return len(machine.gpus) if len(machine.gpus) >= 2 else 2


def measure_adam_gpu(gpu: int | None, sizes: Sizes, m: Measured, cpus: Sequence[int] = ()) -> None:
    """Adam on GPU `gpu`, or, with gpu None, on the CPU cores `cpus` (GPipe's update on CPU ranks).

    One tensor, one call: GPipe's executor steps each block's buffer with one fused call, and
    its blocks hold tens of millions of parameters (an MoE-M expert 34 M). Timed over 16
    tensors of 4 M, the H200 gave 11.75 ps per parameter, and GPipe's update on MoE-M and -L
    then ran at 7.4-8.1 ps (the update +45..+63% over-predicted, docs/validation-h200-v3)."""
    if gpu is None:
        with pinned_threads(cpus):
            step, impl = _adam(_adam_params(sizes.adam_params, 1, torch.device("cpu")))
            seconds = median_of(host_sample(step), sizes.adam_reps)
    else:
        dev = torch.device("cuda", gpu)
        with torch.cuda.device(dev):
            step, impl = _adam(_adam_params(sizes.adam_params, 1, dev))
            seconds = median_of(cuda_sample(step, torch.cuda.current_stream(dev)), sizes.adam_reps)
    m.adam_gpu, m.adam_gpu_impl = seconds / sizes.adam_params, impl


# --------------------------------------------------------------------------- the plan of work


@dataclass(frozen=True)
class Task:
    label: str
    run: Callable[[], None]

    @property
    def part(self) -> str:
        return self.label.split()[0]


def root_counts(gpus: int) -> list[int]:
    """1, 2, 4, ... GPUs copying at once, and all of them."""
    return sorted({n for n in _powers(1, gpus)} | {gpus}) if gpus else []


def skipped_parts(opts: Options, machine: Machine) -> list[Skipped]:
    """What will not be measured, and why (written to the file and printed)."""
    out = []
    no_gpu = "no CUDA GPU"
    if "links" in opts.skip:
        out.append(Skipped("links", "--skip links: every link from the roofline preset"))
    elif not machine.gpus:
        for part in ("links.h2d", "links.d2h", "links.root_GBps", "links.duplex_GBps"):
            out.append(Skipped(part, f"{no_gpu}: roofline preset"))
    no_wait = "a posted receive costs the blocks beside it nothing"
    if "p2p" in opts.skip:
        out.append(Skipped("links.p2p.intra_node", "--skip p2p: roofline preset"))
        out.append(Skipped("recv_wait", f"--skip p2p: {no_wait}"))
    elif len(machine.gpus) < 2 and not (opts.blocks_on == "cpu" and len(machine.cpus) >= 2):
        why = no_gpu if not machine.gpus else "one GPU: no GPU-to-GPU send to time"
        out.append(Skipped("links.p2p.intra_node", f"{why}: roofline preset"))
        out.append(Skipped("recv_wait", f"{why}: {no_wait}"))
    out.append(Skipped("links.p2p.inter_node", "one host: inter-node links cannot be measured here; roofline preset"))
    if "gpu" in opts.skip or (not machine.gpus and opts.blocks_on != "cpu"):
        why = "--skip gpu" if "gpu" in opts.skip else no_gpu
        out.append(Skipped("gpu", f"{why}: no GPU block curves; ProfileCost uses the roofline for every GPU block"))
    if "cpu" in opts.skip:
        out.append(Skipped("cpu_expert", "--skip cpu: no CPU expert curves; ProfileCost uses the roofline"))
    if "dispatch" in opts.skip:
        out.append(Skipped("dispatch", "--skip dispatch: blocks take their kernel time alone"))
    elif not machine.gpus and opts.blocks_on != "cpu":
        out.append(Skipped("dispatch", f"{no_gpu}: blocks take their kernel time alone"))
    if "memory" in opts.skip:
        out.append(Skipped("host_memory", "--skip memory: CPU work never waits for the links' copies"))
    elif not machine.gpus:
        out.append(Skipped("host_memory", f"{no_gpu}: no copy engine to share host memory with; CPU work "
                                          "never waits for the links' copies"))
    if "pacer" in opts.skip:
        out.append(Skipped("pacer", "--skip pacer: a capped copy lands exactly when its bytes have passed over the cap"))
    if "policy" in opts.skip:
        out.append(Skipped("policy_host", "--skip policy: the loading policy's answers cost the issuing thread nothing"))
    if "tolls" in opts.skip:
        out.append(Skipped("issue_tolls", "--skip tolls: the issuing thread is as fast beside copies and CPU "
                                          "jobs as alone"))
    elif not machine.gpus or opts.blocks_on == "cpu":
        out.append(Skipped("issue_tolls", f"{no_gpu if not machine.gpus else '--blocks-on cpu'}: no GPU rank "
                                          "whose issuing thread to time"))
    if "cpujob" in opts.skip:
        out.append(Skipped("cpu_job", "--skip cpujob: a CPU job takes its copies and its experts only"))
    elif not machine.gpus or opts.blocks_on == "cpu":
        out.append(Skipped("cpu_job", f"{no_gpu if not machine.gpus else '--blocks-on cpu'}: no GPU rank whose "
                                      "CPU jobs to time"))
    if "adam" in opts.skip:
        out.append(Skipped("adam", "--skip adam: roofline Adam rates"))
    elif not machine.gpus and opts.blocks_on != "cpu":
        out.append(Skipped("adam.gpu", f"{no_gpu}: roofline GPU Adam rate"))
    return out


def block_cpus(opts: Options, machine: Machine) -> list[int]:
    """Cores for blocks timed on the CPU: `--block-threads`, or half the cores (what each of
    the executor's two default CPU ranks is bound to)."""
    n = opts.block_threads or max(1, len(machine.cpus) // 2)
    return list(machine.cpus[:n])


def _measure_cpu_job(m: Measured) -> None:
    """The CPU-job probe, or why it could not time any: APTMoE's split decides on the machine's
    own speeds how many experts go to the CPU, and a machine that sends too few is listed
    under 'skipped' rather than failing the whole calibration."""
    try:
        m.cpu_job = measure_cpu_job()
    except ValueError as e:
        m.cpu_job_refused = str(e)


def dispatch_ranks_refused(opts: Options, machine: Machine) -> str | None:
    """Why `--dispatch-ranks` cannot run on this machine (more GPUs than it has), or None."""
    if (opts.dispatch_ranks is None or opts.blocks_on == "cpu" or "dispatch" in opts.skip
            or opts.dispatch_ranks <= len(machine.gpus)):
        return None
    g = len(machine.gpus)
    return f"--dispatch-ranks {opts.dispatch_ranks}: this machine has {g} GPU(s) to run the probe on; give at most {g}"


def plan_tasks(opts: Options, sizes: Sizes, machine: Machine, m: Measured) -> list[Task]:
    tasks: list[Task] = []
    gpus = machine.gpus
    add = lambda label, fn: tasks.append(Task(label, fn))     # noqa: E731
    if gpus and "links" not in opts.skip:
        for g in gpus:
            add(f"copies gpu{g}", lambda g=g: measure_copies(g, sizes.copy_bytes, sizes.link_reps, m))
        for n in root_counts(len(gpus)):
            add(f"root {n} GPUs", lambda n=n: measure_root(gpus[:n], sizes.root_bytes, sizes.root_copies,
                                                           sizes.link_reps, m))
        add("duplex", lambda: measure_duplex(gpus[0], sizes.root_bytes, sizes.root_copies, sizes.link_reps, m))
    if "p2p" not in opts.skip:
        # through the process group, as the executor sends activations: NCCL between the
        # first two GPUs; gloo between two CPU ranks, each on half the cores, as it binds them;
        # then the blocks of each model asked beside a waiting receive
        widths = [Width(d, h, opts.heads, opts.seq_length) for d, h in map(model_dims, opts.models)]
        if len(gpus) >= 2:
            add("p2p nccl gpu0<->gpu1", lambda: _keep_p2p(m, "nccl", measure_p2p_group(
                "nccl", sizes.copy_bytes, sizes.link_reps.reps, gpus=gpus[:2], widths=widths)))
        elif opts.blocks_on == "cpu" and len(machine.cpus) >= 2:
            half = len(machine.cpus) // 2
            add("p2p gloo", lambda: _keep_p2p(m, "gloo", measure_p2p_group(
                "gloo", P2P_CPU_BYTES, sizes.link_reps.reps, cpus=[machine.cpus[:half], machine.cpus[half:2 * half]],
                widths=widths)))
    if (gpus or opts.blocks_on == "cpu") and "gpu" not in opts.skip:
        on = None if opts.blocks_on == "cpu" else gpus[0]
        bcpus = block_cpus(opts, machine)
        for size in opts.models:
            for dtype in opts.dtypes:
                for kind in ("e", "a"):
                    add(f"gpu {kind} {size} {dtype}",
                        lambda k=kind, s=size, t=dtype: measure_gpu_block(k, s, t, opts, sizes, on, m, cpus=bcpus))
                for e in opts.gate_experts:
                    add(f"gpu g{e} {size} {dtype}",
                        lambda s=size, t=dtype, e=e: measure_gpu_block("g", s, t, opts, sizes, on, m, e, cpus=bcpus))
                    if on is not None:       # on CPU ranks the dispatch probe's host time holds it
                        add(f"gpu c{e} {size} {dtype}", lambda s=size, t=dtype, e=e: measure_gpu_glue(s, t, sizes, on, m, e))
                if on is not None:
                    add(f"gpu l m {size} {dtype}", lambda s=size, t=dtype: measure_gpu_ends(s, t, sizes, on, m))
    if "cpu" not in opts.skip:
        cache = _BlockCache()
        for size in opts.models:
            for dtype in opts.dtypes:
                for t in machine.threads:
                    add(f"cpu e {size} {dtype} {t}t",
                        lambda s=size, d=dtype, t=t: measure_cpu_expert(s, d, t, machine, sizes, cache, m))
        add("cpu free", cache.clear)
    if "adam" not in opts.skip:
        for t in machine.threads:
            add(f"adam cpu {t}t", lambda t=t: measure_adam_cpu(t, machine, sizes, m))
        ranks = adam_shared_ranks(machine)
        # the thread counts that fit `ranks` times, and the even split the executor binds to
        split = len(machine.cpus) // ranks
        for t in sorted({t for t in machine.threads if ranks * t <= len(machine.cpus)} | ({split} if split else set())):
            # bound now: a name read when the task runs would see a later assignment
            add(f"adam cpu {ranks}x{t}t", lambda t=t, r=ranks: measure_adam_cpu_shared(t, r, machine, sizes, m))
        if opts.blocks_on == "cpu":
            add("adam gpu (cpu)", lambda: measure_adam_gpu(None, sizes, m, block_cpus(opts, machine)))
        elif gpus:
            add("adam gpu", lambda: measure_adam_gpu(gpus[0], sizes, m))
    if "memory" not in opts.skip and gpus:
        for t in machine.threads:
            add(f"memory {t}t", lambda t=t: measure_host_memory_bound(t, machine, gpus[0], m))
    if "pacer" not in opts.skip:
        # to a GPU where there is one: the executor's waits end on the copy's CUDA event
        where = f"cuda:{gpus[0]}" if gpus and opts.blocks_on != "cpu" else "cpu"
        m.pacer_device = where
        add("pacer", lambda: setattr(m, "pacer_late", measure_pacer_late(device=where)))
    if "policy" not in opts.skip:
        # host work alone (numpy and Python on this thread): the same on CPU-only machines
        add("policy", lambda: setattr(m, "policy_host", _measure_policy_host(machine)))
    if "tolls" not in opts.skip and gpus and opts.blocks_on != "cpu":
        add("issue tolls", lambda: setattr(m, "issue_tolls", measure_issue_tolls(rounds=sizes.toll_rounds,
                                                                         say=m.issue_tolls_notes.append)))
    if "cpujob" not in opts.skip and gpus and opts.blocks_on != "cpu":
        add("cpu job", lambda: _measure_cpu_job(m))
    if "dispatch" not in opts.skip and (gpus or opts.blocks_on == "cpu"):
        # On CPU ranks: two of them, as the executor runs by default without a GPU. On GPUs one
        # by default; --dispatch-ranks: as many as the runs it stands for use (on four H200s the
        # runs' issuing threads timed their reference loop at 1.47x the one-GPU probe's,
        # docs/validation-h200-4gpu)
        device, probe_ranks = ("cpu", 2) if opts.blocks_on == "cpu" else ("cuda", 1)
        if (refused := dispatch_ranks_refused(opts, machine)) is not None:
            raise ValueError(refused)
        probe_ranks = opts.dispatch_ranks or probe_ranks
        add(f"dispatch {device}",
            lambda: setattr(m, "dispatch", measure_dispatch(device, probe_ranks, opts.dispatch_repeats)))
    return tasks


def _measure_policy_host(machine) -> PolicyHost:
    """The loading policies' calls timed on this host (aptmoe/policy_timing.py). Their splits
    weigh loads against CPU experts with the roofline preset's figures: what they decide moves
    their cost little, and the profile's own curves are not measured yet."""
    model = moe_model("S", POLICY_SHAPE.experts, num_layers=POLICY_SHAPE.layers)
    ph = measure_policy_host(AnalyticCost(model, roofline_preset(machine.gpu_name)[0]), POLICY_SHAPE)
    return PolicyHost({p: {c: round_sig(x) for c, x in calls.items()} for p, calls in ph.seconds.items()},
                      round_sig(ph.loop_s))


# --------------------------------------------------------------------------- the profile


def roofline_preset(gpu_name: str) -> tuple[AnalyticHardware, str]:
    """The analytic preset closest to this machine, and the name of its function."""
    if any(k in gpu_name.upper() for k in ("H200", "H100")):
        return h200_hardware(), "h200_hardware()"
    return a800_pcie_hardware(), "a800_pcie_hardware()"


def link_fit(points: list[tuple[int, float]]) -> tuple[LinkFit, str]:
    """latency + bytes / GBps by `reference.fit_link`; where that is unphysical (a negative
    latency from noisy small copies), the two-point line through the smallest and largest."""
    pts = tuple((b, round_sig(s)) for b, s in points)
    try:
        latency, GBps = fit_link(list(points))
        how = "least-squares fit (relative error, reference.fit_link)"
    except ValueError:
        (b0, t0), (b1, t1) = points[0], points[-1]
        per_byte = max((t1 - t0) / (b1 - b0), 1e-15)
        latency, GBps = max(t0 - b0 * per_byte, 0.0), 1 / per_byte / 1e9
        how = "two-point line through the smallest and largest copy (the least-squares fit was unphysical)"
    fit = LinkFit(round_sig(latency), round_sig(GBps), pts)
    errors = [abs(fit.spec().time_s(b) / s - 1) for b, s in points]
    worst = max(range(len(points)), key=errors.__getitem__)
    how += (f"; fit error max {errors[worst]:.0%} (at {_fmt_bytes(points[worst][0])}), "
            f"median {statistics.median(errors):.0%}")
    return fit, how


def _pooled(m: Measured, direction: str, memory: str) -> tuple[list[tuple[int, float]], dict[int, float]]:
    """Per size, the median over GPUs; and each GPU's GB/s at the largest size."""
    per_gpu = {g: pts for (d, mem, g), pts in m.copies.items() if (d, mem) == (direction, memory)}
    if not per_gpu:
        return [], {}
    sizes = [b for b, _ in next(iter(per_gpu.values()))]
    pooled = [(b, statistics.median(pts[i][1] for pts in per_gpu.values())) for i, b in enumerate(sizes)]
    largest = {g: pts[-1][0] / pts[-1][1] / 1e9 for g, pts in sorted(per_gpu.items())}
    return pooled, largest


def _fmt_bytes(n: int) -> str:
    return f"{n >> 30} GiB" if n >= 1 << 30 else f"{n >> 20} MiB" if n >= 1 << 20 else f"{n >> 10} KiB"


def _reps_text(r: Reps) -> str:
    return f"median of {r.min_reps}-{r.reps} repetitions after {r.warmup} warm-up"


@dataclass
class _Assembly:
    """The profile's parts as they are put together, with a source line for each."""

    sources: dict[str, str] = field(default_factory=dict)
    roof: dict[str, object] = field(default_factory=dict)   # measured overrides of the roofline preset


def _links(sizes: Sizes, machine: Machine, m: Measured, hw: AnalyticHardware,
           preset_fn: str, a: _Assembly) -> Links:
    fits: dict[str, LinkFit] = {}
    for direction in ("h2d", "d2h"):
        for memory in ("pinned", "pageable"):
            key = f"links.{direction}.{memory}"
            pooled, largest = _pooled(m, direction, memory)
            if pooled:
                fits[key], how = link_fit(pooled)
                clock = ("CUDA events on a side stream, non_blocking copy_" if memory == "pinned" else
                         "host clock around copy_ and a device synchronisation (the driver stages pageable "
                         "copies through its own buffer, partly on the host, so events would not bracket them)")
                per = ", ".join(f"{g}: {v:.1f}" for g, v in largest.items())
                a.sources[key] = (f"measured: {memory} host buffer <-> each GPU alone, sizes "
                                  f"{_fmt_bytes(sizes.copy_bytes[0])}..{_fmt_bytes(sizes.copy_bytes[-1])}, "
                                  f"{clock}, {_reps_text(sizes.link_reps)}; points = per-size median over "
                                  f"GPUs {list(machine.gpus)}; {how}; GB/s at the largest size by GPU: {per}")
            else:
                base = hw.h2d if direction == "h2d" else hw.d2h
                if memory == "pinned":
                    fits[key] = LinkFit(base.latency_s, base.GBps)
                    a.sources[key] = f"roofline: not measured; {preset_fn} {direction} ({base.GBps:g} GB/s)"
                else:
                    fits[key] = LinkFit(base.latency_s, min(ASSUMED_PAGEABLE_GBPS, base.GBps))
                    a.sources[key] = (f"assumption: not measured; pageable copies ~{ASSUMED_PAGEABLE_GBPS:g} GB/s "
                                      f"(DESIGN §2: 7-10 GB/s on the A800 and H200 hosts), latency of {preset_fn}")
    if m.root["h2d"]:
        root = {d: dict(m.root[d]) for d in ("h2d", "d2h")}
        a.sources["links.root_GBps"] = (
            f"measured: n GPUs copying pinned memory at once (GPUs 0..n-1; threads, one per GPU, each with its "
            f"own stream, released together by a barrier), {sizes.root_copies} copies of "
            f"{_fmt_bytes(sizes.root_bytes)} each; aggregate = all bytes / wall time from the first start to the "
            f"last end, {_reps_text(sizes.link_reps)}; assumption: these GPUs share one socket root (this host "
            f"has {machine.hardware.cpu_sockets} socket(s))")
        a.roof["root_GBps"] = round_sig(max(root["h2d"].values()))
    else:
        root = {d: {n: min(hw.root_GBps, n * fits[f"links.{d}.pinned"].GBps) for n in (1, 2, 4)}
                for d in ("h2d", "d2h")}
        a.sources["links.root_GBps"] = (f"roofline: not measured; {preset_fn} root_GBps {hw.root_GBps:g}, "
                                        f"at most n single links")
    if m.duplex is not None:
        duplex = m.duplex
        a.sources["links.duplex_GBps"] = (
            f"measured: GPU {machine.gpus[0]}, one stream per direction, both released by one event after a "
            f"device-side hold, {sizes.root_copies} pinned copies of {_fmt_bytes(sizes.root_bytes)} each way; "
            f"per direction bytes / time from the release to its last copy's end, {_reps_text(sizes.link_reps)}")
    else:
        duplex = (fits["links.h2d.pinned"].GBps, fits["links.d2h.pinned"].GBps)
        a.sources["links.duplex_GBps"] = "assumption: not measured; full duplex, each direction its pinned rate"
    inter = LinkFit(hw.p2p_inter.latency_s, hw.p2p_inter.GBps)
    inter_src = (f"inter_node roofline: one host, not measurable; {preset_fn} p2p_inter "
                 f"({hw.p2p_inter.GBps:g} GB/s)")
    if m.p2p:
        intra, how = link_fit(m.p2p)
        between = (f"NCCL isend/irecv between two processes on GPUs {machine.gpus[0]} and {machine.gpus[1]}"
                   if len(machine.gpus) >= 2 else
                   "gloo isend/irecv between two CPU processes, each bound to half the cores as the executor's CPU "
                   "ranks are")
        a.sources["links.p2p"] = (
            f"measured: intra_node = {between}, one process group per direction as the executor sends "
            f"activations (calibration/p2p.py), half the median ping-pong of {sizes.link_reps.reps} after 3 "
            f"warm-up, sizes {_fmt_bytes(m.p2p[0][0])}..{_fmt_bytes(m.p2p[-1][0])}, {how}; {inter_src}")
        a.roof["p2p_intra"] = intra.spec()
    else:
        intra = LinkFit(hw.p2p_intra.latency_s, hw.p2p_intra.GBps)
        a.sources["links.p2p"] = (f"roofline: not measured; {preset_fn} p2p_intra "
                                  f"({hw.p2p_intra.GBps:g} GB/s); {inter_src}")
    if fits["links.h2d.pinned"].points:
        a.roof["h2d"] = fits["links.h2d.pinned"].spec()
        a.roof["d2h"] = fits["links.d2h.pinned"].spec()
    return Links(
        h2d_pinned=fits["links.h2d.pinned"], h2d_pageable=fits["links.h2d.pageable"],
        d2h_pinned=fits["links.d2h.pinned"], d2h_pageable=fits["links.d2h.pageable"],
        root_h2d_GBps={k: round_sig(v) for k, v in root["h2d"].items()},
        root_d2h_GBps={k: round_sig(v) for k, v in root["d2h"].items()},
        duplex_h2d_GBps=round_sig(duplex[0]), duplex_d2h_GBps=round_sig(duplex[1]),
        p2p_intra=intra, p2p_inter=inter)


def _compute_sources(opts: Options, sizes: Sizes, machine: Machine, m: Measured, a: _Assembly) -> None:
    def smoothing(moved: list[float]) -> str:
        changed = [x for x in moved if x > 5e-4]          # beyond the 4-digit rounding
        return (f"derived: each curve made non-decreasing in tokens (the schema requires it; more tokens never "
                f"do less work, so a dip is noise or a faster kernel choice) by pool-adjacent-violators: "
                f"neighbours out of order are replaced by their mean; {len(changed)} of {len(moved)} medians "
                f"moved, by at most {max(changed, default=0):.1%}, median {statistics.median(changed or [0]):.1%}")

    if m.gpu and opts.blocks_on == "cpu":
        a.sources["gpu"] = (
            f"measured on the CPU ({machine.hardware.cpu_model}, {len(block_cpus(opts, machine))} bound threads), "
            f"for an executor whose ranks are CPU processes: the executor's block modules; a and g: fwd with "
            f"autograd recording, bwd = out.backward(random grad) after an untimed forward; e: outside autograd as "
            f"the executor runs experts (expert_forward, expert_backward adding into the weight-gradient buffer); "
            f"host clock, fresh torch.randn inputs, {_reps_text(sizes.gpu_reps)}")
        a.sources["gpu.monotone"] = smoothing(m.moved["gpu"])
    elif m.gpu:
        tf32 = torch.backends.cuda.matmul.allow_tf32
        a.sources["gpu"] = (
            f"measured: GPU {machine.gpus[0]} ({machine.gpu_name}), torch {torch.__version__}; blocks as the "
            f"executor runs them (aptmoe.exec.model's modules), no biases: a = LayerNorm, Q/K/V projections, "
            f"softmax(QK^T/sqrt(dh))V per head (causal, fused: scaled_dot_product_attention), output "
            f"projection, residual, LayerNorm, over whole sequences of {opts.seq_length} tokens; "
            f"g = softmax(x Wg^T), top-1; "
            f"e = relu(x W1^T) W2^T; a and g: fwd = the block with autograd recording, as in training, "
            f"bwd = out.backward(random grad) after an untimed forward (input and weight gradients); e: outside "
            f"autograd as the executor runs experts (expert_forward keeping the pre-activation, expert_backward "
            f"adding into the weight-gradient buffer); CUDA events on the compute stream, which a device-side "
            f"sleep holds while the block's kernels are enqueued: device execution time, without host launch "
            f"gaps (eager dispatch of the smallest blocks can take longer on the host); fresh torch.randn inputs "
            f"each repetition, "
            f"{_reps_text(sizes.gpu_reps)}; fp32 matmuls with TF32 {'on' if tf32 else 'off'} (torch default)")
        a.sources["gpu.monotone"] = smoothing(m.moved["gpu"])
    else:
        a.sources["gpu"] = "roofline: not measured; every GPU block uses the roofline"
    if m.cpu:
        cut = f"; series stopped after the first point with fwd + bwd over {sizes.cpu_point_limit_s:g} s " \
              f"(largest tokens: {', '.join(m.cpu_cut)}), beyond which ProfileCost follows the roofline's " \
              f"shape" if m.cpu_cut else ""
        a.sources["cpu_expert"] = (
            f"measured: an expert relu(x W1^T) W2^T on the CPU ({machine.hardware.cpu_model}), a different one of "
            f"a {COLD_POOL_BYTES >> 30} GiB pool per sample (weights come from memory, not cache), as the executor "
            f"runs it: fwd = expert_forward keeping the pre-activation, bwd = expert_backward adding the "
            f"weight gradients into the expert's buffer, of the next expert too, whose forward ran a pool ago (as "
            f"in a step; until 2026-11-30 right after an untimed forward of the same expert, from the cache); "
            f"{PINNED_TEXT}; host clock, fresh torch.randn inputs, {_reps_text(sizes.cpu_reps)}"
            + (f" in all on the ranks' workers, over {sizes.cpu_rounds} passes through the counts, each point the "
               f"median of the passes'" if sizes.cpu_rounds > 1 and m.cpu_ranks else "") + cut)
        alone = sorted({c.threads for c in m.cpu} - set(m.cpu_ranks))
        ways = [f"{t} threads: as the executor's GPU ranks run them, {r} processes at once (one a rank, on its even "
                f"share of the allowed cores), each on its CPU worker thread bound to the share's last {t} cores "
                f"with {t} torch threads, the main thread on the rest at one; the starts aligned; each point the "
                f"median over the ranks (calibration/cpu_ranks.py)" for t, r in sorted(m.cpu_ranks.items())]
        if alone:
            ways.append(f"{', '.join(map(str, alone))} threads: " + (
                f"torch.set_num_threads(t) with every thread of the process bound to the first t of "
                f"{list(machine.cpus)} (one logical CPU per physical core first, socket 0 first)"
                if m.cpu_bound else "torch.set_num_threads(t); threads could not be bound on this OS"))
        a.sources["cpu_expert.threads"] = "measured: " + "; ".join(ways)
        a.sources["cpu_expert.monotone"] = smoothing(m.moved["cpu"])
    else:
        a.sources["cpu_expert"] = "roofline: not measured (--skip cpu)"
    if m.adam_cpu or m.adam_gpu is not None:
        parts = []
        if m.adam_cpu:
            parts.append(f"CPU: the executor's update (aptmoe.exec.block_adam, {m.adam_cpu_impl}): one call at a "
                         f"time on the next of {sizes.adam_tensors} blocks of "
                         f"{sizes.adam_params // sizes.adam_tensors >> 10} Ki fp32 params, each its own optimizer "
                         f"with random grads, the median call less the fixed cost of a call, per thread count "
                         f"(threads bound as for cpu_expert), {PINNED_TEXT}, host clock")
        else:
            parts.append("CPU: roofline")
        if m.adam_cpu_call:
            parts.append(f"CPU call: one chunk's call over a {ADAM_CALL_PARAMS}-param tensor, the median of 5 batches "
                         f"of {ADAM_CALLS} calls (the fixed cost each of the executor's chunks pays)")
        if m.adam_shared:
            parts.append(f"CPU shared: the same in {m.adam_shared_ranks} processes at once, each on its own cores "
                         f"(started together; the median of their medians)")
        if m.adam_gpu is not None and opts.blocks_on == "cpu":
            parts.append(f"GPU (CPU ranks): Adam({m.adam_gpu_impl}=True) on {len(block_cpus(opts, machine))} bound "
                         "CPU threads, host clock")
        elif m.adam_gpu is not None:
            parts.append(f"GPU {machine.gpus[0]}: Adam({m.adam_gpu_impl}=True), CUDA events")
        else:
            parts.append("GPU: roofline")
        a.sources["adam"] = f"measured: {'; '.join(parts)}; {_reps_text(sizes.adam_reps)}"
    else:
        a.sources["adam"] = "roofline: not measured (--skip adam)"


def _rate_overrides(m: Measured, a: _Assembly) -> None:
    """The roofline's compute rates from the largest measured points (small counts are
    launch- or overhead-bound and would understate the rate)."""
    for dtype, key in (("fp32", "gpu_tflops_fp32"), ("bf16", "gpu_tflops_bf16")):
        rates = [4 * c.tokens[-1] * c.d * c.h / c.seconds[-1] / 1e12 for c in m.gpu
                 if (c.kind, c.direction, c.dtype) == ("e", "fwd", dtype) and c.tokens[-1] >= 1024]
        if rates:
            a.roof[key] = round_sig(max(rates))
    if m.cpu:
        top = max(c.threads for c in m.cpu)
        for dtype, key in (("fp32", "cpu_gflops_per_core_fp32"), ("bf16", "cpu_gflops_per_core_bf16")):
            rates = [4 * c.tokens[-1] * c.d * c.h / c.seconds[-1] / c.threads / 1e9 for c in m.cpu
                     if (c.direction, c.dtype, c.threads) == ("fwd", dtype, top) and c.tokens[-1] >= 64]
            if rates:
                a.roof[key] = round_sig(max(rates))
    if m.adam_cpu:
        t = max(m.adam_cpu)
        a.roof["cpu_adam_params_per_s_per_core"] = round_sig(1 / (m.adam_cpu[t] * t))
    if m.adam_gpu is not None:
        a.roof["gpu_adam_params_per_s"] = round_sig(1 / m.adam_gpu)


def build_profile(opts: Options, sizes: Sizes, machine: Machine, m: Measured, skipped: Sequence[Skipped], *,
                  name: str, command: str, date: str | None = None) -> Profile:
    hw, preset_fn = roofline_preset(machine.gpu_name)
    a = _Assembly()
    links = _links(sizes, machine, m, hw, preset_fn, a)
    _compute_sources(opts, sizes, machine, m, a)
    _rate_overrides(m, a)
    if m.host_memory:
        a.sources["host_memory"] = host_memory_source(m.host_memory)
    if m.policy_host is not None:
        sh = POLICY_SHAPE
        a.sources["policy_host"] = (f"measured: each loading policy driven on one rank through plans of an MoE of "
                                    f"{sh.experts} experts and {sh.layers} layers (one and two a stage), "
                                    f"{sh.micro_batches} micro-batches, G {sh.gini}, {sh.steps} steps, copies landing "
                                    f"at once: the median host seconds of each kind of call the stage walks make, and "
                                    f"the reference loop beside them (aptmoe/policy_timing.py)")
    if m.pacer_late is not None:
        a.sources["pacer"] = (f"measured: how long after its slot each of {PACER_COPIES} copies of {PACER_BYTES >> 10} "
                              f"KiB (host to {m.pacer_device}), alone on a Link "
                              f"capped to {PACER_CAP:g} GB/s (exec/link.py), was "
                              f"seen to have landed by the thread waiting for it, the median of {PACER_ROUNDS} rounds "
                              "(calibration/pacer.py)")
    if m.recv_wait:
        a.sources["recv_wait"] = (f"measured: the executor's attention, expert and gate blocks (forward, "
                                  f"{RECV_SEQUENCES} sequences of {opts.seq_length} tokens) on rank 0, each the median "
                                  f"of {RECV_REPS} after 3 warm-up, beside a {m.recv_backend} receive from rank 1 "
                                  f"posted on a side stream and waiting, over the same alone (calibration/p2p.py)")
    if m.issue_tolls is not None:
        a.sources["issue_tolls"] = (f"measured: a launch-bound issuing loop on a rank's host cores alone and beside "
                                    f"the copy engine ({', '.join(map(str, COPY_MIB))} MiB copies, native and "
                                    f"{CAP_GBps:g} GB/s), the CPU worker's one-token MoE-M experts and the executor's "
                                    f"Adam chunks, DMA copies and a memory stream (calibration/issue_tolls.py), and the "
                                    f"executor's own calls in its run ({' '.join(OWN_CALLS_PROBE)}; "
                                    f"calibration/own_calls.py): "
                                    + "; ".join(n.strip() for n in m.issue_tolls_notes))
    if m.cpu_job is not None:
        a.sources["cpu_job"] = ("measured: the executor's own APTMoE run on up to two GPUs with MoE-S's widths on a "
                                "native link (" + " ".join(CPU_JOB_PROBE) + "), the medians of its CPU jobs' "
                                "phases (calibration/cpu_jobs.py), and of the CPU worker's time between one block's "
                                "Adam chunks in its APTMoE and Mobius runs (adam_gap_s, aptmoe/adam_gaps.py)")
    if m.dispatch is not None:
        runs = "" if opts.dispatch_repeats == 1 else f", the median of {opts.dispatch_repeats} runs"
        ranks = "" if opts.dispatch_ranks is None else f", {opts.dispatch_ranks} ranks at once"
        a.sources["dispatch"] = (f"measured: median span of each block kind and direction in aptmoe-run's own GPipe "
                                 f"trace ({m.dispatch.device}, {m.dispatch.samples} block calls{runs}{ranks}) on a model too "
                                 f"small to compute: {' '.join(PROBE)}"
                                 + (f" --kernel-loading {PROBE_KERNEL_LOADING}" if m.dispatch.device == "cuda" else "")
                                 + ("" if m.dispatch.loop_s is None else
                                    f"; loop_s: its ranks' reference loop (aptmoe.host.python_loop_s) around the "
                                    f"steps, {m.dispatch.loop_s * 1e3:.2f} ms")
                                 + ("" if m.dispatch.action is None else
                                    "; action: each pass's start and end outside its layers, and the embedding's "
                                    "and the loss's own times (the executor's embed_us, head_us ...), apart from "
                                    "between, which is then the time between a layer's calls alone"))
    roof = replace(hw, **a.roof, name=f"{hw.name}+measured" if a.roof else hw.name)
    a.sources["roofline"] = (f"derived: preset {preset_fn} (closest to GPU {machine.gpu_name!r}); measured "
                             f"overrides: {', '.join(sorted(a.roof)) or 'none'} (links: the pinned fits and the "
                             f"largest aggregate; rates: the largest measured points); every other field is the "
                             f"preset's datasheet figure")
    a.sources["hardware"] = ("measured: torch.cuda device properties, /proc/cpuinfo (model, distinct physical "
                             "ids = sockets), psutil (physical cores, host memory as seen at start)")
    mode = "quick mode (fewer sizes, token counts and repetitions)" if opts.quick else "full mode"
    hwd = machine.hardware
    description = (f"Measured by aptmoe-calibrate, {mode}: {hwd.gpu_count} x {hwd.gpu_name}, "
                   f"{hwd.cpu_model} ({hwd.cpu_cores} cores), torch {hwd.torch_version}.")
    return Profile(
        name=name, description=description,
        made_by=MadeBy(f"aptmoe {version()}", command,
                       date or datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")),
        hardware=hwd, sources=a.sources, links=links,
        skipped=(*skipped, *([Skipped("cpu_job", f"not measured: {m.cpu_job_refused}")] if m.cpu_job_refused else [])),
        gpu=tuple(m.gpu), cpu_expert=tuple(m.cpu),
        adam=Adam({t: round_sig(s) for t, s in m.adam_cpu.items()},
                  None if m.adam_gpu is None else round_sig(m.adam_gpu),
                  m.adam_shared_ranks if m.adam_shared else None,
                  {t: round_sig(s) for t, s in m.adam_shared.items()},
                  {t: round_sig(s) for t, s in m.adam_cpu_call.items()}),
        roofline=_roofline_json(roof), dispatch=m.dispatch,
        host_memory=HostMemory({t: round_sig(r.total_GBps) for t, r in m.host_memory.items()},
                               {t: round_sig(r.cpu_alone_GBps) for t, r in m.host_memory.items()},
                               {t: tuple((round_sig(c), round_sig(u)) for c, u in r.beside())
                                for t, r in m.host_memory.items()},
                               {t: {n: {c: round_sig(v) for c, v in by.items()} for n, by in r.copies_beside_adam().items()}
                                for t, r in m.host_memory.items() if r.copy_beside_adam_GBps})
        if m.host_memory else None,
        issue_tolls=m.issue_tolls,
        pacer=None if m.pacer_late is None else Pacer(round_sig(m.pacer_late)),
        cpu_job=None if m.cpu_job is None else CpuJob(*(round_sig(x) for x in dataclasses.astuple(m.cpu_job))),
        recv_wait=RecvWait(tuple((k, d, round_sig(x)) for (k, d), x in sorted(m.recv_wait.items())))
        if m.recv_wait else None,
        policy_host=m.policy_host)


def _roofline_json(hw: AnalyticHardware) -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in vars(hw).items():
        out[k] = {"latency_s": v.latency_s, "GBps": v.GBps} if isinstance(v, LinkSpec) else v
    return out


def calibrate(opts: Options, *, name: str, command: str, progress: bool = True,
              log: Callable[[str], None] = print) -> Profile:
    """Measures this machine as `opts` asks and returns the profile (not yet saved)."""
    from tqdm import tqdm

    machine = probe_machine(opts)
    sizes = sizes_for(opts)
    skipped = skipped_parts(opts, machine)
    if skipped:
        log("not measured (the file lists them under 'skipped'):")
    for s in skipped:
        log(f"  {s.part}: {s.reason}")
    m = Measured()
    tasks = plan_tasks(opts, sizes, machine, m)
    spent: dict[str, float] = {}
    with warnings.catch_warnings():
        # The autograd engine's device thread says so on its first cuBLAS call and then sets
        # the context itself: noise on the terminal, nothing to act on.
        warnings.filterwarnings("ignore", message=".*no current CUDA context.*")
        with tqdm(total=len(tasks), file=sys.stderr, unit="task", disable=None if progress else True,
                  dynamic_ncols=True) as bar:
            for i, task in enumerate(tasks, 1):
                bar.set_description(task.label)
                t0 = time.perf_counter()
                task.run()
                took = time.perf_counter() - t0
                spent[task.part] = spent.get(task.part, 0.0) + took
                bar.update()
                if progress and bar.disable:              # no terminal for the bar: a line per task
                    print(f"[{i}/{len(tasks)}] {task.label}: {took:.1f} s", file=sys.stderr, flush=True)
    log("measured in " + ", ".join(f"{part} {s:.0f} s" for part, s in spent.items() if s >= 0.5))
    return build_profile(opts, sizes, machine, m, skipped, name=name, command=command)


# --------------------------------------------------------------------------- the summary


def _ms(s: float) -> str:
    return f"{s * 1e3:.3g}"


def _curve_line(label: str, tokens: Sequence[int], seconds: Sequence[float]) -> str:
    idx = sorted({0, len(tokens) // 2, len(tokens) - 1})
    return f"  {label:<28} " + "  ".join(f"{tokens[i]}: {_ms(seconds[i])} ms" for i in idx)


def summary(p: Profile) -> str:
    L = p.links
    lines = [f"{p.name}: {p.hardware.gpu_count} x {p.hardware.gpu_name}, {p.hardware.cpu_model}, "
             f"{p.hardware.cpu_cores} cores",
             f"  {'link':<22} {'GB/s':>8} {'latency us':>11} {'points':>7}  source"]
    for label, f, key in (("h2d pinned", L.h2d_pinned, "links.h2d.pinned"),
                          ("h2d pageable", L.h2d_pageable, "links.h2d.pageable"),
                          ("d2h pinned", L.d2h_pinned, "links.d2h.pinned"),
                          ("d2h pageable", L.d2h_pageable, "links.d2h.pageable"),
                          ("p2p intra-node", L.p2p_intra, "links.p2p"),
                          ("p2p inter-node", L.p2p_inter, None)):
        src = "roofline" if key is None else p.sources[key].split(":")[0]
        lines.append(f"  {label:<22} {f.GBps:>8.4g} {f.latency_s * 1e6:>11.3g} {len(f.points):>7}  {src}")
    root = lambda t: ", ".join(f"{k}: {v:.4g}" for k, v in t.items())   # noqa: E731
    lines.append(f"  root GB/s by GPUs copying: h2d {{{root(L.root_h2d_GBps)}}}, d2h {{{root(L.root_d2h_GBps)}}}")
    lines.append(f"  duplex GB/s: h2d {L.duplex_h2d_GBps:.4g}, d2h {L.duplex_d2h_GBps:.4g}")
    if p.recv_wait is not None:
        lines.append("  blocks beside a waiting receive, x their time alone: "
                     + ", ".join(f"{k} d{d} {x:.3g}" for k, d, x in p.recv_wait.blocks))
    if p.gpu:
        lines.append(f"gpu curves ({len(p.gpu)}), tokens: time")
        for c in p.gpu:
            if c.kind in ("e", "a", "l", "m") or c.experts == max(x.experts or 0 for x in p.gpu):
                dims = (f"d{c.d}" + (f" h{c.h}" if c.h else "") + (f" E{c.experts}" if c.experts else "")
                        + (f" V{c.vocab}" if c.vocab else ""))
                lines.append(_curve_line(f"{c.kind} {c.direction} {dims} {c.dtype}", c.tokens, c.seconds))
    if p.cpu_expert:
        lines.append(f"cpu expert curves ({len(p.cpu_expert)}), tokens: time")
        for c in p.cpu_expert:
            lines.append(_curve_line(f"{c.direction} d{c.d} h{c.h} {c.dtype} {c.threads}t", c.tokens, c.seconds))
    adam_cpu = ", ".join(f"{t}t: {s * 1e9:.3g}" for t, s in p.adam.cpu_s_per_param.items()) or "roofline"
    adam_gpu = "roofline" if p.adam.gpu_s_per_param is None else f"{p.adam.gpu_s_per_param * 1e9:.3g}"
    shared = ", ".join(f"{t}t: {x * 1e9:.3g}" for t, x in p.adam.cpu_shared_s_per_param.items())
    calls = ", ".join(f"{t}t: {x * 1e6:.3g}" for t, x in p.adam.cpu_call_s.items())
    lines.append(f"adam ns/param: cpu {adam_cpu}; gpu {adam_gpu}"
                 + (f"; cpu with {p.adam.shared_ranks} ranks at once {shared}" if shared else "")
                 + (f"; us per cpu step() call {calls}" if calls else ""))
    if p.dispatch is not None:
        per = "; ".join(f"{k} " + ", ".join(f"{d} {_ms(v)}" for d, v in dirs.items())
                        for k, dirs in p.dispatch.seconds.items())
        lines.append(f"executor host ms per block call ({p.dispatch.device}, {p.dispatch.samples} calls): {per}")
    if p.skipped:
        lines.append("skipped:")
        lines.extend(f"  {s.part}: {s.reason}" for s in p.skipped)
    return "\n".join(lines)
