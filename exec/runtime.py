"""The executor's runtime: one rank walking its share of the plan with real tensors.

Per rank (docs/executor.md has the table of plan streams and their runtime form):

* the **compute** stream is the calling thread: `F`/`B` interpret the shared stage walk
  (`aptmoe.stage_walk`) step by step, `DF` frees a stage, `U` updates resident parameters;
* the **load** program is a thread that opens a stage's load window (`LF`/`LB`: the policy's
  `stage_load_begins`), and a copy engine thread keeps up to `max_copies_in_flight` copies
  launched, each chosen by `policy.next_copy()` when a slot frees (demand priority);
* the **offload** stream copies a stage's gradients to host memory (`O`) and frees it (`DB`);
* the **cpu** program submits each block's Adam update to the rank's CPU worker at low
  priority (`U`); CPU experts go to the same worker at high priority;
* the **net** stream sends and receives boundary activations and their gradients.

Each stream waits for its own predecessor and for its action's dependencies on this rank;
dependencies on other ranks are the messages themselves. The loading policy is the very
object the simulator drives (`aptmoe.policy`); every call to it holds one lock, whose
condition also wakes the copy engine (`on_work`) and the compute stream when a block lands.

Parameters, gradients and Adam states of offloaded schedules live in (pinned) host memory
as one flat buffer per block (`aptmoe.exec.blocks`); a loaded block is a device copy of
that buffer, a leaf whose gradient the offload stream copies back. GPipe keeps them all on
the device and updates there.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from aptmoe.exec import cpu_worker
from aptmoe.exec.block_adam import BlockAdam
from aptmoe.exec.blocks import FlatParams, initial_flat, param_shapes
from aptmoe.exec.comm import PeerChannels
from aptmoe.exec.cores import (bind_this_thread, bind_threads, process_threads, split_host_cores, start_worker_thread,
                               thread_affinities, thread_placement)
from aptmoe.exec.cpu_worker import CpuWorker
from aptmoe.exec.device import Device, Marker
from aptmoe.exec.host_stream import HostStream
from aptmoe.exec.layer import CpuPart, LayerRun, Routing
from aptmoe.exec.link import Landing, Link
from aptmoe.exec.model import (
    TORCH_DTYPES,
    expert_backward,
    expert_forward,
    init_ends,
    lm_loss,
    routing_from_counts,
    routing_generator,
)
from aptmoe.exec.thread_clock import span_args, span_start

from aptmoe.config import RunConfig
from aptmoe.costs import CostSource
from aptmoe.memory import adam_chunks
from aptmoe.plan.actions import RECEIVES, SENDS, Action, Block, BlockKind, Kind
from aptmoe.plan.plan import Plan
from aptmoe.policy import Copy, make_policy
from aptmoe.popularity import IterationCounts
from aptmoe.stage_walk import RunExperts, backward_walk, forward_walk
from aptmoe.trace import CPU_JOB_PHASES

# "RANK:STEP" makes that rank exit abruptly when the step begins: how the tests check that
# the other ranks stop with a clear message instead of hanging.
FAULT_ENV = "APTMOE_FAULT_RANK_STEP"


class RankFailure(RuntimeError):
    """A wait ran out of time or a peer failed; the message says what this rank waited for."""


@dataclass
class ExecOptions:
    timeout_s: float = 300.0          # longest wait for a block, a message or a stream
    # with --host-cores: the threads the rank had before its CPU worker (CUDA's, the process
    # group's) go to the host cores with the main thread (aptmoe.exec.cores); False leaves
    # them where they were (--no-confine-threads, for A/B runs)
    confine_threads: bool = True
    # A thread that needs a message posts its receive itself (and the net program's actions
    # before it), rather than waiting for the net thread to get there (`_post_through`);
    # False leaves every receive to the net thread (--receives-by-net-thread, for A/B runs)
    receives_on_demand: bool = True


@dataclass
class _Event:
    name: str
    stream: str
    start: Marker
    end: Marker
    cat: str
    args: dict


class _Ends:
    """The issuing thread's host time in an action's embedding (stage 0) and loss (the last
    stage), kept in its trace event (`embed_us`, `head_us`; a backward's `head_back_us` and
    `embed_back_us` for their backward): the dispatch probe takes them out of its layers'
    between-block time, which runs the same on every stage (calibration/dispatch.py
    `action_spans`)."""

    def __init__(self) -> None:
        self.us: dict[str, float] = {}

    @contextlib.contextmanager
    def timing(self, key: str, when: bool):
        if not when:
            yield
            return
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.us[key] = round((time.perf_counter() - t0) * 1e6, 1)


@dataclass
class StepReport:
    """What one rank measured in one step (plain data, gathered to rank 0)."""

    rank: int
    step_s: float
    losses: list[float]
    events: list[tuple] = field(default_factory=list)   # (name, stream, start_s, end_s, cat, args)
    peak_gpu_bytes: int = 0
    peak_block_bytes: int = 0
    bytes: dict[str, float] = field(default_factory=dict)
    expert_tokens: dict[str, int] = field(default_factory=dict)
    copies_by_phase: dict[str, int] = field(default_factory=dict)
    bytes_by_phase: dict[str, int] = field(default_factory=dict)
    host_block_s: float = 0.0          # host time of the compute thread's block calls
    host_blocks: int = 0


class RankRuntime:
    def __init__(self, cfg: RunConfig, plan: Plan, rank: int, device: Device, cost: CostSource | None,
                 peers: PeerChannels | None, source, opts: ExecOptions | None = None,
                 cores: Sequence[int] = ()) -> None:
        if not plan.resident and not plan.fwd_only and plan.recompute != "all":
            raise ValueError(f"the executor recomputes the stages of offload schedules in their backward; "
                             f"--recompute {plan.recompute} is for the simulator only (use auto or all)")
        self.cfg, self.plan, self.rank, self.dev, self.peers = cfg, plan, rank, device, peers
        self.source, self.opts = source, opts or ExecOptions()
        m = self.model = cfg.model
        self.dtype = TORCH_DTYPES[m.dtype]
        self.M, self.S = plan.micro_batches, plan.num_stages
        self.b, self.L, self.T = cfg.micro_batch_size, m.seq_length, cfg.tokens_per_micro_batch
        self.stages = plan.stages_of(rank)
        self.layers = {st.index: st.layers for st in plan.stages}
        self.shapes = {k: param_shapes(m, k) for k in BlockKind}
        self.my_layers = [layer for s in self.stages for layer in self.layers[s]]
        # -- parameters: the master copy of every block this rank owns
        def initial(block: Block) -> tuple[torch.Tensor, list, BlockAdam]:
            flat = initial_flat(m, block, cfg.train.seed)
            flat = flat.to(device.torch) if plan.resident else device.host_buffer(flat)
            # Adam over the block's flat buffer, on the host in chunks (aptmoe.memory.adam_chunks):
            # a chunk is a slice of the buffer (a leaf sharing its storage), updated in place
            chunks = [(lo, hi, flat[lo:hi]) for lo, hi in
                      (adam_chunks(flat.numel()) if not plan.resident else [(0, flat.numel())])]
            return flat, chunks, BlockAdam([piece for _, _, piece in chunks], cfg.train.lr)

        # Blocks drawn in parallel (each from its own seeded generator: the same values in any
        # order): drawing is single-threaded per tensor, and a rank's blocks are gigabytes. Their
        # Adam moments are made here too: a GPU rank's own thread runs one torch thread, and
        # zeroing an S8 rank's moments there took 2.3 s of its 10 s build on the H200.
        blocks = list(Block.of_layers(self.my_layers, m.num_experts, m.is_moe))
        with ThreadPoolExecutor(max_workers=max(1, min(len(blocks), cfg.cluster.cores_per_rank))) as pool:
            made = list(pool.map(initial, blocks))
        self.master: dict[Block, FlatParams] = {b: FlatParams(f, self.shapes[b.kind]) for b, (f, _, _) in zip(blocks, made)}
        self.chunks = {b: cs for b, (_, cs, _) in zip(blocks, made)}
        self.adam = {b: adam for b, (_, _, adam) in zip(blocks, made)}
        self.grad_buf = {} if plan.resident or not device.cuda else \
            {b: device.empty_host(fp.flat.shape, fp.flat.dtype) for b, fp in self.master.items()}
        # Where a CPU expert's backward writes its gradient: one buffer per expert, apart from
        # grad_buf (the offload copies the GPU's gradient of the same block there), made now
        # and kept from step to step. A new buffer each step was fresh memory whose first
        # write faulted in every page (an MoE-M expert's backward on one token: 33 ms on the
        # H200 against 3.6 ms calibrated); made on first use, its pinned allocation fell
        # inside a timed CPU expert (35-92 ms on MoE-M in docs/validation-h200-v4). Only the
        # APTMoE policy places experts on the CPU.
        self.cpu_grad_buf: dict[Block, torch.Tensor] = {
            b: device.empty_host(fp.flat.shape, fp.flat.dtype) for b, fp in self.master.items()
            if b.kind is BlockKind.EXPERT and plan.policy == "aptmoe"}
        self.ends: dict[str, torch.Tensor] = {}
        kw = dict(device=device.torch, dtype=self.dtype)
        d, V = m.embedding_dim, m.vocab_size
        if 0 in self.stages:
            self.ends["embedding"] = torch.empty(V, d, **kw)
        if self.S - 1 in self.stages:
            self.ends.update(norm_w=torch.empty(d, **kw), norm_b=torch.empty(d, **kw), head=torch.empty(V, d, **kw))
        init_ends(self.ends.get("embedding"), self.ends.get("norm_w"), self.ends.get("norm_b"),
                  self.ends.get("head"), cfg.train.seed)
        for p in self.ends.values():
            p.requires_grad_(True)
        # one Adam per end, each with its own step count, as torch's per-parameter state
        self.ends_adam = {name: BlockAdam([p], cfg.train.lr) for name, p in self.ends.items()}
        # -- machinery
        self.policy = make_policy(plan, rank, m, cost, threads=cfg.cluster.worker_cores)
        self.lock = threading.RLock()
        self.cond = threading.Condition(self.lock)
        if self.policy is not None:
            self.policy.on_work = self.cond.notify_all
        self.load_stream = device.new_stream()
        self.offload_stream = device.new_stream()
        self.net_stream = device.new_stream()
        self.act_stream = device.new_stream()       # CPU experts' activations, both directions
        # A send is posted by the thread that finishes its micro-batch, not by the net thread
        # when it next gets the GIL and a core: on the 2-core CPU machine the net thread posted
        # a forward's activations only after the next micro-batch's forward and a backward's
        # gradient only after the stage's update, and the rank before waited 7.3 ms where the
        # model has 3.6 (docs/validation-cpu.md, session 10). The net thread still walks its
        # program and posts any message nobody has; every thread posts in its order (`_post_through`).
        self.net = plan.programs[rank].get("net", [])
        self.net_index = {a: i for i, a in enumerate(self.net)}
        self.eager_sends = plan.sends_by_producer(rank)
        self.net_lock = threading.Lock()
        self.walking = threading.local()
        # The CPU worker owns the rank's OpenMP threads. With --host-cores it runs on the rank's
        # last cores, this thread and every thread it starts from now on (a step's load, copy
        # and offload threads) on its first ones (aptmoe.exec.cores). On a GPU rank this thread
        # and those it starts keep one torch thread (bind_cores set it so at the rank's start),
        # so that they never make an OpenMP team of their own: with more OpenMP threads in the
        # process than cores, libgomp stops spinning between parallel regions and every Adam
        # chunk and CPU expert paid the wake-up of the worker's team (exec/thread_bench.py, 2
        # cores: an Adam call 77-102 us with a second team, 26-28 without; in the one-H200
        # runs 0.24-0.54 ms against 0.043 calibrated).
        host, workers = split_host_cores(cores, cfg.cluster.host_cores) if cores else ([], [])
        own_pool = bool(host) or (device.cuda and bool(workers))
        self._restore_affinity = list(cores) if host else []
        self._restore_threads = len(cores) if host and not device.cuda else None
        # (The worker's start function must not hold `self`: through the worker's thread the
        # runtime then outlived its run until interpreter exit, where a torchrun rank aborted
        # with "terminate called without an active exception" in one run of two.)
        start = functools.partial(start_worker_thread, workers, device.enter_thread) if own_pool \
            else device.enter_thread
        before_worker = process_threads()
        self._moved: dict[int, set[int]] = {}         # threads sent to the host cores, and where they were
        self.cpu = CpuWorker(f"rank{rank}-cpu", on_start=start)
        self._host_cores, self._worker_cores = host, workers
        if own_pool:
            # once the worker has fixed its thread count, the shared one goes back down: to one
            # on a GPU rank, to the host cores' on a CPU rank (whose main thread computes)
            self.cpu.submit(cpu_worker.EXPERT, lambda: None).result(timeout=60)
            if host:
                if self.opts.confine_threads:     # every thread but the worker's (its team is born on its cores)
                    self._moved = thread_affinities(before_worker)
                    bind_threads(self._moved, host)
                bind_this_thread(host)
            torch.set_num_threads(1 if device.cuda else len(host))
        # made here, after this thread is bound: a capped link's pacing thread takes its cores
        cap = cfg.cluster.link_bandwidth_GBps
        self.h2d, self.d2h = Link(cap, device), Link(cap, device)

    def host_stream_GBps(self) -> float | None:
        """The host memory stream's speed on this rank's CPU worker, with its threads, just now
        (exec/host_stream.py), or None for a plan that does no CPU work (every parameter
        resident on the GPU). The stream's 768 MiB pool is made for each reading, inside the
        worker's job, and freed when it ends (on a GPU rank, out of torch's pinned cache too):
        kept through the steps, it slowed them (2-core machine, 3 rounds alternating:
        GPipeOffload 0.71-0.82 s/step without the probe, 0.81-0.94 with a kept pool; freed, as
        without)."""
        if self.plan.resident:
            return None
        place = self.dev.host_buffer if self.dev.cuda else (lambda t: t)

        def read() -> float:            # the pool lives and dies inside the job: nothing keeps it
            return HostStream(place).GBps()

        gbps = self.cpu.submit(cpu_worker.EXPERT, read).result(timeout=120)
        if self.dev.cuda:               # freed pinned memory stays in torch's cache unless emptied
            getattr(torch._C, "_host_emptyCache", lambda: None)()
        return gbps

    def thread_placement(self) -> dict[str, int]:
        """Where the rank's threads may run now (aptmoe.exec.cores.thread_placement)."""
        return thread_placement(self._host_cores, self._worker_cores)

    def close(self) -> None:
        self.cpu.close()
        self.h2d.close()
        self.d2h.close()
        for tid, cores in self._moved.items():        # the threads it moved go back (if they still run)
            bind_threads([tid], sorted(cores))
        if self._restore_affinity:          # the next schedule in this process starts from the rank's cores
            bind_this_thread(self._restore_affinity)
        if self._restore_threads:
            torch.set_num_threads(self._restore_threads)

    # =================================================================== a step
    def run_step(self, i: int, counts: IterationCounts) -> StepReport:
        """Train one step (`i` counts warm-up steps too: it picks data and routing)."""
        if os.environ.get(FAULT_ENV) == f"{self.rank}:{i}":
            os._exit(17)            # fault injection (tests): this rank dies at the start of step i
        self._begin_step(i, counts)
        prog = self.plan.programs[self.rank]
        threads = [threading.Thread(target=self._guard, args=(self._walk, s, prog[s]), name=f"r{self.rank}-{s}")
                   for s in ("load", "offload", "cpu", "net") if prog.get(s)]
        if self.policy is not None:
            threads.append(threading.Thread(target=self._guard, args=(self._copy_engine,), name=f"r{self.rank}-copy"))
        if self.peers is not None:
            dist.barrier()
        self.dev.start_clock()
        self.dev.reset_peak()
        for t in threads:
            t.start()
        try:
            self._walk("compute", prog["compute"])
            self._update_ends()
        except BaseException as e:
            self._fail(e)
        finally:
            self.compute_done = True
            with self.cond:
                self.cond.notify_all()
            for t in threads:
                t.join()
        if self.errors:
            raise self.errors[0]
        self._drain_sends()
        self.dev.synchronize()
        step_s = self.dev.host_seconds()
        report = self._report(step_s)
        self._end_step()
        return report

    def _begin_step(self, i: int, counts: IterationCounts) -> None:
        self.step_index, self.counts = i, counts
        self.done = {a: threading.Event() for prog in self.plan.programs[self.rank].values() for a in prog}
        self.errors: list[BaseException] = []
        self.abort = threading.Event()
        self.compute_done = False
        self.dev_blocks: dict[tuple[int, Block], FlatParams] = {}
        self.block_bytes = self.peak_block = 0
        self.inbox: dict[tuple[int, int], tuple[torch.Tensor, Marker | None]] = {}
        self.grad_inbox: dict[tuple[int, int], tuple[torch.Tensor, Marker | None]] = {}
        self.outbox: dict[tuple[int, int], tuple[torch.Tensor, Marker]] = {}
        self.ckpt: dict[tuple[int, int], torch.Tensor] = {}
        self.tapes: dict[tuple[int, int], dict[int, LayerRun]] = {}
        self.cpu_saved: dict[tuple[int, int], dict[int, CpuPart]] = {}
        self.losses: dict[int, torch.Tensor] = {}
        self.grad_home: dict[tuple[int, Block], threading.Event] = {}
        self.embedded: dict[int, torch.Tensor] = {}          # stage 0's embedding output, in its graph
        self.done_marker: dict[int, Marker] = {}             # after the latest backward of a stage
        self.loss_graph: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.events: list[_Event] = []
        self.host_events: list[tuple] = []
        self.sends: list[tuple[object, torch.Tensor]] = []
        self.net_next = 0                   # the net program's first action not yet posted
        self.ahead: deque[Marker] = deque()  # the latest blocks' end markers (`_keep_within_reach`)
        self.expert_tokens = {"gpu": 0, "cpu": 0}
        self.host_block_s, self.host_blocks = 0.0, 0
        self.h2d.bytes = self.d2h.bytes = 0
        self.load_bytes = 0
        batch = self.source.batch(i, self.cfg.train.batch_size)
        self.inputs = batch[:, :-1].to(self.dev.torch)
        self.targets = batch[:, 1:].to(self.dev.torch)
        E, k = self.model.num_experts, self.model.top_k
        self.routing: dict[tuple[int, int], Routing] = {}
        for layer in self.my_layers:
            for mb in range(self.M):
                if self.model.is_moe:
                    ids = routing_from_counts(counts.counts[layer, mb], self.T, k,
                                              routing_generator(self.cfg.train.seed, i, layer, mb))
                else:
                    ids = torch.zeros(self.T, 1, dtype=torch.long)
                self.routing[(layer, mb)] = Routing.build(ids, E, self.dev.torch)
        for fp in self.master.values():
            fp.set_grad(None)
        for p in self.ends.values():
            p.grad = None

    def _end_step(self) -> None:
        if self.policy is not None:
            self.policy.end_iteration()
        self.dev_blocks.clear()

    # =================================================================== plumbing
    def _guard(self, fn, *args) -> None:
        self.dev.enter_thread()
        try:
            fn(*args)
        except BaseException as e:
            self._fail(e)

    def _fail(self, e: BaseException) -> None:
        with self.cond:
            self.errors.append(e)
            self.abort.set()
            self.cond.notify_all()

    def _check(self, what: str, since: float) -> None:
        if self.abort.is_set():
            raise RankFailure(f"rank {self.rank}: stopped while waiting for {what}: another stream failed")
        if time.monotonic() - since > self.opts.timeout_s:
            raise RankFailure(f"rank {self.rank}: waited {self.opts.timeout_s:.0f} s for {what}; "
                              "a peer rank may have died (raise --timeout for very slow steps)")

    def _wait_event(self, ev: threading.Event, what: str) -> None:
        since = time.monotonic()
        while not ev.wait(0.2):
            self._check(what, since)

    def _landed(self, landing: Landing) -> bool:
        """Whether a copy has landed, without waiting."""
        return landing.done.is_set() and (landing.error is not None or self.dev.passed(landing.arrived))

    def _land(self, link: Link, landing: Landing, what: str) -> None:
        """Wait until a copy has landed (its bytes on the other side)."""
        since = time.monotonic()
        while not link.wait(landing, 0.2):
            self._check(what, since)

    def _wait_future(self, fut: Future, what: str):
        since = time.monotonic()
        while True:
            try:
                return fut.result(timeout=0.2)
            except TimeoutError:
                self._check(what, since)

    def _walk(self, stream: str, program: list[Action]) -> None:
        self.walking.stream = stream            # which program's thread this is (`_posted`)
        for a in program:
            for d in self.plan.deps_of(a):
                ev = self.done.get(d)
                if ev is None:                  # deps on other ranks are the messages themselves
                    continue
                if not ev.is_set() and d.kind in RECEIVES and self.opts.receives_on_demand:
                    self._post_through(d)       # else the net thread posts it (when it gets there)
                self._wait_event(ev, f"{d} before {a}")
            self._handlers[a.kind](self, a)
            self.done[a].set()
            for send in self.eager_sends.get(a, ()):
                self._post_through(send)

    def _block_start(self) -> tuple[Marker, float, tuple]:
        return self.dev.record(), time.perf_counter(), span_start(queued=False)

    def _block_end(self, name: str, start: tuple[Marker, float, tuple], cat: str, **args) -> None:
        """One block ran on the compute stream: its device span, and the host time the call
        took (on a GPU the Python-side cost of issuing it; on CPU ranks its whole run), kept
        in the event too (`host_us`): where the span is longer, the GPU or a wait held the
        block, where they agree the host did. The dispatch probe's figures are checked
        against it (docs/validation-h200-v5). Of that host time the thread ran `run_us`
        (exec/thread_clock.py); the rest it slept (the GIL, a lock, the driver) or waited
        for a core."""
        marker, host, clocks = start
        ran = span_args(clocks)                  # inside the call's span, so no longer than it
        took = time.perf_counter() - host
        self.host_block_s += took
        self.host_blocks += 1
        end = self.dev.record()
        self._mark(name, "compute", marker, end, cat, host_us=round(took * 1e6, 1), **ran, **args)
        self._keep_within_reach(end)

    def _keep_within_reach(self, end: Marker) -> None:
        """Let the issuing thread run at most `ScheduleConfig.ahead_blocks` blocks ahead of the
        GPU, waiting (without the GIL) for the block that many back (sim/engine.py `_issue`
        does the same). Unbounded, it filled the driver's queue whenever the compute stream
        waited for a message, and the next marker it recorded blocked in the driver with the
        GIL held (torch's Event.record keeps it): in the regime's Mobius on two H200s for
        28-197 ms at a time, every other thread of the rank with it, so that the load that
        should have landed meanwhile landed when the message did (10-14 loads of 22-207 ms a
        run, against 4.2 ms, each ending with a receive of its rank; torch.profiler:
        cudaEventRecordWithFlags on the main thread, docs/measured/session29). Bounded, the
        same run had none."""
        reach = self.cfg.schedule.ahead_blocks
        if not reach:
            return
        self.ahead.append(end)
        if len(self.ahead) > reach:
            oldest = self.ahead.popleft()
            if not self.dev.passed(oldest):
                self.dev.block_on(oldest)

    def _mark(self, name: str, stream: str, start: Marker, end: Marker, cat: str, **args) -> None:
        # Recorded with or without --no-trace: the busy fractions are read from these events.
        self.events.append(_Event(name, stream, start, end, cat, args))

    # =================================================================== loading
    def _instant(self, name: str, stream: str) -> None:
        t = self.dev.host_seconds()
        self.host_events.append((name, stream, t, t, "marker", {}))

    def _open_window(self, a: Action) -> None:
        with self.cond:
            self.policy.stage_load_begins(a.stage, "B" if a.kind is Kind.LOAD_B else "F")
        self._instant(str(a), "load")

    def _copy_engine(self) -> None:
        k = self.cfg.schedule.max_copies_in_flight
        launched: deque[tuple[Copy, FlatParams, Landing]] = deque()
        while True:
            with self.cond:
                while True:
                    if self.abort.is_set():
                        return
                    c = self.policy.next_copy() if len(launched) < k else None
                    if c is not None or launched:
                        break
                    if self.compute_done:
                        return
                    self.cond.wait(0.2)
            if c is not None:
                launched.append(self._launch(c))
                if len(launched) < k:
                    continue
            c, fp, landing = launched.popleft()
            self._land(self.h2d, landing, f"the load of {c.block}")
            # Only the policy's bookkeeping under the lock: the compute thread takes it for
            # every block it issues. The block's views and the allocator's note were made at
            # launch, while the copy before it ran.
            with self.cond:
                open_ = self.policy.window_open(c.stage)
                self.policy.copy_finished(c)
                if open_:
                    self.dev_blocks[(c.stage, c.block)] = fp
                    self._count_block(fp.nbytes)
                self.cond.notify_all()
            self.load_bytes += c.nbytes
            self._mark(str(c.action), "load", landing.start, landing.end, f"load-{c.phase}", bytes=c.nbytes,
                       layer=c.block.layer, phase=c.phase)

    def _launch(self, c: Copy) -> tuple[Copy, FlatParams, Landing]:
        """The copy on the load stream, and the block's parameters over its buffer (views to
        read once it has landed: the compute stream waits for the end marker's block)."""
        src = self.master[c.block].flat
        with self.dev.on(self.load_stream):
            buf = torch.empty(src.shape, dtype=src.dtype, device=self.dev.torch)
        landing = self.h2d.copy(buf, src, self.load_stream, mark_start=True)
        self.dev.keep_for(buf, self.dev.compute if self.dev.cuda else None)
        return c, FlatParams(buf, self.shapes[c.block.kind]), landing

    def _count_block(self, nbytes: int) -> None:
        self.block_bytes += nbytes
        self.peak_block = max(self.peak_block, self.block_bytes)

    def _params(self, stage: int, pass_: str, block: Block) -> FlatParams:
        """The block's parameters on the device, waiting (and demanding) until they are there."""
        if self.policy is None:
            return self.master[block]
        with self.cond:
            key = (stage, block)
            if self.policy.is_loaded(stage, block):
                return self.dev_blocks[key]
            self.policy.require(stage, pass_, block)
            start, since = self.dev.host_seconds(), time.monotonic()
            while not self.policy.is_loaded(stage, block):
                self._check(f"block {block} of stage {stage}", since)
                self.cond.wait(0.2)
            self.host_events.append((f"wait {block}", "compute", start, self.dev.host_seconds(), "wait",
                                     {"layer": block.layer}))
            return self.dev_blocks[key]

    def _ready_experts(self, stage: int, pass_: str, layer: int, pending: list[int]) -> list[int]:
        """The pending experts already on the device; if none, demand them all and wait for the first."""
        if self.policy is None:
            return pending
        with self.cond:
            since = time.monotonic()
            while True:
                ready = [e for e in pending if self.policy.is_loaded(stage, Block.expert_of(layer, e))]
                if ready:
                    return ready
                for e in pending:
                    self.policy.require(stage, pass_, Block.expert_of(layer, e))
                self._check(f"experts {pending} of layer {layer}", since)
                self.cond.wait(0.2)

    def _drop(self, a: Action) -> None:
        with self.cond:
            if self.policy is not None:
                self.policy.stage_dropped(a.stage)
            for key in [k for k in self.dev_blocks if k[0] == a.stage]:
                self.block_bytes -= self.dev_blocks.pop(key).nbytes
        self._instant(str(a), "compute" if a.kind is Kind.DROP_F else "offload")

    # =================================================================== compute
    def _stage_input(self, s: int, m: int) -> torch.Tensor:
        if s == 0:
            return F.embedding(self.inputs[m * self.b:(m + 1) * self.b], self.ends["embedding"])
        x, marker = self.inbox.pop((s, m))
        self.dev.wait(marker)
        return x

    def _forward(self, a: Action) -> None:
        s, m = a.stage, a.mb
        start = self.dev.record()
        taped = not self.plan.fwd_only and not self.plan.recomputes(m)
        ends = _Ends()
        # stage 0's embedding: in the graph only if taped
        with torch.set_grad_enabled(taped), ends.timing("embed_us", s == 0):
            x = self._stage_input(s, m)
        if not taped and not self.plan.fwd_only:
            self.ckpt[(s, m)] = x.detach() if s > 0 else None
        runs: dict[int, LayerRun] = {}
        y = self._run_layers(a, self._locked(forward_walk(s, m, self.layers[s], self.policy, self.counts.counts,
                                                          self.counts.predicted, moe=self.model.is_moe)),
                             x, runs, grad=taped, keep_cpu=not taped and not self.plan.fwd_only)
        if taped:
            self.tapes[(s, m)] = runs
            if s == 0:
                self.embedded[m] = x
        with ends.timing("head_us", s == self.S - 1):
            self._stage_output(a, y, taped)
        self._mark(str(a), "compute", start, self.dev.record(), "forward", stage=s, mb=m, **ends.us)

    def _stage_output(self, a: Action, y: torch.Tensor, taped: bool) -> None:
        s, m = a.stage, a.mb
        if s == self.S - 1:
            yl = y.detach().requires_grad_(taped)
            with torch.set_grad_enabled(taped):
                loss = self._loss(yl, m)
            self.losses[m] = loss.detach()
            if taped:
                self.loss_graph[m] = (yl, loss)
        elif self.plan.rank_of(s + 1) == self.rank:
            self.inbox[(s + 1, m)] = (y.detach(), None)
        else:
            self.outbox[(s, m)] = (y.detach(), self.dev.record())

    def _loss(self, y: torch.Tensor, m: int) -> torch.Tensor:
        e = self.ends
        return lm_loss(y, e["norm_w"], e["norm_b"], e["head"], self.targets[m * self.b:(m + 1) * self.b])

    def _locked(self, walk):
        """A stage walk whose steps are generated under the policy lock: generating a step
        tells the policy what was learnt (predicted and gate counts, backward placements)."""
        it = iter(walk)
        while True:
            with self.cond:
                step = next(it, None)
            if step is None:
                return
            yield step

    def _run_layers(self, a: Action, steps, x: torch.Tensor, runs: dict[int, LayerRun], *, grad: bool,
                    keep_cpu: bool) -> torch.Tensor:
        """Forward steps of a stage walk from input x; returns the stage output."""
        for step in steps:
            x = self._forward_step(a, step, x, runs, grad=grad, keep_cpu=keep_cpu)
        return x

    def _forward_step(self, a: Action, step, x: torch.Tensor, runs: dict[int, LayerRun], *, grad: bool,
                      keep_cpu: bool) -> torch.Tensor:
        """One forward (or recompute) step; returns the activation after it."""
        if isinstance(step, RunExperts):
            run = runs[step.layer]
            self._experts_forward(a, step, run, keep_cpu=keep_cpu or grad)
            return run.output()
        for block in step.blocks:
            p = self._params(a.stage, step.pass_, block)
            if grad:
                p.ensure_grad()
            t0 = self._block_start()
            if block.kind is BlockKind.ATTN:
                xin = x.detach().requires_grad_(grad) if grad else x
                run = runs[block.layer] = LayerRun(xin, self.routing[(block.layer, a.mb)], self.model.num_heads,
                                                   grad, self.model.is_moe)
                run.attention(p.leaves)
            else:
                runs[block.layer].gate(p.leaves[0])
            self._block_end(str(a.at(block)), t0, step.cat, layer=block.layer)
        return x

    def _experts_forward(self, a: Action, step: RunExperts, run: LayerRun, keep_cpu: bool) -> None:
        layer, mb = step.layer, a.mb
        fut = self._submit_cpu_forward(a, step, run, keep_cpu) if step.cpu else None

        def run_one(e: int, p) -> None:
            run.gpu_expert(e, *p.flat_views())

        self._gpu_experts(a, step, run_one, step.cat)
        # Experts that ran on the CPU in this micro-batch's forward kept their results there.
        saved = self.cpu_saved.get((layer, mb), {})
        for e in range(len(step.counts)):
            if step.counts[e] > 0 and e not in step.gpu and e not in step.cpu:
                part = saved[e]
                with self.dev.on(self.act_stream):
                    out_dev = part.out.to(self.dev.torch, non_blocking=True)
                self.dev.wait(self.dev.record(self.act_stream))
                run.cpu[e] = CpuPart(part.inp, part.out, out_dev, part.hidden)
        if fut is not None:
            done, marker = self._wait_future(fut, f"CPU experts of layer {layer}")
            self.dev.wait(marker)
            parts = {e: CpuPart(xin, out, out_dev, hidden) for e, (out_dev, (xin, out, hidden)) in done.items()}
            run.cpu.update(parts)
            if keep_cpu and step.cat == "forward":
                self.cpu_saved[(layer, mb)] = dict(parts)

    def _submit_cpu_forward(self, a: Action, step: RunExperts, run: LayerRun, keep_graph: bool) -> Future:
        def work(e: int, xin: torch.Tensor):
            out, hidden = expert_forward(xin, *self.master[Block.expert_of(step.layer, e)].flat_views(),
                                             keep=keep_graph)
            return out, (xin, out, hidden)

        cat = "recompute" if step.cat == "recompute" else "cpu-expert"
        return self._submit_cpu(a, step, [run.inputs_of(e) for e in step.cpu], work, cat, "fwd")

    def _submit_cpu(self, a: Action, step: RunExperts, data: list[torch.Tensor], work, cat: str,
                    direction: str) -> Future:
        """The CPU experts of a step: their rows of `data` (one device tensor per expert) go
        to host memory in one copy, `work(e, rows)` runs each on the CPU and returns (what
        goes back, what stays), and what goes back returns in one copy. The future gives
        ({e: (back on the device, stays)}, a marker the compute stream waits for)."""
        experts, layer = list(step.cpu), step.layer
        down = torch.cat(data)
        ready = self.dev.record()
        sizes = [int(step.counts[e]) for e in experts]
        self.expert_tokens["cpu"] += sum(sizes)
        submitted = self.dev.host_seconds()

        def job():
            phases = [self.dev.host_seconds()]               # the worker takes the job
            self.dev.block_on(ready)
            phases.append(self.dev.host_seconds())           # its inputs computed
            host = self.dev.empty_host(down.shape, down.dtype)
            self._land(self.d2h, self.d2h.copy(host, down, self.act_stream), f"the activations of layer {layer}")
            phases.append(self.dev.host_seconds())           # in host memory
            backs, stays = [], []
            for e, rows in zip(experts, host.split(sizes)):
                t0, clocks = self.dev.host_seconds(), span_start()
                back, stay = work(e, rows)
                ran = span_args(clocks)
                t1 = self.dev.host_seconds()
                backs.append(back)
                stays.append(stay)
                with self.cond:                      # the split learns how fast the CPU really is
                    self.policy.cpu_expert_ran(int(step.counts[e]), direction, t1 - t0)
                self.host_events.append((str(a.at(Block.expert_of(layer, e))), "cpu", t0, t1,
                                         cat, {"layer": layer, "experts": [e], "tokens": int(step.counts[e]), **ran}))
            up = torch.cat(backs)
            with self.dev.on(self.act_stream):
                dev_up = torch.empty(up.shape, dtype=up.dtype, device=self.dev.torch)
            phases.append(self.dev.host_seconds())           # computed
            landing = self.h2d.copy(dev_up, up, self.act_stream)
            self._wait_event(landing.done, f"the outputs of layer {layer}")
            landing.check()
            self._job_event(a, layer, experts, sum(sizes), cat, [submitted, *phases, self.dev.host_seconds()])
            marker = landing.arrived             # behind this copy, not behind what act_stream queued since
            if self.dev.cuda:
                self.dev.keep_for(dev_up, self.dev.compute)
            return dict(zip(experts, zip(dev_up.split(sizes), stays))), marker

        return self.cpu.submit(cpu_worker.EXPERT, job)

    def _job_event(self, a: Action, layer: int, experts: list[int], tokens: int, cat: str,
                   at: list[float]) -> None:
        """One CPU job on the cpu-jobs lane as a `cpu-job` event from its hand-over to its outputs'
        landing, its phases in the args (trace.CPU_JOB_PHASES, us): the executor and the
        simulator give the same five, so the wait for a CPU expert's outputs splits into
        where each spent it."""
        us = {f"{k}_us": round((b - t) * 1e6, 1) for k, t, b in zip(CPU_JOB_PHASES, at, at[1:])}
        self.host_events.append((f"{a}@{layer}:cpu", "cpu-jobs", at[0], at[-1], "cpu-job",
                                 {"layer": layer, "experts": experts, "tokens": tokens, "of": cat, **us}))

    def _gpu_experts(self, a: Action, step: RunExperts, run_one, cat: str) -> None:
        """The step's GPU experts in the order their weights arrive; `run_one(e, params)`."""
        layer = step.layer
        pending = list(step.gpu)
        while pending:
            for e in self._ready_experts(a.stage, step.pass_, layer, pending):
                p = self._params(a.stage, step.pass_, Block.expert_of(layer, e))
                t0 = self._block_start()
                run_one(e, p)
                self._block_end(str(a.at(Block.expert_of(layer, e))), t0, cat,
                           layer=layer, experts=[e], tokens=int(step.counts[e]))
                self.expert_tokens["gpu"] += int(step.counts[e])
                pending.remove(e)

    def _backward(self, a: Action) -> None:
        s, m = a.stage, a.mb
        start = self.dev.record()
        recompute = self.plan.recomputes(m)
        first, last = s == 0, s == self.S - 1
        ends = _Ends()
        if recompute:
            runs: dict[int, LayerRun] = {}
            with ends.timing("embed_us", first):
                x = self._stage_input(0, m) if first else self.ckpt.pop((s, m))
            if first:
                self.embedded[m] = x
        else:
            runs, x = self.tapes.pop((s, m)), None
        dy = None
        for step in self._locked(backward_walk(s, m, self.layers[s], self.policy, self.counts.counts,
                                               moe=self.model.is_moe, recompute=recompute)):
            if step.cat == "recompute":
                x = self._forward_step(a, step, x, runs, grad=True, keep_cpu=True)
                continue
            if dy is None:
                if recompute and last:
                    with ends.timing("head_us", True):
                        yl = x.detach().requires_grad_(True)
                        self.loss_graph[m] = (yl, self._loss(yl, m))
                with ends.timing("head_back_us", last):
                    dy = self._output_grad(s, m)
            dy = self._backward_step(a, step, runs, dy)
        self.cpu_saved = {k: v for k, v in self.cpu_saved.items() if not (k[1] == m and k[0] in self.layers[s])}
        with ends.timing("embed_back_us", first):
            self._input_grad(s, m, dy)
        end = self.done_marker[s] = self.dev.record()
        self._mark(str(a), "compute", start, end, "backward", stage=s, mb=m, **ends.us)

    def _output_grad(self, s: int, m: int) -> torch.Tensor:
        if s == self.S - 1:
            yl, loss = self.loss_graph.pop(m)
            (loss / self.M).backward()
            return yl.grad
        g, marker = self.grad_inbox.pop((s, m))
        self.dev.wait(marker)
        return g

    def _input_grad(self, s: int, m: int, dx: torch.Tensor) -> None:
        if s == 0:
            torch.autograd.backward(self.embedded.pop(m), dx)
        elif self.plan.rank_of(s - 1) == self.rank:
            self.grad_inbox[(s - 1, m)] = (dx, None)
        else:
            self.outbox[(s, m)] = (dx, self.dev.record())

    def _backward_step(self, a: Action, step, runs: dict[int, LayerRun], dy: torch.Tensor) -> torch.Tensor:
        if isinstance(step, RunExperts):
            run = runs[step.layer]
            run.start_backward(dy)
            self._experts_backward(a, step, run)
            return dy
        run = runs[step.blocks[0].layer]
        for block in step.blocks:
            self._params(a.stage, step.pass_, block)        # still loaded; waits if the plan says so
            t0 = self._block_start()
            if block.kind is BlockKind.GATE:
                run.gate_backward()
            else:
                dy = run.attention_backward()
            self._block_end(str(a.at(block)), t0, "backward", layer=block.layer)
        return dy

    def _experts_backward(self, a: Action, step: RunExperts, run: LayerRun) -> None:
        layer = step.layer
        douts = run.output_grads()
        fut = None
        if step.cpu:
            def work(e: int, ge: torch.Tensor):
                b = Block.expert_of(layer, e)
                part, fp = run.cpu[e], self.master[b]
                with self.lock:                  # the first gradient of the step is written, not added
                    first = fp.start_grad(self.cpu_grad_buf[b])
                return expert_backward(part.inp, part.hidden, ge, *fp.flat_views(), *fp.grad_views(),
                                           first=first), None

            fut = self._submit_cpu(a, step, [douts[e] for e in step.cpu], work, "cpu-expert", "bwd")
        self._gpu_experts(a, step, lambda e, p: run.gpu_expert_backward(e, douts[e], p), "backward")
        if fut is not None:
            done, marker = self._wait_future(fut, f"CPU expert backward of layer {layer}")
            self.dev.wait(marker)
            for e, (g, _) in done.items():
                run.add_input_grad(e, g)

    # =================================================================== offload and update
    def _grad_home(self, stage: int, block: Block) -> threading.Event:
        """Set once the block's gradient of this step is on the host (or it has none)."""
        with self.lock:
            return self.grad_home.setdefault((stage, block), threading.Event())

    def _offload(self, a: Action) -> None:
        """Gradients of the stage's device blocks to host memory behind its last backward,
        block by block in layer order; each block's arrival releases its update.

        Every block's copy is launched before this thread waits for any (each block has its
        own pinned host buffer), so the link goes from one block to the next without this
        thread: with one copy at a time, and then with three in flight, every block paid this
        thread's wake-up and its wait for the GIL while the compute thread issued the next
        stage (MoE-S on the H200: a stage's offload at 26-31 GB/s of the link's 54). A block
        is handed over, and its update can start, as soon as its copy has passed."""
        s = a.stage
        nbytes = 0
        pending: deque[tuple[Block, torch.Tensor | None, Landing | None]] = deque()

        def hand_over() -> None:
            b, host, copied = pending.popleft()
            if host is not None:
                self._land(self.d2h, copied, f"the gradient of {b}")
                master = self.master[b]
                if master.grad is None:
                    master.set_grad(host)
                else:                       # never both, as placement is per stage; kept exact anyway
                    master.grad.add_(host)
            self._grad_home(s, b).set()

        done = self.done_marker.get(s)
        if self.d2h.cap is not None:
            # A capped copy's bytes pass over the capped link from when it is queued, so queue
            # none before the gradients exist: queued while the GPU still ran the backward (the
            # host runs ahead), the link's time passed meanwhile and the copies landed faster
            # than the cap allows (one-H200 grid v9, L2 capped: a 2.15 GB stage's offload in
            # 212 ms, 10 GB/s).
            self.dev.block_on(done)
        with self.dev.on(self.offload_stream):
            self.dev.wait(done, self.offload_stream)
            start = self.dev.record(self.offload_stream)
            for b in Block.of_layers(self.layers[s], self.model.num_experts, self.model.is_moe):
                with self.cond:
                    fp = self.dev_blocks.get((s, b))
                if fp is not None and fp.grad is not None:
                    g = fp.grad
                    self.dev.keep_for(g, self.offload_stream)
                    host = self.grad_buf[b] if self.dev.cuda else torch.empty_like(g)
                    pending.append((b, host, self.d2h.copy(host, g, self.offload_stream)))
                    nbytes += g.numel() * g.element_size()
                else:
                    pending.append((b, None, None))
                # hand over what has arrived already (its update can start); wait for none
                while pending and (pending[0][2] is None or self._landed(pending[0][2])):
                    hand_over()
            while pending:
                hand_over()
            end = self.dev.record(self.offload_stream)
        self._mark(str(a), "offload", start, end, "offload", bytes=nbytes)

    def _update_cpu(self, a: Action) -> None:
        """Adam over the stage's host parameters, block by block as their gradients arrive,
        in chunks below CPU experts in priority."""
        futs = []
        for block in Block.of_layers(self.layers[a.stage], self.model.num_experts, self.model.is_moe):
            self._wait_event(self._grad_home(a.stage, block), f"the gradient of {block} of stage {a.stage}")
            if self.master[block].grad is None:
                continue                     # unused this step: Adam skips it, as torch's does
            self.adam[block].begin_step()
            for i in range(len(self.chunks[block])):
                futs.append(self.cpu.submit(cpu_worker.UPDATE, self._adam_chunk, a, block, i))
        for f in futs:
            self._wait_future(f, f"the update of stage {a.stage}")

    def _adam_chunk(self, a: Action, block: Block, i: int) -> None:
        t0, clocks = self.dev.host_seconds(), span_start()
        lo, hi = self._step_chunk(block, i)
        ran = span_args(clocks)
        self.host_events.append((str(a.at(block)), "cpu", t0, self.dev.host_seconds(), "update",
                                 {"layer": block.layer, "params": hi - lo, "chunk": i, **ran}))
        with self.cond:                  # the backward's split weighs the Adam still owed
            self.policy.adam_done(hi - lo)

    def _step_chunk(self, block: Block, i: int) -> tuple[int, int]:
        lo, hi, _ = self.chunks[block][i]
        self.adam[block].step_chunk(i, self.master[block].grad[lo:hi])
        return lo, hi

    def _update(self, a: Action) -> None:
        (self._update_resident if self.plan.resident else self._update_cpu)(a)

    def _update_resident(self, a: Action) -> None:
        start = self.dev.record()
        for block in Block.of_layers(self.layers[a.stage], self.model.num_experts, self.model.is_moe):
            if self.master[block].grad is not None:      # unused this step: Adam skips it, as torch's does
                self.adam[block].begin_step()
                self._step_chunk(block, 0)
        self._mark(str(a), "compute", start, self.dev.record(), "update")

    def _update_ends(self) -> None:
        if self.plan.fwd_only:
            return
        for name, adam in self.ends_adam.items():
            p = self.ends[name]
            if p.grad is not None:          # unused this step: Adam skips it, as torch's does
                adam.begin_step()
                adam.step_chunk(0, p.grad)

    # =================================================================== network
    def _post_through(self, a: Action) -> None:
        """Post the net program's messages in its order up to and including `a`, unless another
        thread has; stop early at a send whose micro-batch is not yet computed (its producer's
        thread or the net thread posts it, and those after it, later).

        Whoever posts, the rank's NCCL calls keep the net program's order, which the plan made
        deadlock-free. A send is posted by the thread that finishes its micro-batch: every recv
        the program puts before a send feeds a compute action no later than the send's producer
        (the plan builds both streams in one pass), so those recvs are posted by then. A recv is
        posted by the thread whose next action needs it: otherwise, at nearly every action of
        Mobius and APTMoE (a rank alternates between stages and messages), the compute thread
        posted a send, handed over to the net thread, which posted the recv behind it, and
        handed back: 0.86-0.91 ms a boundary on two H200s with the GPU idle meanwhile, 5.7-9.4
        ms a rank-step, against none in the model (docs/measured/session27)."""
        with self.net_lock:
            last = self.net_index[a]
            while self.net_next <= last:
                b = self.net[self.net_next]
                if b.kind in SENDS and not all(self.done[d].is_set() for d in self.plan.deps_of(b) if d in self.done):
                    return
                (self._send if b.kind in SENDS else self._recv)(b)
                self.done[b].set()
                self.net_next += 1

    def _send(self, a: Action) -> None:
        peer = self.plan.rank_of(a.stage + (1 if a.kind is Kind.SEND_F else -1))
        x, ready = self.outbox.pop((a.stage, a.mb))
        called = time.perf_counter()
        with self.dev.on(self.net_stream):
            self.dev.wait(ready, self.net_stream)
            start = self.dev.record(self.net_stream)
            work = self.peers.send(x.contiguous(), peer)
        self.sends.append((work, x))
        self._mark(str(a), "net", start, self.dev.record(self.net_stream), "send", bytes=x.numel() * x.element_size(),
                   **self._posted(called))

    def _recv(self, a: Action) -> None:
        fwd = a.kind is Kind.RECV_F
        peer = self.plan.rank_of(a.stage + (-1 if fwd else 1))
        called = time.perf_counter()
        buf = torch.empty(self.b, self.L, self.model.embedding_dim, dtype=self.dtype, device=self.dev.torch)
        with self.dev.on(self.net_stream):
            start = self.dev.record(self.net_stream)
            work = self.peers.recv(buf, peer)
            work.wait()
            marker = self.dev.record(self.net_stream)
        self.dev.keep_for(buf, self.dev.compute if self.dev.cuda else None)
        (self.inbox if fwd else self.grad_inbox)[(a.stage, a.mb)] = (buf, marker)
        self._mark(str(a), "net", start, marker, "recv", bytes=buf.numel() * buf.element_size(), **self._posted(called))

    def _posted(self, called: float) -> dict:
        """A message's post, for its trace event: the host time the call took (on a GPU; on
        the CPU a receive's call lasts till the bytes are there) and the thread that made it."""
        return {"post_us": round((time.perf_counter() - called) * 1e6, 1),
                "by": getattr(self.walking, "stream", threading.current_thread().name)}

    def _drain_sends(self) -> None:
        for work, _ in self.sends:
            work.wait()
        self.sends.clear()

    # =================================================================== results
    def _report(self, step_s: float) -> StepReport:
        ev = [(e.name, e.stream, self.dev.seconds(e.start), self.dev.seconds(e.end), e.cat, e.args)
              for e in self.events] + list(self.host_events)
        peak = self.dev.peak_bytes()
        pol = self.policy
        return StepReport(
            rank=self.rank, step_s=step_s, losses=[float(self.losses[m]) for m in sorted(self.losses)], events=ev,
            peak_gpu_bytes=peak if peak is not None else self.peak_block, peak_block_bytes=self.peak_block,
            bytes={"h2d": float(self.h2d.bytes), "d2h": float(self.d2h.bytes), "load": float(self.load_bytes)},
            expert_tokens=dict(self.expert_tokens),
            copies_by_phase=dict(pol.copies_by_phase) if pol is not None else {},
            bytes_by_phase=dict(pol.bytes_by_phase) if pol is not None else {},
            host_block_s=self.host_block_s, host_blocks=self.host_blocks)

    _handlers = {
        Kind.FWD: _forward, Kind.BWD: _backward, Kind.DROP_F: _drop, Kind.DROP_B: _drop,
        Kind.LOAD_F: _open_window, Kind.LOAD_B: _open_window, Kind.OFFLOAD: _offload, Kind.UPDATE: _update,
        Kind.SEND_F: _post_through, Kind.SEND_B: _post_through, Kind.RECV_F: _post_through, Kind.RECV_B: _post_through,
    }
