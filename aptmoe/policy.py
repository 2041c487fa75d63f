"""The loading policy: one object per rank, asked by both back-ends.

The simulator's copy engine and the executor's load stream run the same loop::

    copy = policy.next_copy()          # None: wait until the policy calls on_work()
    ... copy copy.nbytes host -> GPU ...
    policy.copy_finished(copy)

and the compute side tells the policy what it learns::

    policy.stage_load_begins(stage, pass_)     # the load program reached LF(s) / LB(s)
    policy.predicted_counts(stage, layer, mb, counts)   # a predictor gate ran
    placement = policy.gate_counts(stage, layer, mb, counts)  # the real gate ran
    placement = policy.backward_placement(stage, layer)
    policy.require(block)                       # compute waits for this block now
    policy.stage_dropped(stage)                 # DF / DB freed the stage

Two policies share this interface. `StagePolicy` is Mobius and GPipeOffload: every block of
a stage, in layer order, all experts on the GPU. `AptmoePolicy` is the paper's three
phases with demand priority (DESIGN §1):

* inter-stage (lowest): when the load program reaches a stage, queue its attention blocks
  and gates, then its experts rank by rank across layers by popularity (the previous
  step's for a forward pass, this step's forward for a backward pass). Reaching the next
  stage clears the queue: required blocks left in it (the attention and gates, and experts
  already placed on the GPU) fall to the inter-layer queue; speculative experts are dropped,
  except from a forward target whose compute has not begun and that no predictor gate has
  spoken for (the first stage at a step's start; later, a stage whose input comes from
  another rank): it keeps the experts last step's counts say it will load (`_keeps`).
* inter-layer: predicted counts of a layer choose (with the affinity split, scaled to the
  micro-batches still to come) which experts to load ahead; revised per micro-batch.
* inter-expert (highest): the real counts of a layer fix this micro-batch's split; the GPU
  experts not yet here are queued first. One whose copy has not started runs on the CPU for
  this micro-batch where the CPU finishes it before the copy would land and run
  (`_this_micro_batch`); its copy serves the micro-batches after. `require` puts a block
  compute is waiting for here.

Backward placement is decided once per stage from the forward's counts (summed over the
micro-batches), when its backward starts, so that experts the inter-stage phase already
brought count as free: no inter-layer phase; missing GPU experts are demanded at once. In
the backward the CPU is not free, as Eq. 1 has it: it owes the Adam of every stage whose
gradients are home. The stage's CPU experts get at most the CPU's slack: what the GPU and
link still have to do in this backward (and the last stage's Adam after it) less what the
CPU still owes; with none, every expert is loaded (`_cpu_slack`). Both back-ends report each
Adam chunk done (`adam_done`).

A copy, once launched, cannot be preempted: `next_copy` always picks from the highest
non-empty queue at the moment a copy slot frees, and back-ends keep only a few copies
launched (`ScheduleConfig.max_copies_in_flight`), which is what demand priority needs.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np

from aptmoe.affinity import Split, block_load_s, split_experts
from aptmoe.config import ModelConfig
from aptmoe.costs import CostSource, ObservedCpuView
from aptmoe.memory import adam_chunks
from aptmoe.plan.actions import Action, Block, BlockKind, Kind
from aptmoe.plan.plan import Plan

PHASES = ("inter-expert", "inter-layer", "inter-stage")   # priority order, highest first


@dataclass(frozen=True)
class Copy:
    """One block to copy host -> GPU; `action` names it in traces (e.g. ``5LF@12:e3``)."""

    stage: int
    pass_: str          # "F" or "B": which load of the stage it belongs to
    block: Block
    nbytes: int
    phase: str          # one of PHASES, or "stage" for the baseline policy

    @property
    def action(self) -> Action:
        return Action(self.stage, Kind.LOAD_B if self.pass_ == "B" else Kind.LOAD_F, block=self.block)


@dataclass(frozen=True)
class Placement:
    """Where the experts of one layer compute for one micro-batch (or the whole backward)."""

    gpu: tuple[int, ...]
    cpu: tuple[int, ...]


class LoadingPolicy(Protocol):
    on_work: Callable[[], None]

    def stage_load_begins(self, stage: int, pass_: str) -> None: ...
    def predicted_counts(self, stage: int, layer: int, mb: int, counts) -> None: ...
    def gate_counts(self, stage: int, layer: int, mb: int, counts) -> Placement: ...
    def backward_placement(self, stage: int, layer: int) -> Placement: ...
    def backward_decided(self, stage: int) -> bool: ...
    def forward_placement(self, layer: int, mb: int) -> Placement | None: ...
    def require(self, stage: int, pass_: str, block: Block) -> None: ...
    def next_copy(self) -> Copy | None: ...
    def copy_finished(self, copy: Copy) -> None: ...
    def stage_dropped(self, stage: int) -> None: ...
    def is_loaded(self, stage: int, block: Block) -> bool: ...
    def window_open(self, stage: int) -> bool: ...
    def prime_history(self, layer_totals) -> None: ...
    def cpu_expert_ran(self, tokens: int, direction: str, seconds: float) -> None: ...
    def adam_done(self, num_params: int) -> None: ...
    def end_iteration(self) -> None: ...


class _Queue:
    """A priority queue of blocks with lazy deletion; keys keep the order stable."""

    def __init__(self) -> None:
        self.items: dict[tuple[int, Block], tuple[tuple, str]] = {}

    def put(self, stage: int, block: Block, key: tuple, pass_: str) -> None:
        self.items[(stage, block)] = (key, pass_)

    def remove(self, stage: int, block: Block) -> None:
        self.items.pop((stage, block), None)

    def pop(self) -> tuple[int, Block, str] | None:
        if not self.items:
            return None
        (stage, block), (_, pass_) = min(self.items.items(), key=lambda kv: kv[1][0])
        del self.items[(stage, block)]
        return stage, block, pass_

    def drain(self) -> list[tuple[int, Block, str]]:
        out = [(s, b, p) for (s, b), (_, p) in sorted(self.items.items(), key=lambda kv: kv[1][0])]
        self.items.clear()
        return out

    def __len__(self) -> int:
        return len(self.items)

    def __contains__(self, sb: tuple[int, Block]) -> bool:
        return sb in self.items


class _PolicyBase:
    """Residency bookkeeping shared by both policies."""

    def __init__(self, plan: Plan, rank: int, model: ModelConfig) -> None:
        self.plan, self.rank, self.model = plan, rank, model
        self.layers = {st.index: st.layers for st in plan.stages if st.rank == rank}
        self.loaded: set[tuple[int, Block]] = set()
        self.in_flight: set[tuple[int, Block]] = set()
        self._resident_stages: set[int] = set()     # stages whose load window is open
        self.on_work: Callable[[], None] = lambda: None
        self.copies_by_phase: dict[str, int] = defaultdict(int)
        self.bytes_by_phase: dict[str, int] = defaultdict(int)

    def _experts(self) -> range:
        return range(self.model.num_experts)

    def _reverse(self, pass_: str) -> bool:
        """Whether this pass first needs the stage's layers last to first. A backward that
        recomputes starts with the forward again; with "except_last" the micro-batch that
        does not recompute is not the first to run its backward, so forward order holds."""
        return pass_ == "B" and self.plan.recompute == "none"

    def use_order(self, stage: int, pass_: str) -> list[Block]:
        """The stage's blocks in the order compute first needs them in this pass (a reversed
        backward walks each layer's experts, then its gate, then its attention)."""
        blocks = self.stage_blocks(stage)
        if self._reverse(pass_):
            rank = {BlockKind.EXPERT: 0, BlockKind.GATE: 1, BlockKind.ATTN: 2}
            blocks.sort(key=lambda b: (-b.layer, rank[b.kind], b.expert or 0))
        return blocks

    def stage_blocks(self, stage: int) -> list[Block]:
        m = self.model
        return Block.of_layers(self.layers[stage], m.num_experts, m.is_moe)

    def nbytes(self, block: Block) -> int:
        return self.model.block_bytes(block.kind.value)

    def is_loaded(self, stage: int, block: Block) -> bool:
        return (stage, block) in self.loaded

    def window_open(self, stage: int) -> bool:
        """Whether the stage's parameters may be on the GPU (loaded and not yet dropped)."""
        return stage in self._resident_stages

    def backward_decided(self, stage: int) -> bool:
        """Whether the stage's backward placement is settled, so that asking for it decides
        nothing (aptmoe/policy_timing.py): a policy that places by no counts has nothing to decide."""
        return True

    def prime_history(self, layer_totals) -> None:
        """Popularity of the previous step, [layers, E]; what a warm-up step leaves behind."""

    def cpu_expert_ran(self, tokens: int, direction: str, seconds: float) -> None:
        """A CPU expert took `seconds` (its compute, as the back-end measured or modelled it)."""

    def adam_done(self, num_params: int) -> None:
        """A chunk of CPU Adam over `num_params` parameters ended."""

    def _available(self, stage: int, block: Block) -> bool:
        return (stage, block) in self.loaded or (stage, block) in self.in_flight

    def _launch(self, stage: int, block: Block, pass_: str, phase: str) -> Copy:
        self.in_flight.add((stage, block))
        c = Copy(stage, pass_, block, self.nbytes(block), phase)
        self.copies_by_phase[phase] += 1
        self.bytes_by_phase[phase] += c.nbytes
        return c

    def copy_finished(self, copy: Copy) -> None:
        key = (copy.stage, copy.block)
        if key in self.in_flight:
            self.in_flight.discard(key)
            if copy.stage in self._resident_stages:
                self.loaded.add(key)

    def stage_dropped(self, stage: int) -> None:
        self._resident_stages.discard(stage)
        self.loaded = {k for k in self.loaded if k[0] != stage}

    def end_iteration(self) -> None:
        self.loaded.clear()
        self._resident_stages.clear()


class StagePolicy(_PolicyBase):
    """Mobius and GPipeOffload: every block of a stage, in layer order, all experts on the GPU."""

    def __init__(self, plan: Plan, rank: int, model: ModelConfig) -> None:
        super().__init__(plan, rank, model)
        self.queue: list[tuple[int, Block, str]] = []
        self.demand = _Queue()
        self._seq = 0

    def stage_load_begins(self, stage: int, pass_: str) -> None:
        self._resident_stages.add(stage)
        blocks = self.use_order(stage, pass_)
        self.queue.extend((stage, b, pass_) for b in blocks if not self._available(stage, b))
        self.on_work()

    def predicted_counts(self, stage, layer, mb, counts) -> None:
        pass   # popularity-blind

    def gate_counts(self, stage, layer, mb, counts) -> Placement:
        return Placement(tuple(e for e in self._experts() if counts[e] > 0), ())

    def backward_placement(self, stage, layer) -> Placement:
        return Placement(tuple(self._experts()), ())

    def forward_placement(self, layer: int, mb: int) -> Placement | None:
        return None            # every expert ran on the GPU

    def require(self, stage: int, pass_: str, block: Block) -> None:
        if not self._available(stage, block):
            self._seq += 1
            self.demand.put(stage, block, (self._seq,), pass_)
            self.on_work()

    def next_copy(self) -> Copy | None:
        while True:
            item = self.demand.pop()
            phase = "stage"
            if item is None:
                if not self.queue:
                    return None
                item = self.queue.pop(0)
                phase = "stage"
            stage, block, pass_ = item
            if not self._available(stage, block) and stage in self._resident_stages:
                return self._launch(stage, block, pass_, phase)

    def stage_dropped(self, stage: int) -> None:
        super().stage_dropped(stage)
        self.queue = [q for q in self.queue if q[0] != stage]


class AptmoePolicy(_PolicyBase):
    """The paper's three loading phases with demand priority (module docstring)."""

    def __init__(self, plan: Plan, rank: int, model: ModelConfig, cost: CostSource, *,
                 threads: int, inter_stage_only: bool = False) -> None:
        super().__init__(plan, rank, model)
        self.cost, self.threads = ObservedCpuView(cost), threads
        self.inter_stage_only = inter_stage_only
        self.M = plan.micro_batches
        self.queues = {p: _Queue() for p in PHASES}
        self._seq = 0
        self._puts = 0                      # items queued so far (`_wake_if_queued`)
        # token counts seen this iteration (layer -> mb -> counts) and last iteration's totals
        self.seen: dict[int, dict[int, np.ndarray]] = defaultdict(dict)
        self.history: dict[int, np.ndarray] = {}
        self._bwd: dict[int, dict[int, Placement]] = {}
        self.placements: dict[tuple[int, int], Placement] = {}
        self.required: set[tuple[int, Block]] = set()
        self.adam_done_s = 0.0              # CPU Adam done this step, in the cost model's seconds
        self._windows = 0                   # load windows opened: inter-stage keys keep their order
        self._begun: set[tuple[int, str]] = set()     # (stage, pass) whose compute has begun
        self._predicted: set[int] = set()             # stages a predictor gate has spoken for
        self._adam_by_stage: dict[int, float] = {}
        self._kernels_by_stage: dict[int, float] = {}
        self._block_load_s = {k: block_load_s(cost, model, k.value) for k in BlockKind}

    # -------------------------------------------------------------- helpers
    def _order(self, stage: int, pass_: str, block: Block) -> tuple:
        """Within a pass, the layer compute needs first goes first; attention, gate, then experts."""
        layer_pos = -block.layer if self._reverse(pass_) else block.layer
        return (layer_pos, {BlockKind.ATTN: 0, BlockKind.GATE: 1, BlockKind.EXPERT: 2}[block.kind])

    def _enqueue(self, phase: str, stage: int, block: Block, pass_: str, key: tuple) -> None:
        if self._available(stage, block):
            return
        for p in PHASES:
            if p != phase and (stage, block) in self.queues[p]:
                if PHASES.index(p) <= PHASES.index(phase):
                    return          # already queued with at least this priority
                self.queues[p].remove(stage, block)
        self.queues[phase].put(stage, block, key, pass_)
        self._puts += 1

    def _wake_if_queued(self, puts_before: int) -> None:
        """Wake the copy engine only for a copy it can start now. An idle engine has emptied
        every queue, so a call that queued nothing gave it nothing: in the executor each
        `on_work` wakes the copy engine's thread, which takes the GIL and the policy's lock
        from the issuing thread for nothing. MoE-S8 on one H200 made 70 such calls a step
        (every gate's and predictor's counts, every backward decision) where 2 queued a copy;
        without them its APTMoE steps went from 1.20x Mobius's in the same runs to 0.95x
        (the median of three runs each, alternated: docs/measured/session35)."""
        if self._puts > puts_before:
            self.on_work()

    def _rank(self, layer: int, pass_: str) -> list[int]:
        """Experts of a layer, most popular first (previous step for forward, this one for backward)."""
        if pass_ == "B" and self.seen.get(layer):
            h = sum(self.seen[layer].values())
        else:
            h = self.history.get(layer)
        if h is None:
            return list(self._experts())
        return sorted(self._experts(), key=lambda e: (-int(h[e]), e))

    def _resident_experts(self, stage: int, layer: int) -> set[int]:
        return {b.expert for (s, b) in self.loaded | self.in_flight
                if s == stage and b.layer == layer and b.kind is BlockKind.EXPERT}

    def _attn_gate_pending(self, stage: int, layer: int) -> bool:
        blocks = [Block.attn(layer)] + ([Block.gate(layer)] if self.model.is_moe else [])
        return any(not self._available(stage, b) for b in blocks)

    # -------------------------------------------------------------- events
    def _last_step_counts(self, stage: int, pass_: str) -> dict[int, list[int]] | None:
        """Per layer of the stage, last step's tokens per expert per micro-batch: what a
        forward's split can go by before its compute begins. None for a backward, without a
        previous step, or where nothing is split."""
        if pass_ != "F" or self.inter_stage_only or not self.model.is_moe \
                or any(layer not in self.history for layer in self.layers[stage]):
            return None
        return {layer: [int(round(x / self.M)) for x in self.history[layer]] for layer in self.layers[stage]}

    def _keeps(self, stage: int, pass_: str) -> bool:
        """Whether a target the next window replaces keeps its experts (those last step's
        counts say the split will load; `stage_load_begins`): a forward whose compute has not
        begun and that no predictor gate has spoken for. Its first layer's gate runs on
        another rank (or not yet), so dropping them leaves each expert to be demanded one by
        one when its input arrives, behind the new window's copies in flight."""
        return pass_ == "F" and (stage, pass_) not in self._begun and stage not in self._predicted

    def _begin(self, stage: int, pass_: str) -> None:
        """The stage's compute reached its blocks in this pass (a gate ran, a block was
        demanded, its backward was placed)."""
        self._begun.add((stage, pass_))

    def stage_load_begins(self, stage: int, pass_: str) -> None:
        # Stage switch: what the previous target did not get falls to the later phases, its
        # attention and gates to inter-layer, its speculative experts dropped; the inter-
        # layer phase (the predictor gate) and demand pick the experts it will compute on
        # the GPU. But at a step's start a rank opens two windows before it computes
        # anything, and the first stage's experts were dropped for the second's: where that
        # rank's first input comes late (a rank of a pipeline), its first forward then
        # waited for every expert one by one (31 ms on an MoE-S stage at 8 GB/s, where
        # Mobius, loading it whole from the start, took 1 ms). So before this step's compute
        # has reached the rank, a target keeps what last step's counts say the split will
        # load (in inter-layer, ahead of this window), or its place in this phase where there
        # are no counts to go by (the first step). The same holds later in a step for any
        # forward target not begun and not predicted (`_keeps`): on 4 GPUs with the link
        # capped, a stage's experts dropped for the backward window's were demanded behind
        # two of its copies, and APTMoE took up to 1.24x Mobius's step.
        q = self.queues["inter-stage"]
        last: dict[tuple[int, str], dict[int, list[int]] | None] = {}
        for (s, block), (key, p) in sorted(q.items.items(), key=lambda kv: kv[1][0]):
            if self._keeps(s, p):
                if (s, p) not in last:
                    last[(s, p)] = self._last_step_counts(s, p)
                if last[(s, p)] is None:
                    continue
            q.remove(s, block)
            if (s, block) in self.required or block.kind is not BlockKind.EXPERT:
                self._enqueue("inter-layer", s, block, p, self._order(s, p, block))
        for (s, _), per_layer in sorted(last.items()):
            for layer, counts in (per_layer or {}).items():
                self._predict(s, layer, 0, counts)       # as a predictor gate would, with all to come
        self._windows += 1
        self._resident_stages.add(stage)
        layers = self.layers[stage]
        if self._reverse(pass_):
            layers = tuple(reversed(layers))
        seq = 0
        for layer in layers:                     # every MHA and gate first
            for b in ([Block.attn(layer)] + ([Block.gate(layer)] if self.model.is_moe else [])):
                self.required.add((stage, b))
                self._enqueue("inter-stage", stage, b, pass_, (self._windows, 0, seq))
                seq += 1
        # Then experts rank by rank across layers: forward by the previous step's popularity,
        # backward by this step's forward (known exactly by now).
        ranks = {layer: self._rank(layer, pass_) for layer in layers}
        for r in range(self.model.num_experts if self.model.is_moe else 1):
            for layer in layers:
                self._enqueue("inter-stage", stage, Block.expert_of(layer, ranks[layer][r]), pass_,
                              (self._windows, 1, r, seq))
                seq += 1
        self.on_work()

    def predicted_counts(self, stage: int, layer: int, mb: int, counts) -> None:
        if self.inter_stage_only or not self.model.is_moe:
            return
        self._predicted.add(stage)
        puts = self._puts
        self._predict(stage, layer, mb, counts)
        self._wake_if_queued(puts)

    def _predict(self, stage: int, layer: int, mb: int, counts) -> None:
        """The layer's experts the split would load for `counts` from micro-batch `mb` on,
        queued in inter-layer (and those no longer wanted dropped from it)."""
        counts = np.asarray(counts, dtype=np.int64).tolist()
        split = split_experts(counts, self.cost, self.model, threads=self.threads,
                              resident=self._resident_experts(stage, layer),
                              load_attn_gate=self._attn_gate_pending(stage, layer),
                              remaining_mbs=self.M - mb, direction="fwd")
        # Revise this layer's inter-layer choice: drop experts no longer predicted hot.
        want = set(split.to_load)
        q = self.queues["inter-layer"]
        for (s, b) in list(q.items):
            if s == stage and b.layer == layer and b.kind is BlockKind.EXPERT and b.expert not in want \
                    and (s, b) not in self.required:
                q.remove(s, b)
        for i, e in enumerate(split.to_load):
            b = Block.expert_of(layer, e)
            self._enqueue("inter-layer", stage, b, "F", self._order(stage, "F", b) + (i,))

    def gate_counts(self, stage: int, layer: int, mb: int, counts) -> Placement:
        self._begin(stage, "F")
        puts = self._puts
        counts_arr = np.asarray(counts, dtype=np.int64)
        self.seen[layer][mb] = counts_arr
        counts = counts_arr.tolist()
        if not self.model.is_moe:
            return Placement((0,), ())
        resident = self._resident_experts(stage, layer)
        if self.inter_stage_only:
            gpu = tuple(e for e in self._experts() if counts[e] > 0 and e in resident)
            cpu = tuple(e for e in self._experts() if counts[e] > 0 and e not in resident)
            placement = Placement(gpu, cpu)
        else:
            split = split_experts(counts, self.cost, self.model, threads=self.threads, resident=resident,
                                  load_attn_gate=False, remaining_mbs=self.M - mb, direction="fwd")
            for i, e in enumerate(split.to_load):
                b = Block.expert_of(layer, e)
                self.required.add((stage, b))
                self._seq += 1
                self._enqueue("inter-expert", stage, b, "F", (self._seq,))
            placement = self._this_micro_batch(counts, split, self.M - mb)
        self.placements[(layer, mb)] = placement
        self._wake_if_queued(puts)
        return placement

    def _this_micro_batch(self, counts: list[int], split: Split, remaining: int) -> Placement:
        """Where this micro-batch's experts run: the split's placement, except that an expert
        it loads whose copy has not started yet runs on the CPU now where the CPU finishes it
        before the copy would land and the GPU run it. Its copy stays queued for the
        micro-batches after this one. The split weighs a load against the CPU time of every
        micro-batch still to come, so an expert it moves to the GPU at a later micro-batch
        (fewer to come, more tokens seen) was not on its way: on 4 GPUs with the link capped
        the micro-batch then waited for the whole copy where the CPU took a third of it."""
        if remaining <= 1 or not split.to_load:
            return Placement(split.gpu, split.cpu)
        load = self._block_load_s[BlockKind.EXPERT]
        cpu_busy = split.cpu_s / remaining             # the split's CPU tail, this micro-batch's share
        now = []
        # The last to land first: the copies keep their order (the earliest lands after one
        # load). Each before it lands a load sooner with at least as many tokens, so where one
        # does not fit, none before it does.
        for i in reversed(range(len(split.to_load))):
            e = split.to_load[i]
            cpu_e = self.cost.cpu_expert_s(counts[e], "fwd", self.threads)
            if cpu_busy + cpu_e > (i + 1) * load + self.cost.gpu_s("e", counts[e], "fwd"):
                break
            now.append(e)
            cpu_busy += cpu_e
        if not now:
            return Placement(split.gpu, split.cpu)
        return Placement(tuple(e for e in split.gpu if e not in now), split.cpu + tuple(reversed(now)))

    def _decide_backward(self, stage: int) -> None:
        """Fix every layer's backward placement once, when the stage's backward begins.

        Deciding at the last moment lets the split count what the inter-stage phase has
        already brought (resident experts cost no load); experts placed on the CPU leave
        the queues, experts placed on the GPU that are still missing go to inter-expert.
        """
        if stage in self._bwd:
            return
        self._begin(stage, "B")
        puts = self._puts
        out = {}
        budget = self._cpu_slack(stage)
        for layer in self.layers[stage]:
            seen = self.seen.get(layer, {})
            total = sum(seen.values()) if seen else np.zeros(self.model.num_experts, dtype=np.int64)
            counts = np.asarray(total, dtype=np.int64).tolist()
            if not self.model.is_moe:
                out[layer] = Placement((0,), ())
                continue
            split = split_experts(counts, self.cost, self.model, threads=self.threads,
                                  resident=self._resident_experts(stage, layer),
                                  load_attn_gate=self._attn_gate_pending(stage, layer),
                                  remaining_mbs=1, direction="bwd", max_cpu_s=max(0.0, budget))
            budget -= split.cpu_s
            out[layer] = Placement(split.gpu, split.cpu)
            self.required.update((stage, Block.expert_of(layer, e)) for e in split.gpu)
            for e in set(self._experts()) - set(split.gpu):      # CPU experts, and those without tokens
                for q in self.queues.values():
                    q.remove(stage, Block.expert_of(layer, e))
            for e in split.to_load:
                b = Block.expert_of(layer, e)
                self.required.add((stage, b))
                self._seq += 1
                self._enqueue("inter-expert", stage, b, "B", (self._seq,))
        self._bwd[stage] = out
        self._wake_if_queued(puts)

    # -------------------------------------------------------------- the CPU's slack in the backward
    def adam_done(self, num_params: int) -> None:
        # counted in the cost model's seconds, as the Adam still owed is: what the chunk
        # really took is the CPU's business, what is left of the stages' Adam is this
        self.adam_done_s += self.cost.adam_cpu_s(num_params, self.threads)

    def _adam_s(self, stage: int) -> float:
        """The CPU Adam of a stage's blocks, chunk by chunk as the back-ends run it (the same
        every step: computed once)."""
        if stage not in self._adam_by_stage:
            m = self.model
            self._adam_by_stage[stage] = sum(
                self.cost.adam_cpu_s(hi - lo, self.threads) for b in self.stage_blocks(stage)
                for lo, hi in adam_chunks(m.block_bytes(b.kind.value) // m.dtype_bytes))
        return self._adam_by_stage[stage]

    def _backward_gpu_s(self, stage: int) -> float:
        """What a stage's backward still takes on its link and GPU with every expert there:
        the loads of its blocks not yet on the GPU, and its blocks' kernels (or the host's
        time to issue them) for this step's tokens, with the recompute where the plan has one
        (once per stage and step: its forward, and so its tokens, are over by its backward)."""
        m, c = self.model, self.cost
        load = sum(self._block_load_s[b.kind] for b in self.stage_blocks(stage) if not self._available(stage, b))
        if stage not in self._kernels_by_stage:
            # by token count, each count once: a stage sees every micro-batch's counts (256
            # micro-batches of 16 experts per layer in the simulator's largest bench case)
            uses: dict[tuple[str, int], int] = defaultdict(int)
            for layer in self.layers[stage]:
                for counts in self.seen.get(layer, {}).values():
                    tokens = int(counts.sum()) // max(1, m.top_k)
                    if tokens:
                        uses[("a", tokens)] += 1
                        uses[("g", tokens)] += 1
                    for n in counts[counts > 0].tolist():
                        uses[("e", n)] += 1
            kernels = 0.0
            for d in ("bwd",) if self.plan.recompute == "none" else ("bwd", "fwd"):
                host = {k: c.host_s(k, d) for k in ("a", "g", "e")}
                kernels += sum(times * max(c.gpu_s(k, n, d), host[k]) for (k, n), times in uses.items())
            self._kernels_by_stage[stage] = kernels
        return load + self._kernels_by_stage[stage]

    def _cpu_slack(self, stage: int) -> float:
        """CPU time the backward's experts of `stage` may take without ending the step later.

        From here the CPU must still run the Adam of the stages whose backward is over (less
        what it has done) and that of this stage and the ones after it in the backward; the
        GPU must run those stages' backwards, and the last one's Adam follows it on the CPU.
        When the first is the longer, the CPU is the step's tail (natively, CPU Adam is:
        docs/validation-h200-v5) and every expert placed on it ends the step that much later,
        so the split keeps the experts on the GPU; otherwise the stage's CPU experts may take
        the difference between them (paper Eq. 1 weighs the CPU as if it were free)."""
        todo = [s for s in self.layers if s <= stage]           # the backward runs stages last to first
        owed = max(0.0, sum(self._adam_s(s) for s in self.layers if s > stage) - self.adam_done_s)
        cpu = owed + sum(self._adam_s(s) for s in todo)
        gpu = sum(self._backward_gpu_s(s) for s in todo) + self._adam_s(min(todo))
        return gpu - cpu

    def backward_placement(self, stage: int, layer: int) -> Placement:
        self._decide_backward(stage)
        return self._bwd[stage][layer]

    def backward_decided(self, stage: int) -> bool:
        return stage in self._bwd

    def forward_placement(self, layer: int, mb: int) -> Placement | None:
        """Where the forward of (layer, mb) ran this step: CPU experts kept their activations
        in host memory, so a recompute need not run them again."""
        return self.placements.get((layer, mb))

    def require(self, stage: int, pass_: str, block: Block) -> None:
        self._begin(stage, pass_)
        if not self._available(stage, block):
            self.required.add((stage, block))
            self._seq += 1
            puts = self._puts
            self._enqueue("inter-expert", stage, block, pass_, (-1, self._seq))
            self._wake_if_queued(puts)

    def next_copy(self) -> Copy | None:
        for phase in PHASES:
            q = self.queues[phase]
            while (item := q.pop()) is not None:
                stage, block, pass_ = item
                if stage in self._resident_stages and not self._available(stage, block):
                    return self._launch(stage, block, pass_, phase)
        return None

    def stage_dropped(self, stage: int) -> None:
        super().stage_dropped(stage)
        for q in self.queues.values():
            for (s, b) in [k for k in q.items if k[0] == stage]:
                q.remove(s, b)
        self.required = {k for k in self.required if k[0] != stage}
        self._bwd.pop(stage, None)

    def cpu_expert_ran(self, tokens: int, direction: str, seconds: float) -> None:
        self.cost.observe(tokens, direction, self.threads, seconds)

    def prime_history(self, layer_totals) -> None:
        self.history = {layer: np.asarray(layer_totals[layer]) for layer in range(len(layer_totals))}

    def end_iteration(self) -> None:
        super().end_iteration()
        self.adam_done_s = 0.0
        self._kernels_by_stage.clear()
        self._begun.clear()
        self._predicted.clear()
        self.history = {layer: sum(mbs.values()) for layer, mbs in self.seen.items() if mbs}
        self.seen.clear()
        self._bwd.clear()
        self.placements.clear()
        self.required.clear()
        for q in self.queues.values():
            q.drain()


def make_policy(plan: Plan, rank: int, model: ModelConfig, cost: CostSource | None, *,
                threads: int) -> LoadingPolicy | None:
    """The plan's policy for one rank; None for resident plans (GPipe loads nothing)."""
    if plan.policy == "resident":
        return None
    if plan.policy == "stage":
        return StagePolicy(plan, rank, model)
    if plan.policy == "aptmoe":
        if cost is None:
            raise ValueError("the APTMoE policy needs a cost source to split experts")
        return AptmoePolicy(plan, rank, model, cost, threads=threads, inter_stage_only=plan.inter_stage_only)
    raise ValueError(f"plan policy {plan.policy!r} is unknown")
