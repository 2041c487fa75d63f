"""Which experts of a layer run on the CPU and which are loaded to the GPU (paper Eq. 1).

An expert that receives few tokens has little compute, so running it in place on the CPU,
from host memory, can be cheaper than moving its weights over the link. For one layer and
the current micro-batch, `split_experts` ranks the layer's experts by token count and
cuts the ranking into a GPU head (loaded, then computed on the GPU) and a CPU tail
(computed on the CPU) so that the CPU and the link finish together.

The model of one split (all times from a `CostSource`):

    CPU_tail  = remaining_mbs * sum_{e in tail} cpu_expert_s(n_e)
    LOAD_head = (load of MHA + gate, if they still need loading) + sum_{e in head} load(e)
    GPU_head  = remaining_mbs * sum_{e in head or resident} gpu_s("e", n_e)
    makespan  = max(CPU_tail, LOAD_head + GPU_head)

CPU work is scaled by the micro-batches still to run (this one included) because an
expert sent to the CPU stays there for all of them, while a loaded expert is loaded once.
Experts already resident on the GPU load for free and always compute there. An expert with
0 tokens is neither loaded nor computed: it is in neither `Split.gpu` nor `Split.cpu`,
resident or not.

The backward pass uses the same function: popularity is fully known after the forward, so
call it once per layer with direction="bwd", counts = the forward counts summed over the
stage's micro-batches, and remaining_mbs=1.

Where the paper's rule differs
------------------------------
`paper_split` is the paper's greedy rule: move experts in rank order from the tail to the
head while R = CPU_tail / LOAD_head > 1, and stop at the first split where R <= 1. Ours is
the best prefix, so it is never worse; exhaustive searches (tests/test_affinity.py) show
two ways the greedy rule loses. All examples: MoE-S-8 fp32 on `a800_pcie_hardware()`.

1. It overshoots. It takes the expert whose load makes R cross 1, although stopping one
   short may finish first; and with MHA and gate already resident R starts at infinity, so
   it always loads at least one expert. Counts (4,) * 8, 28 threads, MHA and gate
   resident, remaining_mbs=1: the paper loads 2 experts (2.81 ms), the best loads 1
   (1.68 ms), 67% slower.
2. It ignores GPU compute, so when that is not small next to loading (fp32, thousands of
   tokens, several micro-batches to go) it loads too many. Counts (3000, 400, 200, 100,
   100, 100, 50, 50), 14 threads, remaining_mbs=4, MHA and gate resident: the paper
   loads 7 experts (33.0 ms), we load 5 (29.2 ms, also the best of all 256 subsets).

Restricting the head to a prefix of the popularity ranking is optimal whenever every
expert costs the same on the GPU (then, for a given head size, the most popular experts
leave the least CPU work; the tests check this against all 2^E subsets). It is not
optimal in general, because a popular expert also costs the most GPU time: counts (1900,
1000, 800, 500, 500, 100, 0, 0), 28 threads, remaining_mbs=4, MHA and gate to load: the
best prefix loads {0, 1, 2, 3, 4} (35.0 ms), loading {0, 1, 2, 3, 5} and keeping one
500-token expert on the CPU finishes in 32.7 ms (-6.5%). Such gains need an exponential
search and appear only where GPU compute rivals the CPU tail, so the default stays the
best prefix, which also keeps the head a ranking that the loading queues can extend
expert by expert.

(The paper's public artifact, `R_solver.solve`, differs again: it walks the ranking from
the least popular expert and keeps an expert on the CPU while the tail's CPU time, for one
micro-batch, stays below the load time of MHA + gate + the tail's own experts.)
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from numbers import Integral

from aptmoe.config import ConfigError, ModelConfig
from aptmoe.costs import BLOCK_KINDS, DIRECTIONS, CostSource

# Two makespans this close count as a tie, which goes to the split with fewer CPU experts:
# the float sums of equal costs taken in a different order must not decide a split.
_TIE_RTOL = 1e-9


def _integer(x: object) -> bool:
    """An int or a numpy integer (counts usually come from a bincount); a bool is a mistake."""
    if type(x) is int:          # the common case, without the slow ABC check (hot in the simulator)
        return True
    return isinstance(x, Integral) and not isinstance(x, bool)


def block_load_s(cost: CostSource, model: ModelConfig, kind: str) -> float:
    """Seconds to copy one block ("a", "g" or "e") of `model` host-to-GPU on one GPU's link."""
    if kind not in BLOCK_KINDS:
        raise ConfigError(f"block kind {kind!r} is unknown; use one of {', '.join(BLOCK_KINDS)}")
    return cost.h2d().time_s(model.block_bytes(kind))


@dataclass(frozen=True)
class Split:
    """Where each expert of one layer computes. Expert ids are in popularity order (most
    tokens first, ties by id), so `to_load` is also the order in which to queue copies."""

    gpu: tuple[int, ...]      # computed on the GPU: resident experts and the loaded head
    cpu: tuple[int, ...]      # computed on the CPU
    makespan_s: float         # max(cpu_s, load_s + gpu_s)
    cpu_s: float              # CPU_tail, for all remaining micro-batches
    load_s: float             # LOAD_head, MHA + gate included when they need loading
    gpu_s: float              # GPU_head, for all remaining micro-batches
    to_load: tuple[int, ...]  # the head: experts of `gpu` that are not resident yet


@dataclass(frozen=True)
class _Layer:
    """One split problem with every per-expert time computed once."""

    candidates: tuple[int, ...]     # non-resident experts with tokens, popularity order
    resident: tuple[int, ...]       # resident experts with tokens, popularity order
    rank: dict[int, int]
    cpu_s: dict[int, float]         # scaled by remaining_mbs
    gpu_s: dict[int, float]         # scaled by remaining_mbs
    expert_load_s: float
    base_load_s: float              # MHA + gate, or 0 when loaded already
    base_gpu_s: float               # resident experts' GPU work

    def evaluate(self, head: Iterable[int]) -> Split:
        head_set = set(head)
        head_t = tuple(sorted(head_set, key=self.rank.__getitem__))
        tail = tuple(e for e in self.candidates if e not in head_set)
        gpu = tuple(sorted(self.resident + head_t, key=self.rank.__getitem__))
        cpu_s = sum(self.cpu_s[e] for e in tail)
        load_s = self.base_load_s + len(head_t) * self.expert_load_s
        gpu_s = self.base_gpu_s + sum(self.gpu_s[e] for e in head_t)
        return Split(gpu=gpu, cpu=tail, makespan_s=max(cpu_s, load_s + gpu_s),
                     cpu_s=cpu_s, load_s=load_s, gpu_s=gpu_s, to_load=head_t)


def _layer(counts: Sequence[int], cost: CostSource, model: ModelConfig, *, threads: int,
           resident: Collection[int], load_attn_gate: bool, remaining_mbs: int, direction: str) -> _Layer:
    E = model.num_experts
    if len(counts) != E:
        raise ConfigError(f"got {len(counts)} token counts but {model.name} has {E} experts per layer; "
                          f"pass one count per expert")
    for e, n in enumerate(counts):
        if not _integer(n) or n < 0:
            raise ConfigError(f"token count of expert {e} must be a non-negative integer, got {n!r}")
    counts = [int(n) for n in counts]
    bad = [e for e in resident if not _integer(e) or not 0 <= e < E]
    if bad:
        raise ConfigError(f"resident experts {bad} are not expert ids; use ids in 0..{E - 1}")
    resident = {int(e) for e in resident}
    if not _integer(remaining_mbs) or remaining_mbs < 1:
        raise ConfigError(f"remaining_mbs must be a positive integer (this micro-batch included), "
                          f"got {remaining_mbs!r}")
    if not _integer(threads) or threads < 1:
        raise ConfigError(f"threads must be a positive integer, got {threads!r}")
    remaining_mbs, threads = int(remaining_mbs), int(threads)
    if direction not in DIRECTIONS:
        raise ConfigError(f"direction {direction!r} is unknown; use one of {', '.join(DIRECTIONS)}")

    order = sorted((e for e in range(E) if counts[e] > 0), key=lambda e: (-counts[e], e))
    base_load = 0.0
    if load_attn_gate:
        base_load = block_load_s(cost, model, "a") + block_load_s(cost, model, "g")
    # A GPU expert costs its kernels, or the host's time to issue them where that is longer
    # (every expert here has tokens); the host time is read once: this runs for every layer
    # and micro-batch of a simulation.
    host = cost.host_s("e", direction)
    gpu_s = {e: remaining_mbs * max(cost.gpu_s("e", counts[e], direction), host) for e in order}
    return _Layer(
        candidates=tuple(e for e in order if e not in resident),
        resident=tuple(e for e in order if e in resident),
        rank={e: i for i, e in enumerate(order)},
        cpu_s={e: remaining_mbs * cost.cpu_expert_s(counts[e], direction, threads)
               for e in order if e not in resident},
        gpu_s=gpu_s,
        expert_load_s=block_load_s(cost, model, "e"),
        base_load_s=base_load,
        base_gpu_s=sum(gpu_s[e] for e in order if e in resident),
    )


def split_experts(counts: Sequence[int], cost: CostSource, model: ModelConfig, *, threads: int,
                  resident: Collection[int] = (), load_attn_gate: bool = False,
                  remaining_mbs: int = 1, direction: str = "fwd", max_cpu_s: float = math.inf) -> Split:
    """The best split of one layer's experts among the prefixes of their popularity ranking.

    counts: tokens per expert for this micro-batch (backward: summed over the stage's
    micro-batches). resident: experts already on the GPU. load_attn_gate: the layer's MHA
    and gate still need loading. remaining_mbs: micro-batches still to run, this one
    included. threads: CPU cores that run CPU experts. max_cpu_s: the most CPU time the
    tail may take (the CPU's slack where other work waits for it; every expert loaded
    always fits).

    Tries every head size k = 0..E' (E' = non-resident experts with tokens) whose tail fits
    max_cpu_s and keeps the least makespan; a tie goes to the larger head (fewer CPU experts).
    """
    layer = _layer(counts, cost, model, threads=threads, resident=resident,
                   load_attn_gate=load_attn_gate, remaining_mbs=remaining_mbs, direction=direction)
    cands = layer.candidates
    # makespan(k) from running sums: tail CPU shrinks and head load + GPU grows with k.
    tail_cpu = [0.0] * (len(cands) + 1)
    for i in range(len(cands) - 1, -1, -1):
        tail_cpu[i] = tail_cpu[i + 1] + layer.cpu_s[cands[i]]
    head_gpu = layer.base_load_s + layer.base_gpu_s
    spans = []
    for k in range(len(cands) + 1):
        if k:
            head_gpu += layer.expert_load_s + layer.gpu_s[cands[k - 1]]
        spans.append(max(tail_cpu[k], head_gpu))
    # a tail "fits" within the same float tolerance as a tie (its sum taken in another order)
    fits = [i for i in range(len(spans)) if tail_cpu[i] <= max_cpu_s * (1 + _TIE_RTOL)] or [len(cands)]
    best = min(spans[i] for i in fits)
    k = max(i for i in fits if spans[i] <= best * (1 + _TIE_RTOL))
    return layer.evaluate(cands[:k])


def paper_split(counts: Sequence[int], cost: CostSource, model: ModelConfig, *, threads: int,
                resident: Collection[int] = (), load_attn_gate: bool = False,
                remaining_mbs: int = 1, direction: str = "fwd") -> Split:
    """The paper's greedy rule (Eq. 1), for comparison: GPU compute is assumed hidden by loading.

    Starting with every non-resident expert on the CPU, move experts to the head in rank
    order while R = CPU_tail / LOAD_head > 1; stop at the first head where R <= 1. The
    returned `Split` is scored with the full model (GPU compute included).
    """
    layer = _layer(counts, cost, model, threads=threads, resident=resident,
                   load_attn_gate=load_attn_gate, remaining_mbs=remaining_mbs, direction=direction)
    cands = layer.candidates
    tail_cpu = sum(layer.cpu_s[e] for e in cands)
    load = layer.base_load_s
    k = 0
    # R > 1, written without dividing so that LOAD_head = 0 counts as R = infinity.
    while k < len(cands) and tail_cpu > load:
        tail_cpu -= layer.cpu_s[cands[k]]
        load += layer.expert_load_s
        k += 1
    return layer.evaluate(cands[:k])


def evaluate_split(to_load: Iterable[int], counts: Sequence[int], cost: CostSource, model: ModelConfig, *,
                   threads: int, resident: Collection[int] = (), load_attn_gate: bool = False,
                   remaining_mbs: int = 1, direction: str = "fwd") -> Split:
    """Score a given head (any set of non-resident experts with tokens), e.g. for searches."""
    layer = _layer(counts, cost, model, threads=threads, resident=resident,
                   load_attn_gate=load_attn_gate, remaining_mbs=remaining_mbs, direction=direction)
    head = set(to_load)
    extra = sorted(head - set(layer.candidates))
    if extra:
        raise ConfigError(f"experts {extra} cannot be loaded: they are resident or have no tokens")
    return layer.evaluate(head)
