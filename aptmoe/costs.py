"""The cost-source interface: how long each block takes where.

Both the loading policy (to split experts between GPU and CPU) and the simulator (to hold
its resources) ask a `CostSource`. Two implementations exist: `AnalyticCost`
(`aptmoe.analytic_cost`: bytes / bandwidth, FLOPs / rate) and `ProfileCost`
(`aptmoe.profile`: a calibration file measured by `aptmoe-calibrate`). A source is bound to
one model's dimensions and dtype.

Block kinds: "a" attention (MHA and its norms), "g" gate (and predictor), "e" one expert
FFN. Directions: "fwd", "bwd" (bwd = weight and input gradients, without the forward).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

BLOCK_KINDS = ("a", "g", "e")
DIRECTIONS = ("fwd", "bwd")
BETWEEN_PASSES = (*DIRECTIONS, "rec")          # a recompute's host work between blocks, apart
MESSAGE_POSTS = ("send", "recv")             # what the issuing thread posts (Dispatch.post)
# An action's host work outside its layers (Dispatch.action): its start and end on any stage,
# and what the first stage (the embedding) and the last (the head and the loss) add there
ACTION_PARTS = ("start", "end", "first", "last")


@dataclass(frozen=True)
class LinkSpec:
    """One direction of a copy path, as latency + bytes / bandwidth (a fluid model)."""

    latency_s: float
    GBps: float

    def time_s(self, nbytes: int) -> float:
        return self.latency_s + nbytes / (self.GBps * 1e9) if nbytes > 0 else 0.0

    def capped(self, cap_GBps: float | None) -> "LinkSpec":
        if cap_GBps is None or cap_GBps >= self.GBps:
            return self
        return LinkSpec(self.latency_s, cap_GBps)


@runtime_checkable
class CostSource(Protocol):
    """Durations in seconds for one model (dims and dtype fixed when the source is made)."""

    name: str
    fallbacks: set[str]     # approximations used (no measured curve, outside its range)

    def gpu_s(self, kind: str, tokens: int, direction: str) -> float:
        """GPU time of one block over `tokens` tokens (for "a": tokens of whole sequences)."""

    def cpu_expert_s(self, tokens: int, direction: str, threads: int) -> float:
        """CPU time of one expert FFN over `tokens` tokens with `threads` cores."""

    def h2d(self) -> LinkSpec:
        """Host-to-GPU copies of parameters, one GPU's link alone (cap applied)."""

    def d2h(self) -> LinkSpec:
        """GPU-to-host copies (gradients), one GPU's link alone (cap applied)."""

    def root_GBps(self, gpus_sharing: int, direction: str = "h2d") -> float:
        """Aggregate bandwidth of one socket root ("h2d" or "d2h") when `gpus_sharing` GPUs copy at once."""

    def p2p(self, same_node: bool) -> LinkSpec:
        """GPU-to-GPU activation transfers: within a node (PCIe switch or NVLink) or across nodes."""

    def adam_cpu_s(self, num_params: int, threads: int) -> float:
        """One CPU Adam step() over `num_params` fp32 parameters with `threads` cores (the
        executor steps each chunk of a block separately: one call per chunk)."""

    def adam_cpu_alone_s(self, num_params: int, threads: int) -> float:
        """`adam_cpu_s` with no other rank of the host updating at the same time (where the
        source has one figure for both, that one)."""

    def adam_shared_slowdown(self, threads: int) -> float:
        """How many times longer a CPU Adam chunk takes while another rank of the host updates
        too (they share its memory bandwidth); 1.0 where not measured or one rank per host."""

    def adam_gpu_s(self, num_params: int) -> float:
        """GPU Adam update (GPipe keeps the optimizer on the GPU)."""

    def host_s(self, kind: str, direction: str) -> float:
        """Host time the executor spends issuing one block (0: not measured)."""

    def between_s(self, direction: str) -> float:
        """Host time per layer and pass between its blocks: routing, combine (0: not measured).
        `direction` is one of BETWEEN_PASSES: "rec" is a recomputed layer's (0 where not
        measured apart: then "bwd" holds it)."""

    def combine_s(self, direction: str) -> float:
        """Of `between_s`, the part after the layer's experts: the combine (0: not measured, or
        all of it before them)."""

    def glue_gpu_s(self, assignments: int, direction: str) -> float:
        """GPU time of one layer's work outside its blocks, over `assignments` (tokens x
        top_k): a forward's combine of the experts' outputs after them, a backward's split of
        the output gradient before them (exec/layer.py `output`, `start_backward` and
        `output_grads`). 0: not measured."""

    def ends_gpu_s(self, tokens: int, part: str, direction: str) -> float:
        """GPU time of a micro-batch's `part` of the step's ends over `tokens`: "loss" (the last
        stage's final norm, head and cross-entropy) or "embedding" (the first stage's token
        embedding), forward or backward (exec/runtime.py `_stage_input`, `_loss`). Its host time
        is `action_s`'s. 0: not measured."""

    def action_s(self, pass_: str, part: str) -> float:
        """Host time of one action's pass (one of BETWEEN_PASSES) outside its layers: `part`
        "start" (before its first block) and "end" (after its last) on every stage, "first" and
        "last" what the first and the last stage add to them (0: not measured; `between_s` then
        holds it, spread over the probe's layers)."""

    def post_s(self, message: str) -> float:
        """Host time the issuing thread spends posting one message, "send" or "recv" (0: not
        measured)."""

    def host_runs_ahead(self) -> bool:
        """True where blocks run on a GPU, so the host issues the next block while the GPU
        computes this one; False on CPU ranks, where issuing and computing are one thread."""

    def memory_share(self, threads: int):
        """What CPU work on `threads` threads gets of host memory beside the links' copies (an
        `aptmoe.profile.MemoryShare`, or None: CPU work never waits for copies;
        sim/host_memory.py)."""

    def copy_limits(self, threads: int):
        """What caps a GPU's copies while it copies both ways and while its host's ranks run
        Adam, with CPU work on `threads` threads (an `aptmoe.profile.CopyLimits`, or None:
        copies take their link's rate whatever else runs; sim/links.py)."""

    def issue_tolls(self):
        """What the issuing thread loses per copy landed, paced chunk and CPU job of the
        rank's other threads, and beside DMA and a memory stream (an `IssueTolls`, or None:
        it runs at its calibrated speed whatever runs beside it)."""

    def cpu_job(self):
        """How long a CPU expert job waits beyond its copies' bytes and its experts' compute
        (an `aptmoe.profile.CpuJob`, or None: nothing more)."""

    def adam_gap_s(self, policy: str) -> float:
        """The CPU worker's own seconds after each Adam chunk under loading policy `policy`
        ("aptmoe", "stage"), before its next job (aptmoe/adam_gaps.py; 0: not measured)."""

    def policy_s(self, policy: str, call: str) -> float:
        """Host seconds the issuing thread spends in one call of the loading policy `policy`
        ("aptmoe", "stage") of kind `call` (aptmoe/policy_timing.py; 0: not measured)."""

    def pacer_late_s(self) -> float:
        """How long after its bytes have passed over the cap a copy on a capped link is seen to
        have landed (the link is free meanwhile; 0: not measured)."""

    def recv_slowdown(self, kind: str) -> float:
        """How many times its time alone a block of `kind` takes while a receive its rank
        posted waits for the peer's send (1: no such cost, or not measured)."""


def cpu_expert_bytes(d: int, h: int, dtype_bytes: int, tokens: int, direction: str) -> int:
    """Host memory a CPU expert streams: its weights (2 d h), read once, and in the backward
    its weight gradient written too; its tokens' activations (in, hidden, out) besides."""
    weights = 2 * d * h * dtype_bytes
    acts = tokens * (2 * d + h) * dtype_bytes
    return weights + acts if direction == "fwd" else 2 * weights + 2 * acts


def adam_bytes(num_params: int, dtype_bytes: int) -> int:
    """Host memory one Adam step over `num_params` streams: the parameter (read, written),
    its gradient (read) and the two fp32 moments (read, written)."""
    return num_params * (3 * dtype_bytes + 16)


class KernelTimeOnly:
    """For cost sources that know no host: blocks take their kernel time alone."""

    def memory_share(self, threads: int):
        return None

    def copy_limits(self, threads: int):
        return None

    def issue_tolls(self):
        return None

    def cpu_job(self):
        return None

    def adam_gap_s(self, policy: str) -> float:
        return 0.0

    def policy_s(self, policy: str, call: str) -> float:
        return 0.0

    def pacer_late_s(self) -> float:
        return 0.0

    def recv_slowdown(self, kind: str) -> float:
        return 1.0

    def host_s(self, kind: str, direction: str) -> float:
        return 0.0

    def between_s(self, direction: str) -> float:
        return 0.0

    def combine_s(self, direction: str) -> float:
        return 0.0

    def glue_gpu_s(self, assignments: int, direction: str) -> float:
        return 0.0

    def ends_gpu_s(self, tokens: int, part: str, direction: str) -> float:
        return 0.0

    def action_s(self, pass_: str, part: str) -> float:
        return 0.0

    def post_s(self, message: str) -> float:
        return 0.0

    def host_runs_ahead(self) -> bool:
        return True

    def adam_cpu_alone_s(self, num_params: int, threads: int) -> float:
        return self.adam_cpu_s(num_params, threads)

    def adam_shared_slowdown(self, threads: int) -> float:
        return 1.0


class SharedLinkView:
    """A cost source whose host link is one GPU's share of its socket root.

    The loading policy weighs load time against CPU time; under `C1+G2` or `C1+G4` the GPUs
    of a socket load at the same time, so each sees root / n, not its own link's rate.
    Everything else is delegated unchanged.
    """

    def __init__(self, cost: CostSource, gpus_per_socket: int) -> None:
        self._cost = cost
        self._n = gpus_per_socket
        link = cost.h2d()
        self._h2d = LinkSpec(link.latency_s, min(link.GBps, cost.root_GBps(gpus_per_socket) / gpus_per_socket))
        self.name = f"{cost.name} (1/{gpus_per_socket} of the socket root)"

    def h2d(self) -> LinkSpec:
        return self._h2d

    def __getattr__(self, attr):
        return getattr(self._cost, attr)


class ObservedCpuView:
    """A cost source whose CPU-expert times follow what the CPU has been observed to take.

    The affinity split weighs a CPU expert's time against loading it. When the machine's
    CPU experts run slower than the calibration said (on a host whose ranks share the
    memory bandwidth, a backward expert took 16 ms where the profile said 0.8), the split
    must learn it, or it keeps sending experts to a CPU the GPU then waits for. Each
    observed job moves a per-direction correction (a running mean of log(observed /
    predicted)); everything else is delegated unchanged. Where the observation is the
    model itself (the simulator), the correction stays exactly 1.
    """

    WEIGHT = 0.2                  # of each new observation in the running mean
    BOUNDS = (0.1, 100.0)         # the correction never leaves this range

    def __init__(self, cost: CostSource) -> None:
        self._cost = cost
        self._log = {"fwd": 0.0, "bwd": 0.0}
        self.name = f"{cost.name} (CPU experts as observed)"

    def observe(self, tokens: int, direction: str, threads: int, seconds: float) -> None:
        predicted = self._cost.cpu_expert_s(tokens, direction, threads)
        if predicted <= 0 or seconds <= 0:
            return
        lo, hi = self.BOUNDS
        ratio = min(hi, max(lo, seconds / predicted))
        self._log[direction] += self.WEIGHT * (math.log(ratio) - self._log[direction])

    def correction(self, direction: str) -> float:
        return math.exp(self._log[direction])

    def cpu_expert_s(self, tokens: int, direction: str, threads: int) -> float:
        return self._cost.cpu_expert_s(tokens, direction, threads) * self.correction(direction)

    def __getattr__(self, attr):
        return getattr(self._cost, attr)
