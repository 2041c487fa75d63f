"""Expert popularity simulator: the per-expert token counts that replace the real gate.

The schedules only need to know how many tokens every expert receives, per iteration, per
layer and per micro-batch, and what the predictor gate believed beforehand. This module
produces both, either from a controllable generator or by replaying recorded counts.

Imbalance metric (DESIGN §1). ``G = mean over layers of sum_e p_e**2``, where ``p_e`` is the
share of a layer's token *assignments* routed to expert ``e`` (a Herfindahl index; the seed's
flag calls it ``--gini``). Uniform routing gives ``1/E``. With top-k routing every token goes
to k distinct experts, so ``p_e <= 1/k`` and the feasible range is ``[1/E, 1/k]``.

Generator, in four steps:

1. *Shape.* ``shares_for_G`` picks sorted shares with exactly the target G (a geometric
   profile, water-filled at the 1/k cap), rounded once to integer counts of the iteration's
   assignments (largest remainder). Every iteration thus hits the target up to integer
   granularity rather than on average (measured: within 0.008 at 128 assignments per
   iteration, 0.001 at 1024). The shape never changes; only which expert holds it does.
2. *Ranking.* Each layer has its own random ranking of experts (hot experts differ between
   layers). Between iterations the ranking drifts: every expert independently leaves its
   rank with probability q, and the leavers are shuffled among the ranks they left. See
   ``_expected_overlap`` for why this is exactly calibrated to the persistence parameter.
3. *Micro-batches.* A layer's assignments are laid out expert by expert over k passes of the
   iteration's tokens; as no expert has more assignments than there are tokens, each token
   receives k distinct experts. Tokens are then shuffled into micro-batches.
4. *Predictor.* Each true assignment is predicted correctly with probability ``accuracy``;
   otherwise it goes to another expert, drawn by the layer's popularity without the true one.

Randomness comes from one ``numpy.random.Generator`` built from the seed and used in
iteration order; a request for an iteration older than the small cache regenerates from
the seed, so ``iteration(i)`` is a pure function of (parameters, seed, i).

Replay file (``ReplayedPopularity``, ``write_counts_csv``): CSV with the header line::

    iteration,layer,microbatch,expert,tokens

and one row per count: the number of tokens (assignments) that ``expert`` of ``layer``
received in ``microbatch`` of ``iteration``; all fields are non-negative integers, indices
start at 0. Missing rows mean 0, but every micro-batch of every layer of every iteration up
to the largest one must have some tokens. Runs longer than the file wrap around: iteration
``i`` replays recorded iteration ``i % iterations_in_file``. The writer emits every count,
zeros included, so a file's shape round-trips without hints.
"""

from __future__ import annotations

import csv
import math
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from aptmoe.config import ConfigError

if TYPE_CHECKING:
    from aptmoe.config import RunConfig

CSV_HEADER = ("iteration", "layer", "microbatch", "expert", "tokens")

# Feasibility checks allow this much float slack, so that G = 1/E computed in floating
# point (e.g. 1/3) is accepted.
_EPS = 1e-12


# --------------------------------------------------------------------------- metrics


def _layer_totals(counts: np.ndarray) -> np.ndarray:
    """Counts as [layers, E]: micro-batches summed, a single layer promoted."""
    a = np.asarray(counts, dtype=np.float64)
    if a.ndim == 1:
        return a[None, :]
    if a.ndim == 2:
        return a
    if a.ndim == 3:
        return a.sum(axis=1)
    raise ConfigError(f"counts must be [E], [layers, E] or [layers, micro_batches, E]; got shape {a.shape}")


def _shares(counts: np.ndarray) -> np.ndarray:
    totals = _layer_totals(counts)
    sums = totals.sum(axis=1, keepdims=True)
    if (totals < 0).any() or (sums <= 0).any():
        raise ConfigError("counts must be non-negative with at least one token per layer")
    return totals / sums


def herfindahl(counts: np.ndarray) -> float:
    """The paper's G: mean over layers of sum_e p_e^2 (micro-batches summed first)."""
    return float((_shares(counts) ** 2).sum(axis=1).mean())


def gini_coefficient(counts: np.ndarray) -> float:
    """Standard Gini coefficient of the expert loads, averaged over layers.

    0 for uniform loads, (E-1)/E when one expert takes everything.
    """
    p = _shares(counts)
    E = p.shape[1]
    # mean absolute difference over all ordered pairs / (2 * mean); the mean share is 1/E
    mad = np.abs(p[:, :, None] - p[:, None, :]).sum(axis=(1, 2)) / (E * E)
    return float((mad * E / 2).mean())


def _least_used_weights(totals: np.ndarray, half: int) -> np.ndarray:
    """Membership of each expert in the least-used `half`, per layer.

    Experts tied at the boundary count share the remaining places equally: the expected
    membership under a random tie-break. Without it, an index-order tie-break would report
    perfect persistence for, e.g., a layer whose cold experts all have zero tokens.
    """
    L, E = totals.shape
    w = np.zeros((L, E))
    for layer in range(L):
        t = totals[layer]
        boundary = np.sort(t)[half - 1]
        below = t < boundary
        tied = t == boundary
        w[layer, below] = 1.0
        w[layer, tied] = (half - below.sum()) / tied.sum()
    return w


def least_used_overlap(a_totals: np.ndarray, b_totals: np.ndarray) -> float:
    """Mean over layers of |LU(a) ∩ LU(b)| / (E//2), LU = the E//2 least-used experts.

    Accepts [E], [layers, E] or [layers, micro_batches, E]. Ties at the boundary count are
    broken fractionally (see `_least_used_weights`), so uniform counts give E//2 / E.
    """
    a, b = _layer_totals(a_totals), _layer_totals(b_totals)
    if a.shape != b.shape:
        raise ConfigError(f"cannot compare popularity of shapes {a.shape} and {b.shape}")
    half = a.shape[1] // 2
    if half == 0:
        raise ConfigError("least-used overlap needs at least 2 experts")
    overlap = (_least_used_weights(a, half) * _least_used_weights(b, half)).sum(axis=1) / half
    return float(overlap.mean())


# --------------------------------------------------------------------------- shapes


def _check_feasible(num_experts: int, target_G: float, top_k: int) -> None:
    if not isinstance(num_experts, int) or num_experts < 1:
        raise ConfigError(f"num_experts must be a positive integer, got {num_experts!r}")
    if not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
        raise ConfigError(f"top_k must be an integer in [1, {num_experts}], got {top_k!r}")
    lo, hi = 1 / num_experts, 1 / top_k
    if not lo - _EPS <= target_G <= hi + _EPS:
        raise ConfigError(f"target G {target_G} is outside the feasible range [1/E, 1/k] = "
                          f"[{lo:.4g}, {hi:.4g}] for {num_experts} experts, top-{top_k}; choose G in it")


def _capped_geometric(num_experts: int, top_k: int, r: float) -> np.ndarray:
    """Shares proportional to r**e, water-filled so that none exceeds 1/k."""
    cap = 1 / top_k
    w = r ** np.arange(num_experts, dtype=np.float64)
    # m = number of experts at the cap; the first m that leaves the next share below the cap
    # is the water-filling solution, because the scale grows with m.
    for m in range(top_k):
        rest = w[m:].sum()
        if rest <= 0:
            break
        scale = (1 - m * cap) / rest
        if scale * w[m] <= cap * (1 + 1e-12):
            p = np.concatenate([np.full(m, cap), np.minimum(scale * w[m:], cap)])
            return p / p.sum()
    p = np.zeros(num_experts)
    p[:top_k] = cap
    return p


def shares_for_G(num_experts: int, target_G: float, top_k: int = 1) -> np.ndarray:
    """Sorted descending shares that sum to 1, each <= 1/k, with sum of squares == target_G.

    A geometric profile keeps the family smooth in G, and G falls monotonically as the ratio
    r rises from 0 (the k capped experts take everything, G = 1/k) to 1 (uniform, G = 1/E),
    so bisection on r finds the target.
    """
    _check_feasible(num_experts, target_G, top_k)
    E, k = num_experts, top_k
    if target_G <= 1 / E + _EPS:
        return np.full(E, 1 / E)
    if target_G >= 1 / k - _EPS:
        return _capped_geometric(E, k, 0.0)
    lo, hi = 0.0, 1.0  # G(lo) > target > G(hi)
    for _ in range(200):
        mid = (lo + hi) / 2
        p = _capped_geometric(E, k, mid)
        g = float((p ** 2).sum())
        if abs(g - target_G) < 1e-13:
            break
        if g > target_G:
            lo = mid
        else:
            hi = mid
    return p


def _integer_shape(shares: np.ndarray, total: int, cap: int) -> np.ndarray:
    """Integer counts summing to `total`, each <= cap, closest to shares*total (largest
    remainder); sorted descending. Capping before rounding keeps float noise from pushing a
    share of exactly 1/k above the cap."""
    raw = np.minimum(shares * total, cap)
    n = np.floor(raw).astype(np.int64)
    order = np.argsort(-(raw - n), kind="stable")
    n[order[:total - int(n.sum())]] += 1
    if n.sum() != total or (n > cap).any():  # only float trouble could cause this
        raise ConfigError(f"cannot round shares to {total} assignments with at most {cap} per expert")
    return np.sort(n)[::-1].copy()


# --------------------------------------------------------------------------- persistence


def _expected_overlap(q: float, num_experts: int) -> float:
    """Expected least-used-half overlap after one drift step with leave probability q.

    Let m ~ Bin(E, q) experts leave, m_L of them from the h = E//2 least-used ranks; after
    the shuffle, m_L^2/m of those return to least-used ranks on average (hypergeometric),
    while stayers keep their ranks. Averaging over m_L, then m (m = 0 contributes nothing)::

        overlap(q) = 1 - q (1 - h/E) + (1 - h/E) ((1-q) - (1-q)^E) / (E - 1)

    It falls monotonically from 1 (q = 0, frozen) to h/E (q = 1, a fresh random ranking).
    """
    E = num_experts
    f = 1 - (E // 2) / E
    return 1 - q * f + f * ((1 - q) - (1 - q) ** E) / (E - 1)


def _leave_probability(persistence: float, num_experts: int) -> float:
    lo = (num_experts // 2) / num_experts
    if not lo - _EPS <= persistence <= 1 + _EPS:
        raise ConfigError(f"persistence {persistence} is outside [{lo:.4g}, 1] for {num_experts} experts: "
                          f"{lo:.4g} is what a fresh random ranking gives every iteration; choose a value in it")
    a, b = 0.0, 1.0  # overlap(a) >= persistence >= overlap(b)
    for _ in range(100):
        mid = (a + b) / 2
        if _expected_overlap(mid, num_experts) > persistence:
            a = mid
        else:
            b = mid
    return (a + b) / 2


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class IterationCounts:
    """One iteration's token counts; arrays are int64 [layers, micro_batches, E], read-only."""

    counts: np.ndarray      # true assignments
    predicted: np.ndarray   # the predictor gate's counts
    correct: np.ndarray | None = None  # true assignments the predictor got right (per true expert)

    def __post_init__(self) -> None:
        for name in ("counts", "predicted", "correct"):
            a = getattr(self, name)
            if a is None:
                continue
            a = np.array(a, dtype=np.int64)
            a.flags.writeable = False  # cached results are shared between callers
            object.__setattr__(self, name, a)
        if self.counts.ndim != 3 or self.predicted.shape != self.counts.shape:
            raise ConfigError(f"counts and predicted must share one [layers, micro_batches, E] shape; "
                              f"got {self.counts.shape} and {self.predicted.shape}")

    @property
    def G(self) -> float:
        return herfindahl(self.counts)

    @property
    def predictor_accuracy(self) -> float:
        """Measured per-assignment accuracy of the predictor (nan if not recorded)."""
        if self.correct is None:
            return math.nan
        return float(self.correct.sum() / self.counts.sum())

    def layer_totals(self) -> np.ndarray:
        """[layers, E]: counts summed over micro-batches."""
        return self.counts.sum(axis=1)


class PopularityModel(Protocol):
    def iteration(self, i: int) -> IterationCounts:
        """Counts of iteration i = 0, 1, 2...; the same i always gives the same result."""
        ...


def _predict(rng: np.random.Generator, counts: np.ndarray, accuracy: float,
             tokens_per_micro_batch: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(predicted, correct) counts for true `counts` [L, M, E] (step 4 of the module doc).

    With tokens_per_micro_batch given, predictions above it (possible only for top-k > 1,
    where a token's wrong guesses may pile onto one expert) are moved to experts with room,
    so predicted counts obey the same per-micro-batch bound as true ones. The move does not
    track true experts, so `correct` (sampled before it) stays the exposed ground truth.
    """
    L, M, E = counts.shape
    if E == 1:  # nothing else to guess
        return counts.copy(), counts.copy()
    correct = rng.binomial(counts, accuracy)
    p = counts.sum(axis=1) / counts.sum(axis=(1, 2))[:, None]  # [L, E] this iteration's shares
    others = 1.0 - np.eye(E)
    q = p[:, None, :] * others  # [L, true, guessed]
    mass = q.sum(axis=2, keepdims=True)
    q = np.where(mass > 0, q / np.where(mass > 0, mass, 1), others / (E - 1))
    moved = rng.multinomial(counts - correct, q[:, None, :, :])  # [L, M, true, guessed]
    predicted = correct + moved.sum(axis=2)
    cap = tokens_per_micro_batch
    if cap is not None:
        for layer, mb, e in np.argwhere(predicted > cap):
            excess = int(predicted[layer, mb, e] - cap)
            predicted[layer, mb, e] = cap
            while excess:
                room = np.maximum(cap - predicted[layer, mb], 0)  # other cells may still be over
                room[e] = 0
                w = np.where(room > 0, p[layer] + 1e-12, 0.0)
                got = np.minimum(rng.multinomial(excess, w / w.sum()), room)
                predicted[layer, mb] += got
                excess -= int(got.sum())
    return predicted, correct


class _Sequential:
    """Iterations generated in order from one seeded Generator, with a small cache; an
    older iteration is regenerated from the seed so results do not depend on call order."""

    _CACHE_SIZE = 8

    def __init__(self, seed: int) -> None:
        if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
            raise ConfigError(f"seed must be an integer, got {seed!r}")
        self._seed = int(seed)
        self._restart()

    def _restart(self) -> None:
        self._rng = np.random.default_rng(self._seed)
        self._next = 0
        self._cache: OrderedDict[int, IterationCounts] = OrderedDict()
        self._reset_state()

    def _reset_state(self) -> None:
        pass

    def _step(self, rng: np.random.Generator, i: int) -> IterationCounts:
        raise NotImplementedError

    def iteration(self, i: int) -> IterationCounts:
        if not isinstance(i, (int, np.integer)) or isinstance(i, bool) or i < 0:
            raise ConfigError(f"iteration index must be a non-negative integer, got {i!r}")
        i = int(i)
        if i in self._cache:
            return self._cache[i]
        if i < self._next:
            self._restart()
        while self._next <= i:
            self._cache[self._next] = self._step(self._rng, self._next)
            if len(self._cache) > self._CACHE_SIZE:
                self._cache.popitem(last=False)
            self._next += 1
        return self._cache[i]


def _check_positive(**values: int) -> None:
    for name, v in values.items():
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
            raise ConfigError(f"{name} must be a positive integer, got {v!r}")


def _check_accuracy(accuracy: float) -> None:
    if not 0 <= accuracy <= 1:
        raise ConfigError(f"predictor accuracy {accuracy} is outside [0, 1]")


# --------------------------------------------------------------------------- generator


class PopularityGenerator(_Sequential):
    """Synthetic counts with a fixed G, drifting hot experts and a noisy predictor."""

    def __init__(self, *, num_layers: int, num_experts: int, micro_batches: int,
                 tokens_per_micro_batch: int, top_k: int = 1, target_G: float = 0.6,
                 persistence: float = 0.73, predictor_accuracy: float = 0.85, seed: int = 42) -> None:
        _check_positive(num_layers=num_layers, num_experts=num_experts, micro_batches=micro_batches,
                        tokens_per_micro_batch=tokens_per_micro_batch)
        _check_accuracy(predictor_accuracy)
        shares = shares_for_G(num_experts, target_G, top_k)
        self.num_layers, self.num_experts, self.top_k = num_layers, num_experts, top_k
        self.micro_batches, self.tokens_per_micro_batch = micro_batches, tokens_per_micro_batch
        self.target_G, self.persistence, self.predictor_accuracy = target_G, persistence, predictor_accuracy
        tokens = micro_batches * tokens_per_micro_batch
        # counts by popularity rank, identical every iteration and layer
        self.shape = _integer_shape(shares, tokens * top_k, tokens)
        self._leave = _leave_probability(persistence, num_experts) if num_experts > 1 else 0.0
        super().__init__(seed)

    def _reset_state(self) -> None:
        self._ranking: np.ndarray | None = None  # [L, rank] -> expert

    def _drift(self, rng: np.random.Generator) -> np.ndarray:
        if self._ranking is None:
            return np.stack([rng.permutation(self.num_experts) for _ in range(self.num_layers)])
        ranking = self._ranking.copy()
        leaves = rng.random(ranking.shape) < self._leave
        for layer in range(self.num_layers):
            ranks = np.flatnonzero(leaves[layer])
            ranking[layer, ranks] = ranking[layer, rng.permutation(ranks)]
        return ranking

    def _step(self, rng: np.random.Generator, i: int) -> IterationCounts:
        L, M, E, k = self.num_layers, self.micro_batches, self.num_experts, self.top_k
        T = self.tokens_per_micro_batch
        self._ranking = self._drift(rng)
        # Assignments laid out expert by expert over k passes of the tokens: a run of at most
        # M*T consecutive slots never hits one token twice, so a token's k experts differ.
        labels = np.stack([np.repeat(self._ranking[layer], self.shape) for layer in range(L)])
        labels = labels.reshape(L, k, M * T)
        # dealing the tokens into micro-batches at random = a shuffled micro-batch label per token
        micro_batch = rng.permuted(np.broadcast_to(np.arange(M * T) // T, (L, M * T)), axis=1)
        flat = ((np.arange(L)[:, None, None] * M + micro_batch[:, None, :]) * E + labels).ravel()
        counts = np.bincount(flat, minlength=L * M * E).reshape(L, M, E)
        predicted, correct = _predict(rng, counts, self.predictor_accuracy, T if k > 1 else None)
        return IterationCounts(counts, predicted, correct)


# --------------------------------------------------------------------------- replay


def _read_counts_csv(path: Path) -> np.ndarray:
    """[iterations, layers, micro_batches, E] from a replay file (format: module doc)."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
    except FileNotFoundError:
        raise ConfigError(f"popularity replay file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"popularity replay file {path} cannot be read: {e}") from None
    if not rows or tuple(c.strip() for c in rows[0]) != CSV_HEADER:
        raise ConfigError(f"popularity replay file {path} must start with the header line {','.join(CSV_HEADER)}")
    entries: dict[tuple[int, int, int, int], int] = {}
    for line, row in enumerate(rows[1:], start=2):
        if not row or all(not c.strip() for c in row):
            continue
        try:
            values = [int(c) for c in row]
        except ValueError:
            values = []
        if len(values) != 5 or min(values) < 0:
            raise ConfigError(f"popularity replay file {path}, line {line}: expected 5 non-negative "
                              f"integers ({','.join(CSV_HEADER)}), got {','.join(row)!r}")
        key = tuple(values[:4])
        if key in entries:
            raise ConfigError(f"popularity replay file {path}, line {line}: duplicate row for "
                              f"iteration {key[0]} layer {key[1]} microbatch {key[2]} expert {key[3]}")
        entries[key] = values[4]  # type: ignore[index]
    if not entries:
        raise ConfigError(f"popularity replay file {path} has no rows")
    keys = np.array(list(entries), dtype=np.int64)
    data = np.zeros(tuple(keys.max(axis=0) + 1), dtype=np.int64)
    data[tuple(keys.T)] = list(entries.values())
    return data


def write_counts_csv(path: str | Path, iterations: Iterable[IterationCounts | np.ndarray]) -> None:
    """Write true counts ([layers, micro_batches, E] each) in the replay format."""
    arrays = [np.asarray(it.counts if isinstance(it, IterationCounts) else it) for it in iterations]
    if not arrays or any(a.ndim != 3 or a.shape != arrays[0].shape for a in arrays):
        raise ConfigError("write_counts_csv needs one or more count arrays of one [layers, micro_batches, E] shape")
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_HEADER)
        for i, a in enumerate(arrays):
            for (layer, mb, e), tokens in np.ndenumerate(a):
                w.writerow((i, layer, mb, e, int(tokens)))


class ReplayedPopularity(_Sequential):
    """Recorded counts from a CSV (format: module doc), with simulated predictor counts."""

    def __init__(self, path: str | Path, *, predictor_accuracy: float = 0.85, seed: int = 42,
                 num_layers: int | None = None, num_experts: int | None = None,
                 micro_batches: int | None = None) -> None:
        _check_accuracy(predictor_accuracy)
        self.path = Path(path)
        data = _read_counts_csv(self.path)
        wanted = (None, num_layers, micro_batches, num_experts)
        names = ("iterations", "layers", "micro-batches", "experts")
        pad = []
        for axis, (size, want) in enumerate(zip(data.shape, wanted)):
            if want is not None and size > want:
                raise ConfigError(f"popularity replay file {self.path} has {size} {names[axis]} but the run has "
                                  f"{want}; record it with the run's shape or change the run")
            pad.append((0, 0 if want is None else want - size))  # trailing zero rows were omitted
        data = np.pad(data, pad)
        empty = np.argwhere(data.sum(axis=3) == 0)
        if len(empty):
            i, layer, mb = empty[0]
            raise ConfigError(f"popularity replay file {self.path} has no tokens for iteration {i}, layer "
                              f"{layer}, microbatch {mb}; every micro-batch of every layer needs counts")
        self.data = data
        self.predictor_accuracy = predictor_accuracy
        self.num_iterations, self.num_layers, self.micro_batches, self.num_experts = data.shape
        super().__init__(seed)

    def _step(self, rng: np.random.Generator, i: int) -> IterationCounts:
        counts = self.data[i % self.num_iterations]
        predicted, correct = _predict(rng, counts, self.predictor_accuracy)
        return IterationCounts(counts, predicted, correct)


# --------------------------------------------------------------------------- from a run


def popularity_from_config(cfg: "RunConfig") -> PopularityModel:
    """The run's popularity: the replay file if one is named, else the generator."""
    pop, m = cfg.popularity, cfg.model
    if pop.replay:
        return ReplayedPopularity(pop.replay, predictor_accuracy=pop.predictor_accuracy, seed=cfg.train.seed,
                                  num_layers=m.num_layers, num_experts=m.num_experts,
                                  micro_batches=cfg.micro_batches)
    if not m.is_moe:  # one FFN takes every token; G, drift and prediction are trivial
        return PopularityGenerator(num_layers=m.num_layers, num_experts=1, micro_batches=cfg.micro_batches,
                                   tokens_per_micro_batch=cfg.tokens_per_micro_batch, target_G=1.0,
                                   persistence=1.0, predictor_accuracy=1.0, seed=cfg.train.seed)
    return PopularityGenerator(num_layers=m.num_layers, num_experts=m.num_experts,
                               micro_batches=cfg.micro_batches, tokens_per_micro_batch=cfg.tokens_per_micro_batch,
                               top_k=m.top_k, target_G=pop.gini, persistence=pop.persistence,
                               predictor_accuracy=pop.predictor_accuracy, seed=cfg.train.seed)
