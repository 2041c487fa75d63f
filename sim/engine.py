"""The discrete-event model of one training step, walking the shared plan.

One `RankModel` per GPU holds its active components as SimPy processes (compute stream,
load program, copy engine, offload stream, CPU stream, network stream), started in
`__init__`, after SimPy's own examples. Each plan action waits for its stream predecessor
and its explicit dependencies, holds its resource for the calibrated duration, and records
a trace event named ``str(action)``. Which block to copy next and which experts run on the
CPU are asked of the same loading-policy object the executor uses (`aptmoe.policy`): the
simulator has no decision logic of its own.

Steps are simulated one at a time from an idle machine (the executor synchronises all
ranks between steps too). The policy's history of the previous step's popularity is primed
from the popularity model, which is exactly what warm-up steps would leave behind, so
warm-up steps cost no simulation time.
"""

from __future__ import annotations

import logging
from collections import defaultdict, deque
from contextlib import nullcontext
from dataclasses import dataclass, field

import simpy
from aptmoe.sim.host_memory import HostMemory
from aptmoe.sim.issuing import HostExperts, IssuingThread
from aptmoe.sim.links import CopyConditions, SharedRoot

from aptmoe.config import RunConfig
from aptmoe.costs import (ACTION_PARTS, BETWEEN_PASSES, BLOCK_KINDS, DIRECTIONS, MESSAGE_POSTS, CostSource,
                          SharedLinkView, adam_bytes, cpu_expert_bytes)
from aptmoe.memory import MemoryModel, adam_chunks
from aptmoe.plan.actions import RECEIVES, Action, Block, BlockKind, Kind
from aptmoe.plan.plan import Plan
from aptmoe.policy import Copy, make_policy
from aptmoe.policy_timing import WalkCalls
from aptmoe.popularity import IterationCounts
from aptmoe.replayed_placements import ReplayedPolicy, RunPlacements
from aptmoe.stage_walk import (
    RunBlocks,
    RunExperts,
    Step,
    backward_placement,
    backward_walk,
    forward_walk,
)
from aptmoe.trace import CPU_JOB_PHASES, Trace

log = logging.getLogger(__name__)


CPU_EXPERT_PRIORITY = 0     # lower value first (simpy.PriorityResource)
CPU_UPDATE_PRIORITY = 1
_ALONE = dict.fromkeys(BLOCK_KINDS, 1.0)        # every kind at its time alone (no receive waiting)


def _host_us(host_s: float | None) -> dict:
    """A predicted block call's host time as the executor writes it into its events (`host_us`,
    exec/runtime.py), so that what reads the measured calls (sim/host_calls.py, aptmoe.own_work)
    reads the model's the same way; nothing where the profile has no host cost."""
    return {} if host_s is None else {"host_us": round(host_s * 1e6, 1)}


class OutOfMemory(Exception):
    # SimPy re-raises a process's exception as type(e)(*e.args): keep every field in args.
    def __init__(self, rank: int, stage: int, need: int, capacity: int, what: str) -> None:
        super().__init__(rank, stage, need, capacity, what)
        self.rank, self.stage, self.need, self.capacity, self.what = rank, stage, need, capacity, what

    def __str__(self) -> str:
        return (f"rank {self.rank} out of GPU memory at stage {self.stage} ({self.what}): "
                f"{self.need / 1e9:.2f} GB needed, {self.capacity / 1e9:.2f} GB available")


class SimulationError(RuntimeError):
    pass


@dataclass
class StepStats:
    """Counters of one simulated step (plain attributes, read after env.run())."""

    step_s: float = 0.0
    busy_s: dict[str, list[float]] = field(default_factory=dict)     # resource -> per rank
    bytes: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    peak_gpu_bytes: list[int] = field(default_factory=list)
    expert_tokens_gpu: int = 0
    expert_tokens_cpu: int = 0
    copies_by_phase: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    bytes_by_phase: dict[str, int] = field(default_factory=lambda: defaultdict(int))


class StepModel:
    """One training step of the whole machine; its APTMoE policies decide with `decide`
    (default: `cost`, what the step is timed with)."""

    def __init__(self, cfg: RunConfig, plan: Plan, cost: CostSource, counts: IterationCounts,
                 history, trace: Trace | None, t0: float, decide: CostSource | None = None,
                 replay: tuple[RunPlacements, int] | None = None) -> None:
        self.cfg, self.plan, self.cost, self.counts = cfg, plan, cost, counts
        self.trace, self.t0 = trace, t0
        self.env = simpy.Environment()
        self.done = {a: self.env.event() for _, _, a in plan.actions()}
        self.mem = MemoryModel(cfg.model, cfg.tokens_per_micro_batch, cfg.micro_batch_size)
        c = cfg.cluster
        sockets = sorted({c.socket_of(r) for r in range(plan.num_ranks)})
        self.h2d_roots = {s: SharedRoot(self.env, lambda n: cost.root_GBps(n, "h2d"), f"socket{s}.h2d")
                          for s in sockets}
        self.d2h_roots = {s: SharedRoot(self.env, lambda n: cost.root_GBps(n, "d2h"), f"socket{s}.d2h")
                          for s in sockets}
        # A socket's memory, shared by its ranks' CPU work and its GPUs' copies (where measured)
        shared = cost.memory_share(c.worker_cores)
        self.host_memory = {s: HostMemory(self.env, shared, [self.h2d_roots[s], self.d2h_roots[s]])
                            for s in sockets} if shared else {}
        # ... which also slows the copies: a GPU's both ways at once, and beside its ranks' Adam
        limits = cost.copy_limits(c.worker_cores)
        self.copy_conditions = {s: CopyConditions(limits, self.h2d_roots[s], self.d2h_roots[s])
                                for s in sockets} if limits else {}
        # the CPU experts computing on each socket: they slow every issuing thread of its ranks
        # (the x2 VM is one socket: its two ranks' experts slowed each other's issuing threads)
        self.host_experts = {s: HostExperts() for s in sockets}
        policy_cost = SharedLinkView(cost if decide is None else decide, c.gpus_per_socket)
        self.ranks = [RankModel(self, r, self._policy(r, policy_cost, replay), history)
                      for r in range(plan.num_ranks)]

    def _policy(self, rank: int, cost: CostSource, replay: tuple[RunPlacements, int] | None):
        """The rank's loading policy; with `replay` (a run's placements, this step's index) it
        places experts where the run did (aptmoe/replayed_placements.py)."""
        policy = make_policy(self.plan, rank, self.cfg.model, cost, threads=self.cfg.cluster.worker_cores)
        if replay is None or policy is None or self.plan.policy != "aptmoe":
            return policy
        return ReplayedPolicy(policy, replay[0], rank, replay[1])

    def run(self) -> StepStats:
        self.env.run()
        missing = [a for a, ev in self.done.items() if not ev.triggered]
        if missing:
            raise SimulationError(f"the step stalled with {len(missing)} actions undone, e.g. "
                                  + ", ".join(map(str, sorted(missing)[:5])))
        for r in self.ranks:
            # Every byte a step allocates it frees again: a mismatch is an accounting bug.
            if r.used != r.base_used:
                raise SimulationError(f"rank {r.rank} ends the step with {r.used - r.base_used} bytes of "
                                      "GPU memory unaccounted for")
        st = StepStats(step_s=self.env.now)
        for name in ("compute", "cpu", "h2d", "d2h", "net"):
            st.busy_s[name] = [r.busy[name] for r in self.ranks]
        for r in self.ranks:
            st.peak_gpu_bytes.append(r.peak)
            st.expert_tokens_gpu += r.expert_tokens["gpu"]
            st.expert_tokens_cpu += r.expert_tokens["cpu"]
            for k, v in r.bytes.items():
                st.bytes[k] += v
            if r.policy is not None:
                for k, v in r.policy.copies_by_phase.items():
                    st.copies_by_phase[k] += v
                for k, v in r.policy.bytes_by_phase.items():
                    st.bytes_by_phase[k] += v
        return st


class RankModel:
    """One GPU with its host link, its share of CPU cores and its network port."""

    def __init__(self, step: StepModel, rank: int, policy, history) -> None:
        self.step, self.rank, self.policy = step, rank, policy
        self.env, self.cost, self.cfg, self.plan = step.env, step.cost, step.cfg, step.plan
        c = self.cfg.cluster
        self.h2d_root = step.h2d_roots[c.socket_of(rank)]
        self.d2h_root = step.d2h_roots[c.socket_of(rank)]
        self.host_memory = step.host_memory.get(c.socket_of(rank))
        self.copy_conditions = step.copy_conditions.get(c.socket_of(rank))
        self.h2d_link, self.d2h_link = self.cost.h2d(), self.cost.d2h()
        self.threads = c.worker_cores          # the CPU experts' and Adam's cores
        # The rank's cores run one job at a time; expert work goes before optimizer chunks.
        self.cpu = simpy.PriorityResource(self.env, 1)
        self.egress = simpy.Resource(self.env, 1)       # its network port, one send at a time
        self.T = self.cfg.tokens_per_micro_batch
        self.layers = {st.index: st.layers for st in self.plan.stages}
        self.busy: dict[str, float] = defaultdict(float)
        self.bytes: dict[str, float] = defaultdict(float)
        self.expert_tokens = {"gpu": 0, "cpu": 0}
        self.used = 0
        self.peak = 0
        self.stage_bytes: dict[int, int] = defaultdict(int)     # loaded or loading, per stage
        self.inflight_bytes: dict[int, int] = defaultdict(int)  # of which still on the link
        self.grad_bytes: dict[int, int] = defaultdict(int)
        self.grad_blocks: dict[int, dict[Block, int]] = defaultdict(dict)   # GPU gradients per stage
        self.grad_home: dict[tuple[int, Block], simpy.Event] = {}          # a block's gradient is on the host
        self.ready: dict[tuple[int, Block], simpy.Event] = {}
        self._work: simpy.Event | None = None
        # The host thread that issues the compute stream's blocks, as a second clock (_issue).
        self.host_t = self.env.now
        # the issuing thread runs at most `reach` blocks ahead of the GPU: the latest blocks' ends
        self.reach = self.cfg.schedule.ahead_blocks
        self.block_ends: deque[float] = deque()
        self.runs_ahead = self.cost.host_runs_ahead()
        # What runs beside that thread slows it (GPU ranks; on CPU ranks it computes too)
        self.issuing = IssuingThread(self.cost.issue_tolls() if self.runs_ahead else None,
                                     capped=c.link_bandwidth_GBps is not None, rank=rank,
                                     host=step.host_experts[c.socket_of(rank)])
        # A CPU job's thread wakes beyond its copies and experts (calibration/cpu_jobs.py)
        self.cpu_job = self.cost.cpu_job()
        # A capped copy is seen to have landed late, the link free meanwhile (calibration/pacer.py)
        self.pacer_late = self.cost.pacer_late_s() if c.link_bandwidth_GBps is not None else 0.0
        # A receive is posted when the rank's net program reaches it, ahead of the send that
        # feeds it, and waits on the GPU till then; kernels beside it run `recv_slowdown`
        # times their time alone (_issue; calibration/p2p.py, docs/validation-h200-2gpu)
        receives = any(a.kind in RECEIVES for p in self.plan.programs[rank].values() for a in p)
        self.recv_slowdown = {k: self.cost.recv_slowdown(k) for k in BLOCK_KINDS} if receives else _ALONE
        self.recvs_waiting = 0
        # The issuing thread posts the sends of what it computed, and the receives its next action
        # needs that the net thread has not reached yet (exec/runtime.py `_post_through`): each
        # costs it `post_s` of host time (Dispatch.post; 0 where not measured)
        self.post = {m: self.cost.post_s(m) for m in MESSAGE_POSTS}
        self.sends_after = self.plan.sends_by_producer(rank)          # a compute action -> the sends it posts
        self.own_recvs = {n for n in self.plan.programs[rank].get("net", []) if n.kind in RECEIVES}
        self.recvs_reached: set[Action] = set()                     # by the net program
        self.inbound: dict[Action, list[simpy.Event]] = {}     # a compute action's messages, on a GPU
        self.host_free = not any([self.cost.host_s(k, d) for k in BLOCK_KINDS for d in DIRECTIONS]
                                 + [self.cost.between_s(d) for d in BETWEEN_PASSES]
                                 + [self.cost.action_s(d, p) for d in BETWEEN_PASSES for p in ACTION_PARTS])
        self.last_stage = len(self.plan.stages) - 1
        self.handlers = {
            Kind.FWD: self._forward, Kind.BWD: self._backward, Kind.DROP_F: self._drop,
            Kind.DROP_B: self._drop, Kind.LOAD_F: self._open_window, Kind.LOAD_B: self._open_window,
            Kind.OFFLOAD: self._offload, Kind.UPDATE: self._update, Kind.SEND_F: self._send,
            Kind.SEND_B: self._send, Kind.RECV_F: self._recv, Kind.RECV_B: self._recv,
        }
        if self.plan.resident:
            for s in self.plan.stages_of(rank):
                ly = self.layers[s]
                self._alloc(s, step.mem.param_bytes(ly) + step.mem.adam_bytes(ly)
                            + (0 if self.plan.fwd_only else step.mem.grad_bytes(ly)), "resident parameters")
        self.base_used = self.used            # what stays allocated between steps
        # The policy as the stage walks ask it: each answer costs the issuing thread its host
        # seconds (Profile.policy_host), charged before the step it leads to (`_pay_policy`)
        self.policy_owed = 0.0
        self.walk_policy = None if policy is None else WalkCalls(policy, self.layers, self._charged)
        if policy is not None:
            policy.on_work = self._poke
            if history is not None:
                policy.prime_history(history)
            self.env.process(self._copy_engine())
        for stream, program in self.plan.programs[rank].items():
            if program:
                self.env.process(self._walk(stream, program))

    # ------------------------------------------------------------------ plumbing
    def _record(self, name: str, stream: str, start: float, cat: str, **args) -> None:
        tr = self.step.trace
        if tr is not None:
            tr.add(name, self.rank, stream, self.step.t0 + start, self.step.t0 + self.env.now, cat, **args)

    def _alloc(self, stage: int, nbytes: int, what: str) -> None:
        self.used += nbytes
        if self.used > self.cfg.cluster.gpu_memory_bytes:
            raise OutOfMemory(self.rank, stage, self.used, self.cfg.cluster.gpu_memory_bytes, what)
        self.peak = max(self.peak, self.used)

    def _free(self, nbytes: int) -> None:
        self.used -= nbytes

    def _walk(self, stream: str, program: list[Action]):
        for a in program:
            receive = a.kind in RECEIVES
            if receive:                      # posted: it waits for the peer's send (its dep)
                self.recvs_waiting += 1
                self.recvs_reached.add(a)
                posted = self.env.now
            # Waiting on events that have already fired changes nothing but costs an event.
            deps = [(d, ev) for d in self.plan.deps_of(a) if not (ev := self.step.done[d]).processed]
            if self.runs_ahead and a.kind in (Kind.FWD, Kind.BWD):
                # On a GPU a message is waited for on the stream where it is used, not by the
                # host (exec/runtime.py: NCCL's recv returns once posted; `_stage_input` and
                # `_output_grad` make the compute stream wait): the host issues on, and a
                # backward's recompute runs while its gradient is still on the way. Until
                # session 22 the action waited for it first: GPipe's first backward on the
                # first stage then recomputed after the gradient came, not before (M8 G0.45,
                # 2 x H200: it ended 24 ms late, and the step was +5.9%; +1.8% since).
                self.inbound[a] = [ev for d, ev in deps if d.kind in RECEIVES]
                deps = [(d, ev) for d, ev in deps if d.kind not in RECEIVES]
            if deps:
                yield self.env.all_of([ev for _, ev in deps])
                if stream == "compute":
                    self._host_waited()
            if receive:
                self.recvs_waiting -= 1
                self._record(str(a), "net", posted, "recv")
            if stream == "compute" and self.post["recv"]:
                mine = [d for d in self.plan.deps_of(a) if d in self.own_recvs and d not in self.recvs_reached]
                self.recvs_reached.update(mine)
                yield from self._posting(len(mine) * self.post["recv"])
            yield from self.handlers[a.kind](a)
            self.step.done[a].succeed()
            if stream == "compute" and a in self.sends_after:
                yield from self._posting(len(self.sends_after[a]) * self.post["send"])

    def _posting(self, seconds: float):
        """The issuing thread posts messages for `seconds`: on a GPU its clock moves, on CPU
        ranks the compute stream waits, as its one thread does."""
        if seconds <= 0:
            return
        if self.runs_ahead:
            self.host_t += seconds
        else:
            yield self.env.timeout(seconds)

    def _hold(self, seconds: float, resource: str = "compute"):
        self.busy[resource] += seconds
        return self.env.timeout(seconds)

    def _cpu_work(self, seconds: float, nbytes: int, shared_slowdown: float = 1.0, expert: bool = False):
        """A CPU job of `seconds` alone, streaming `nbytes` of host memory: longer while the
        links' copies take their share of it, and an Adam chunk (`shared_slowdown`) while
        another rank updates too (sim/host_memory.py). `expert`: a CPU expert, not Adam."""
        start = self.env.now
        with self.issuing.cpu_job(seconds, expert):
            if self.host_memory is None:
                yield self.env.timeout(seconds)
            else:
                yield from self.host_memory.work(seconds, nbytes, shared_slowdown)
        self.busy["cpu"] += self.env.now - start

    # ------------------------------------------------------------------ loading
    def _transfer(self, direction: str, nbytes: int, thread: str | None = None):
        """The bytes of one copy of `nbytes` on this rank's link in `direction` ("h2d" or
        "d2h"), sharing its socket's root. The thread that waits for it wakes the issuing
        thread's toll (`thread`: "engine", the copy engine, or "offload", the offload thread;
        None for the CPU experts' activations, whose job pays for them)."""
        root, link = (self.h2d_root, self.h2d_link) if direction == "h2d" else (self.d2h_root, self.d2h_link)
        with self.issuing.copy(nbytes, link.time_s(nbytes), engine=thread == "engine") if thread else nullcontext():
            yield from root.transfer(nbytes, link.GBps, link.latency_s, group=self.rank)

    def _copy(self, direction: str, nbytes: int, thread: str | None = None):
        """One copy, waited for: on a capped link its waiter hears it has landed late, the link
        free meanwhile (exec/link.py's pacing thread)."""
        yield from self._transfer(direction, nbytes, thread)
        if self.pacer_late > 0:
            yield self.env.timeout(self.pacer_late)

    def _landing(self, event: simpy.Event, at: float) -> None:
        """`event` succeeds at time `at` (now, if that has passed)."""
        if at <= self.env.now:
            event.succeed()
            return

        def later():
            yield self.env.timeout(at - self.env.now)
            event.succeed()
        self.env.process(later())

    def _poke(self) -> None:
        if self._work is not None and not self._work.triggered:
            self._work.succeed()

    def _open_window(self, a: Action):
        self.policy.stage_load_begins(a.stage, "B" if a.kind is Kind.LOAD_B else "F")
        self._record(str(a), "load", self.env.now, "marker")
        yield from ()

    def _copy_engine(self):
        """Keeps up to `max_copies_in_flight` copies launched; a launched copy runs to the end.
        Launched copies go over the link one after another, each as soon as the one before
        it has passed; the engine hears of each landing `pacer_late` after its bytes."""
        launched: deque[tuple[Copy, simpy.Event]] = deque()
        k = self.cfg.schedule.max_copies_in_flight
        lane: simpy.Event | None = None          # the bytes of the last copy launched have passed
        while True:
            while len(launched) < k and (c := self.policy.next_copy()) is not None:
                self._alloc(c.stage, c.nbytes, f"loading {c.block}")
                self.stage_bytes[c.stage] += c.nbytes
                self.inflight_bytes[c.stage] += c.nbytes
                passed, landed = self.env.event(), self.env.event()
                self.env.process(self._load(c, lane, passed, landed))
                lane = passed
                launched.append((c, landed))
            if not launched:
                self._work = self.env.event()
                yield self._work
                continue
            c, landed = launched[0]
            yield landed
            launched.popleft()
            open_ = self.policy.window_open(c.stage)
            self.policy.copy_finished(c)
            self.inflight_bytes[c.stage] -= c.nbytes
            if not open_:                       # its stage was dropped meanwhile: discard
                self.stage_bytes[c.stage] -= c.nbytes
                self._free(c.nbytes)
            ev = self.ready.pop((c.stage, c.block), None)
            if ev is not None:
                ev.succeed()

    def _load(self, c: Copy, after: simpy.Event | None, passed: simpy.Event, landed: simpy.Event):
        """One launched load: its bytes once the copy launched before it has passed, then
        `landed` when the engine hears of it. Its trace event spans its bytes, as the
        executor's markers on the load stream do."""
        if after is not None and not after.processed:
            yield after
        start = self.env.now
        yield from self._transfer("h2d", c.nbytes, "engine")
        self.busy["h2d"] += self.env.now - start
        self.bytes["h2d"] += c.nbytes
        self._record(str(c.action), "load", start, f"load-{c.phase}", bytes=c.nbytes,
                     layer=c.block.layer, phase=c.phase)
        passed.succeed()
        self._landing(landed, self.env.now + self.pacer_late)

    def _use(self, stage: int, pass_: str, block: Block):
        """Wait until a block is on the GPU, asking for it first if nobody has."""
        if self.policy is None or self.policy.is_loaded(stage, block):
            return
        ev = self.ready.get((stage, block))
        if ev is None:
            ev = self.ready[(stage, block)] = self.env.event()
        self.policy.require(stage, pass_, block)
        yield ev
        self._host_waited()

    # ------------------------------------------------------------------ compute
    def _gpu_experts(self, stage: int, pass_: str, layer: int, experts, counts, direction: str, label: Action,
                     cat: str):
        """Run the GPU experts in arrival order; consecutive ready experts are issued as one run."""
        pending = list(experts)
        while pending:
            ready = [e for e in pending if self.policy is None or self.policy.is_loaded(stage, Block.expert_of(layer, e))]
            if not ready:
                waits = []
                for e in pending:
                    b = Block.expert_of(layer, e)
                    waits.append(self.ready.get((stage, b)) or self.ready.setdefault((stage, b), self.env.event()))
                    self.policy.require(stage, pass_, b)
                yield self.env.any_of(waits)
                self._host_waited()
                continue

            def ran(i: int, t: float, d: float, h: float | None, ready=ready):
                if self.step.trace is not None:
                    e = ready[i]
                    self.step.trace.add(str(label.at(Block.expert_of(layer, e))), self.rank, "compute",
                                        self.step.t0 + t, self.step.t0 + t + d, cat,
                                        layer=layer, experts=[e], tokens=int(counts[e]), **_host_us(h))
            yield from self._issue([("e", int(counts[e]), direction) for e in ready], ran)
            self.expert_tokens["gpu"] += int(sum(counts[e] for e in ready))
            pending = [e for e in pending if e not in ready]

    def _cpu_experts(self, label: Action, layer: int, experts, counts, direction: str, cat: str):
        """Experts on the CPU from host memory: tokens down, compute, results up."""
        tokens = int(sum(counts[e] for e in experts))
        act_bytes = tokens * self.cfg.model.embedding_dim * self.cfg.model.dtype_bytes
        lat = self.cpu_job
        at = {"submitted": self.env.now}
        if lat is not None:                 # the worker wakes to take it (and its inputs are computed)
            yield self.env.timeout(lat.take_s)
        at["taken"] = self.env.now
        yield from self._copy("d2h", act_bytes)
        if lat is not None:
            yield self.env.timeout(lat.down_s)
        at["down"] = self.env.now
        with self.cpu.request(priority=CPU_EXPERT_PRIORITY) as req:
            yield req
            at["began"] = self.env.now
            for e in experts:
                start = self.env.now
                n, m = int(counts[e]), self.cfg.model
                yield from self._cpu_work(self.cost.cpu_expert_s(n, direction, self.threads),
                                          cpu_expert_bytes(m.embedding_dim, m.hidden_dim, m.dtype_bytes, n, direction),
                                          expert=True)
                # the policy hears what the CPU took, as in the executor (here: the model itself)
                self.policy.cpu_expert_ran(n, direction, self.env.now - start)
                self._record(str(label.at(Block.expert_of(layer, e))), "cpu", start, cat,
                             layer=layer, experts=[e], tokens=int(counts[e]))
            at["computed"] = self.env.now
        yield from self._copy("h2d", act_bytes)
        if lat is not None:
            yield self.env.timeout(lat.up_s)
        # the same phases as the executor's (trace.CPU_JOB_PHASES), each by its own length: here
        # the copy down comes before the wait for the CPU, and the inputs are ready when taken
        us = {"queue": at["taken"] - at["submitted"] + at["began"] - at["down"], "ready": 0.0,
              "down": at["down"] - at["taken"],
              "compute": at["computed"] - at["began"], "up": self.env.now - at["computed"]}
        self._record(f"{label}@{layer}:cpu", "cpu-jobs", at["submitted"], "cpu-job", layer=layer, experts=list(experts),
                     tokens=tokens, of=cat, **{f"{k}_us": round(us[k] * 1e6, 1) for k in CPU_JOB_PHASES})
        self.bytes["h2d"] += act_bytes
        self.bytes["d2h"] += act_bytes
        self.expert_tokens["cpu"] += tokens

    def _blocks(self, a: Action, pass_: str, blocks: list[Block], tokens: int, direction: str, cat: str):
        """Run blocks back to back; those already on the GPU are issued as one run, with no
        wait for a load between them."""
        i = 0
        while i < len(blocks):
            yield from self._use(a.stage, pass_, blocks[i])
            j = i + 1
            while j < len(blocks) and (self.policy is None or self.policy.is_loaded(a.stage, blocks[j])):
                j += 1
            run = blocks[i:j]

            def ran(n: int, t: float, d: float, h: float | None, run=run):
                if self.step.trace is not None:
                    self.step.trace.add(str(a.at(run[n])), self.rank, "compute", self.step.t0 + t,
                                        self.step.t0 + t + d, cat, layer=run[n].layer, **_host_us(h))
            yield from self._issue([(b.kind.value, tokens, direction) for b in run], ran)
            i = j

    def _run(self, a: Action, step: Step):
        """One step of a stage's pass (aptmoe.stage_walk), as the hardware would run it."""
        if isinstance(step, RunBlocks):
            yield from self._blocks(a, step.pass_, list(step.blocks), self.T, step.direction, step.cat)
            return
        # a layer's routing before its experts and its combine after them; a recompute's where
        # the profile measured it apart (else the backward's figure holds it)
        if step.cat == "recompute":
            combine = 0.0
            yield from self._between(self.cost.between_s("rec"))
        else:
            combine = self.cost.combine_s(step.direction)
            yield from self._between(self.cost.between_s(step.direction) - combine)
        if step.direction == "bwd":
            yield from self._glue(step)          # the output gradient split among the experts
        cpu = None
        if step.cpu:
            cat = "recompute" if step.cat == "recompute" else "cpu-expert"
            cpu = self.env.process(self._cpu_experts(a, step.layer, step.cpu, step.counts, step.direction, cat))
        yield from self._gpu_experts(a.stage, step.pass_, step.layer, step.gpu, step.counts, step.direction, a,
                                     step.cat)
        if cpu is not None:
            waits = cpu.is_alive            # a job done by now is no wake: its result is there
            yield cpu
            self._host_waited()
            if waits and self.cpu_job is not None:
                self.host_t += self.cpu_job.resume_s
        yield from self._between(combine)
        if step.direction == "fwd":
            yield from self._glue(step)          # the experts' outputs combined (a recompute's too)

    def _glue(self, step):
        """A layer's GPU work outside its blocks (`CostSource.glue_gpu_s`), on the compute
        stream once the host has issued it (its host time is `between_s`'s). Not an event:
        the executor's trace has none for it either, and its blocks' spans leave it out.
        On CPU ranks (no host running ahead) the dispatch probe's host time holds it."""
        if not self.runs_ahead or not self.cfg.model.is_moe:
            return
        yield from self._gpu_outside(self.cost.glue_gpu_s(self.T * self.cfg.model.top_k, step.direction))

    def _gpu_outside(self, g: float):
        """`g` seconds of GPU work outside the blocks, on the compute stream once the host has
        issued it (its host time is already on the host's clock)."""
        if g > 0:
            yield self.env.timeout(max(self.env.now + g, self.host_t) - self.env.now)

    # ------------------------------------------------------------------ the issuing host
    def _host_waited(self) -> None:
        """The host thread waited (for weights, a message, the CPU's experts) until now."""
        self.host_t = max(self.host_t, self.env.now)

    def _issue(self, work: list[tuple[str, int, str]], record):
        """Run blocks (kind, tokens, direction) issued back to back on the compute stream,
        each held for its duration; `record(i, start, seconds, host_s)` hears each as it ends
        (host_s: the host time of its call, None without a measured host cost).

        The host is a second clock: a block's kernels end no sooner than the host has issued
        them (host_t advances by `host_s` per block) and no sooner than the GPU gets through
        them (`gpu_s`); and the host issues no block until the GPU has finished the one
        `ahead_blocks` before it (ScheduleConfig: a marker record once blocked in a full
        driver queue with the GIL held; in the paper's regime on two H200s this took Mobius's
        prediction from -5.1% to -3.0% of a bounded run). On a GPU the host issues the next
        block while the GPU runs this one, so a stream of big blocks hides the host and a
        stream of small ones waits for it; on CPU ranks issuing and computing are one thread,
        so a block takes both, one after the other: the host cost was measured on a model too
        small to compute (calibration/dispatch.py), so it is the Python around the call, not
        the arithmetic. (It was the
        longer of the two until session 6: the CPU validation's blocks then ran 32-50% over
        their prediction even with nothing beside them, and 3% under to 12% over with both.)
        Without a measured host cost (host_s 0) each block takes its kernel time exactly.
        Kernels issued while a receive of the rank waits take their kind's `recv_slowdown`
        times theirs.

        Each block's call is slowed by what runs beside the issuing thread as it starts
        (sim/issuing.py), not as the run of blocks starts: a copy that lands, or an Adam chunk
        that begins, halfway through a layer's blocks changes the calls after it. (Read once a
        run, until session 37, the copy-and-Adam factor went to calls that the trace itself put
        beside Adam alone: 3.07x where the runs' such calls took 1.44-1.57x.) A call the host
        issues while the GPU still runs the block before it (host_t behind now) is read at now:
        the host ran ahead, so its call is not what the block waits for."""
        if self.host_free:
            # A roofline or an older profile: no call has a host cost, so nothing read beside
            # the thread changes a block once the run starts, and the run is one hold (one
            # event, not one a block: the large what-ifs run on these).
            f = self.recv_slowdown if self.recvs_waiting else _ALONE
            durs = [self.cost.gpu_s(kind, tokens, direction) * f[kind] for kind, tokens, direction in work]
            t = self.env.now
            yield self._hold(sum(durs))
            for i, d in enumerate(durs):
                record(i, t, d, None)
                t += d
            return
        for i, (kind, tokens, direction) in enumerate(work):
            t = self.env.now
            f = self.recv_slowdown if self.recvs_waiting else _ALONE
            k = self.cost.gpu_s(kind, tokens, direction) * f[kind]
            d = self.cost.host_s(kind, direction) * self.issuing.slowdown() if tokens > 0 else 0.0
            end = t + k
            if self.runs_ahead:
                self.host_t += d
                end = max(end, self.host_t)
                if self.reach:            # then waits for the block `reach` back (exec/runtime.py)
                    self.block_ends.append(end)
                    if len(self.block_ends) > self.reach:
                        self.host_t = max(self.host_t, self.block_ends.popleft())
            else:
                end = self.host_t = t + k + d
            yield self._hold(end - t)
            record(i, t, end - t, d)

    def _action_part(self, stage: int, pass_: str, at: str):
        """An action's host work outside its layers, at its `at` ("start" or "end"), with what
        the first stage (the embedding) and the last (the loss) do there: a forward's and a
        recompute's embedding at their start and loss at their end, a backward's the other
        way round (Dispatch.action); and, where the host runs ahead, the embedding's and the
        loss's GPU time (`CostSource.ends_gpu_s`)."""
        ends = {"start": "first", "end": "last"} if pass_ != "bwd" else {"start": "last", "end": "first"}
        extra = ends[at]
        own = stage == (0 if extra == "first" else self.last_stage)
        yield from self._between(self.cost.action_s(pass_, at) + (self.cost.action_s(pass_, extra) if own else 0.0))
        if own and self.runs_ahead:         # and their GPU work: on CPU ranks the host time holds it
            yield from self._gpu_outside(self.cost.ends_gpu_s(self.T, "embedding" if extra == "first" else "loss",
                                                              "bwd" if pass_ == "bwd" else "fwd"))

    def _charged(self, kind: str, per: int, fn, *args):
        self.policy_owed += per * self.cost.policy_s(self.plan.policy, kind)
        return fn(*args)

    def _pay_policy(self):
        """The host time of the policy calls the stage walk made for its next step (APTMoE's
        gate and predictor counts, between a layer's gate and its experts), before the step."""
        owed, self.policy_owed = self.policy_owed, 0.0
        yield from self._between(owed)

    def _between(self, b: float):
        """`b` seconds of the host's work between a layer's blocks: on a GPU it delays only the
        host's clock."""
        if b <= 0:
            return
        if self.runs_ahead:
            self.host_t += b * self.issuing.slowdown()
        else:
            yield self._hold(b)

    def _message(self, a: Action):
        """The compute stream waits for the action's message, where it uses it. A wait on the
        stream: the host's clock does not move, it has issued on meanwhile."""
        pending = [ev for ev in self.inbound.pop(a, ()) if not ev.processed]
        if pending:
            yield self.env.all_of(pending)

    def _forward(self, a: Action):
        s, m = a.stage, a.mb
        start = self.env.now
        yield from self._message(a)          # its input (a span from here, as the executor's)
        # Forward-only runs keep nothing for a backward: one micro-batch's activations live
        # while its forward runs.
        kept = self.step.mem.activation_bytes(self.layers[s]) if self.plan.fwd_only \
            else self.step.mem.saved_bytes(self.layers[s], self.plan.recomputes(m))
        self._alloc(s, kept, "activations")
        c = self.step.counts
        yield from self._action_part(s, "fwd", "start")           # on stage 0 the embedding
        for step in forward_walk(s, m, self.layers[s], self.walk_policy, c.counts, c.predicted,
                                 moe=self.cfg.model.is_moe):
            yield from self._pay_policy()
            yield from self._run(a, step)
        yield from self._action_part(s, "fwd", "end")             # on the last stage the loss
        if self.plan.fwd_only:
            self._free(kept)
        self._record(str(a), "compute", start, "forward", stage=s, mb=m)

    def _backward(self, a: Action):
        s, m, model = a.stage, a.mb, self.cfg.model
        start = self.env.now
        layers = self.layers[s]
        recompute = self.plan.recomputes(m)
        work = self.step.mem.backward_working_bytes(layers, recompute)
        self._alloc(s, work, "recomputed activations")
        if recompute:
            yield from self._action_part(s, "rec", "start")       # on stage 0 the embedding again
        own = False
        for step in backward_walk(s, m, layers, self.walk_policy, self.step.counts.counts, moe=model.is_moe,
                                  recompute=recompute):
            if step.cat != "recompute" and not own:
                own = True
                if recompute:
                    yield from self._action_part(s, "rec", "end")     # on the last stage the loss again
                yield from self._action_part(s, "bwd", "start")       # on the last stage its backward
            if step.cat != "recompute" and a in self.inbound:
                yield from self._message(a)  # its output's gradient, once the recompute is issued
            if m == 0 and not self.plan.resident and isinstance(step, RunExperts) and step.cat == "backward":
                # the first backward of a stage allocates the gradients of its GPU blocks
                on_gpu = backward_placement(s, step.layer, self.policy, model.num_experts, model.is_moe).gpu
                blocks = [b for b in Block.of_layer(step.layer, model.num_experts, model.is_moe)
                          if (b.kind is not BlockKind.EXPERT or b.expert in on_gpu) and self._has_gradient(b)]
                grads = sum(model.block_bytes(b.kind.value) for b in blocks)
                self.grad_blocks[s].update((b, model.block_bytes(b.kind.value)) for b in blocks)
                self.grad_bytes[s] += grads
                self._alloc(s, grads, "gradients")
            yield from self._pay_policy()
            yield from self._run(a, step)
        yield from self._action_part(s, "bwd", "end")             # on stage 0 the embedding's backward
        self._free(work + self.step.mem.saved_bytes(layers, recompute))
        self._record(str(a), "compute", start, "backward", stage=s, mb=m)

    def _drop(self, a: Action):
        s = a.stage
        # A copy still on the link (a block nobody needed, e.g. an expert without tokens)
        # holds its buffer until it lands; the copy engine frees it then.
        pending = self.inflight_bytes[s]
        self._free(self.stage_bytes[s] - pending + self.grad_bytes.pop(s, 0))
        self.stage_bytes[s] = pending
        if self.policy is not None:
            self.policy.stage_dropped(s)
        for key in [k for k in self.ready if k[0] == s]:
            del self.ready[key]
        self._record(str(a), "compute" if a.kind is Kind.DROP_F else "offload", self.env.now, "marker")
        yield from ()

    def _grad_home(self, stage: int, block: Block) -> simpy.Event:
        ev = self.grad_home.get((stage, block))
        if ev is None:
            ev = self.grad_home[(stage, block)] = self.env.event()
        return ev

    def _has_gradient(self, block: Block) -> bool:
        """Whether `block` gets a gradient this step: an expert only where some micro-batch
        routes tokens to it. Autograd makes none otherwise, and the executor then neither
        offloads nor updates it (torch's Adam skips a parameter without a gradient): at G 0.6
        with 8 experts, one expert per layer and step (v8's Mobius offloaded 503 of a stage's
        570 MB)."""
        if block.kind is not BlockKind.EXPERT:
            return True
        return bool(self.step.counts.counts[block.layer, :, block.expert].any())

    def _offload(self, a: Action):
        """The stage's GPU gradients to the host block by block, in layer order, each block's
        arrival releasing its update (as the executor does)."""
        s, m = a.stage, self.cfg.model
        start = self.env.now
        grads = self.grad_blocks.pop(s, {})
        landed = start                  # blocks are handed over in order, each once it has landed
        for block in Block.of_layers(self.layers[s], m.num_experts, m.is_moe):
            nbytes = grads.get(block, 0)
            if nbytes:
                yield from self._transfer("d2h", nbytes, "offload")
                self.bytes["d2h"] += nbytes
                landed = self.env.now + self.pacer_late
            self._landing(self._grad_home(s, block), landed)
        if landed > self.env.now:
            yield self.env.timeout(landed - self.env.now)
        self.busy["d2h"] += self.env.now - start
        self._record(str(a), "offload", start, "offload", bytes=sum(grads.values()))

    def _update(self, a: Action):
        """Adam over a stage's parameters. On the CPU it runs in chunks (`adam_chunks`) at low priority,
        so that expert work of stages still in backward waits for one block's update at
        most, not for the whole stage's (found in the trace: whole-stage and even per-layer
        chunks held the cores for tens of milliseconds while CPU experts queued)."""
        m = self.cfg.model
        start = self.env.now
        if self.plan.resident:
            params = sum(m.block_bytes(b.kind.value) // m.dtype_bytes
                         for b in Block.of_layers(self.layers[a.stage], m.num_experts, m.is_moe) if self._has_gradient(b))
            yield self._hold(self.cost.adam_gpu_s(params))
            self._record(str(a), "compute", start, "update", params=params)
            return
        # A chunk takes its time alone, and longer while another rank of the socket updates
        # too (host_memory); without the host memory model, the figure for ranks at once.
        shared = self.cost.adam_shared_slowdown(self.threads) if self.host_memory is not None else 1.0
        adam_s = self.cost.adam_cpu_alone_s if shared > 1.0 else self.cost.adam_cpu_s
        # after each chunk the executor's worker tells the policy, sets the chunk's future and
        # takes its next job: its own time, outside the chunk's event (aptmoe/adam_gaps.py)
        gap = self.cost.adam_gap_s(self.plan.policy)
        for block in Block.of_layers(self.layers[a.stage], m.num_experts, m.is_moe):
            home = self._grad_home(a.stage, block)
            if not home.processed:
                yield home                       # its gradient is still on the way
            if not self._has_gradient(block):
                continue                         # unused this step: no gradient, no update
            chunks = [(lo, hi, adam_s(hi - lo, self.threads))
                      for lo, hi in adam_chunks(m.block_bytes(block.kind.value) // m.dtype_bytes)]
            for lo, hi, seconds in chunks:
                with self.cpu.request(priority=CPU_UPDATE_PRIORITY) as req:
                    yield req
                    start = self.env.now
                    with self.copy_conditions.adam(self.rank) if self.copy_conditions else nullcontext():
                        yield from self._cpu_work(seconds, adam_bytes(hi - lo, m.dtype_bytes), shared)
                    self._record(str(a.at(block)), "cpu", start, "update", params=hi - lo, layer=block.layer)
                    if gap > 0:
                        yield self.env.timeout(gap)
                self.policy.adam_done(hi - lo)

    def _send(self, a: Action):
        peer = a.stage + (1 if a.kind is Kind.SEND_F else -1)
        same_node = self.cfg.cluster.node_of(self.plan.rank_of(peer)) == self.cfg.cluster.node_of(self.rank)
        nbytes = self.step.mem.boundary_bytes()
        with self.egress.request() as req:
            yield req
            start = self.env.now
            yield self._hold(self.cost.p2p(same_node).time_s(nbytes), "net")
        self.bytes["p2p"] += nbytes
        self._record(str(a), "net", start, "send", bytes=nbytes)

    def _recv(self, a: Action):
        yield from ()
