"""Expert popularity simulator (aptmoe.popularity, DESIGN §1)."""

import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aptmoe.config import ConfigError, ModelConfig, PopularityConfig, RunConfig
from aptmoe.popularity import (
    IterationCounts,
    PopularityGenerator,
    ReplayedPopularity,
    _capped_geometric,
    gini_coefficient,
    herfindahl,
    least_used_overlap,
    popularity_from_config,
    shares_for_G,
    write_counts_csv,
)

PAPER_GRID = [(8, G) for G in (0.2, 0.4, 0.6, 0.8)] + [(16, G) for G in (0.1, 0.2, 0.3, 0.4)] + \
             [(64, G) for G in (0.05, 0.1, 0.15, 0.2)]


def gen(**kw) -> PopularityGenerator:
    args = dict(num_layers=4, num_experts=8, micro_batches=2, tokens_per_micro_batch=64)
    args.update(kw)
    return PopularityGenerator(**args)


@st.composite
def feasible(draw):
    E = draw(st.integers(1, 64))
    k = draw(st.integers(1, min(E, 4)))
    G = draw(st.floats(1 / E, 1 / k))
    return E, k, G


# --------------------------------------------------------------------------- shapes and G


@settings(max_examples=200, deadline=None)
@given(feasible())
def test_shares_for_G_hits_target(ekg):
    E, k, G = ekg
    p = shares_for_G(E, G, k)
    assert p.shape == (E,)
    assert np.all(np.diff(p) <= 1e-15)
    assert abs(p.sum() - 1) < 1e-12
    assert p.max() <= 1 / k + 1e-12 and p.min() >= 0
    assert abs((p ** 2).sum() - G) < 1e-9


@pytest.mark.parametrize("E,k", [(2, 1), (8, 1), (8, 2), (16, 2), (64, 1), (64, 2), (64, 4)])
def test_G_falls_monotonically_with_ratio(E, k):
    gs = [float((_capped_geometric(E, k, r) ** 2).sum()) for r in np.linspace(0, 1, 501)]
    assert np.all(np.diff(gs) <= 1e-15)
    assert gs[0] == pytest.approx(1 / k) and gs[-1] == pytest.approx(1 / E)


@settings(max_examples=150, deadline=None)
@given(feasible(), st.integers(1, 4), st.integers(128, 600))
def test_achieved_G_for_any_feasible_target(ekg, M, tokens):
    E, k, G = ekg
    T = -(-tokens // M)  # at least 128 tokens per iteration: fewer cannot resolve G to 0.01
    assert abs(gen(num_experts=E, top_k=k, target_G=G, micro_batches=M, tokens_per_micro_batch=T,
                   num_layers=1).iteration(0).G - G) <= 0.01


@pytest.mark.parametrize("E,G,k", [(E, G, k) for E, G in PAPER_GRID for k in (1, 2) if G <= 1 / k])
@pytest.mark.parametrize("M,T", [(4, 4096), (2, 64)])
def test_achieved_G_on_paper_grid(E, G, k, M, T):
    g = gen(num_experts=E, top_k=k, target_G=G, micro_batches=M, tokens_per_micro_batch=T)
    for i in range(3):
        it = g.iteration(i)
        assert abs(it.G - G) <= 0.01
        per_layer = [herfindahl(layer) for layer in it.layer_totals()]
        assert max(abs(x - G) for x in per_layer) <= 0.01


@pytest.mark.parametrize("E,k,G", [(8, 1, 0.1), (8, 2, 0.6), (16, 1, 1.01), (64, 4, 0.3)])
def test_infeasible_G_is_a_config_error(E, k, G):
    with pytest.raises(ConfigError, match=r"feasible range \[1/E, 1/k\]"):
        shares_for_G(E, G, k)
    with pytest.raises(ConfigError, match=f"{1 / k:.4g}"):
        gen(num_experts=E, top_k=k, target_G=G)


# --------------------------------------------------------------------------- counts


@settings(max_examples=60, deadline=None)
@given(feasible(), st.integers(1, 4), st.integers(1, 200), st.integers(1, 3), st.floats(0, 1))
def test_counts_conserve_tokens(ekg, M, T, L, acc):
    E, k, G = ekg
    g = gen(num_layers=L, num_experts=E, top_k=k, target_G=G, micro_batches=M,
            tokens_per_micro_batch=T, predictor_accuracy=acc)
    for i in range(2):
        it = g.iteration(i)
        for a in (it.counts, it.predicted):
            assert a.shape == (L, M, E) and a.dtype == np.int64
            assert np.all(a.sum(axis=2) == T * k)
            assert a.min() >= 0 and a.max() <= T
        assert np.all(it.correct <= it.counts) and np.all(it.correct <= it.predicted)


def test_predicted_counts_obey_the_micro_batch_bound_under_heavy_top2_skew():
    # two experts near 1/2 each: wrong guesses would pile onto them without the repair
    g = gen(num_experts=8, top_k=2, target_G=0.48, predictor_accuracy=0.3, tokens_per_micro_batch=256)
    for i in range(5):
        assert g.iteration(i).predicted.max() <= 256


def test_deterministic_for_a_seed_and_different_across_seeds():
    a, b, c = gen(seed=7), gen(seed=7), gen(seed=8)
    for i in range(3):
        assert np.array_equal(a.iteration(i).counts, b.iteration(i).counts)
        assert np.array_equal(a.iteration(i).predicted, b.iteration(i).predicted)
    assert not np.array_equal(a.iteration(0).counts, c.iteration(0).counts)


def test_results_do_not_depend_on_access_order():
    fresh = gen(seed=3)
    expected = [fresh.iteration(i).predicted for i in range(12)]
    jumpy = gen(seed=3)
    jumpy.iteration(11)  # pushes iteration 0 out of the cache
    for i in (0, 5, 11, 2):
        assert np.array_equal(jumpy.iteration(i).predicted, expected[i])


def test_hot_experts_differ_between_layers():
    it = gen(num_layers=16, num_experts=16, target_G=0.3).iteration(0)
    hottest = it.layer_totals().argmax(axis=1)
    assert len(set(hottest.tolist())) > 4


def test_shape_is_fixed_while_owners_drift():
    g = gen(num_experts=16, target_G=0.2, persistence=0.6)
    first, later = g.iteration(0).layer_totals(), g.iteration(5).layer_totals()
    assert np.array_equal(np.sort(first, axis=1), np.sort(later, axis=1))
    assert not np.array_equal(first, later)


# --------------------------------------------------------------------------- persistence


@pytest.mark.parametrize("E,G", [(8, 0.4), (16, 0.2), (64, 0.1)])
@pytest.mark.parametrize("persistence", [1.0, 0.73, 0.6])
def test_least_used_overlap_matches_persistence(E, G, persistence):
    g = gen(num_layers=8, num_experts=E, target_G=G, persistence=persistence,
            micro_batches=2, tokens_per_micro_batch=1024)
    totals = [g.iteration(i).layer_totals() for i in range(121)]
    overlaps = [least_used_overlap(a, b) for a, b in zip(totals, totals[1:])]
    assert abs(np.mean(overlaps) - persistence) <= 0.05


def test_random_level_persistence_is_a_fresh_ranking():
    g = gen(num_layers=8, num_experts=8, target_G=0.4, persistence=0.5)
    totals = [g.iteration(i).layer_totals() for i in range(121)]
    assert abs(np.mean([least_used_overlap(a, b) for a, b in zip(totals, totals[1:])]) - 0.5) <= 0.05


def test_persistence_below_random_is_a_config_error():
    with pytest.raises(ConfigError, match=r"outside \[0\.5, 1\]"):
        gen(num_experts=8, persistence=0.3)


def test_least_used_overlap_edge_cases():
    a = np.array([[1, 2, 3, 4], [4, 3, 2, 1]])
    assert least_used_overlap(a, a) == 1.0
    assert least_used_overlap(a, a[::-1]) == 0.0
    assert least_used_overlap(np.ones(8), np.arange(8)) == pytest.approx(0.5)  # ties: random level


# --------------------------------------------------------------------------- predictor


@pytest.mark.parametrize("accuracy,k", [(0.85, 1), (0.64, 1), (0.64, 2), (0.0, 1), (1.0, 2)])
def test_predictor_accuracy_near_target(accuracy, k):
    g = gen(num_layers=8, num_experts=16, top_k=k, target_G=0.2, predictor_accuracy=accuracy,
            micro_batches=4, tokens_per_micro_batch=512)
    its = [g.iteration(i) for i in range(5)]
    measured = sum(int(it.correct.sum()) for it in its) / sum(int(it.counts.sum()) for it in its)
    assert abs(measured - accuracy) <= 0.01
    assert abs(its[0].predictor_accuracy - accuracy) <= 0.02
    if accuracy == 1.0:
        assert all(np.array_equal(it.predicted, it.counts) for it in its)
    if accuracy == 0.0:
        assert not np.array_equal(its[0].predicted, its[0].counts)


# --------------------------------------------------------------------------- metrics


def test_gini_and_herfindahl_values():
    assert gini_coefficient(np.full(8, 100)) == 0.0
    assert gini_coefficient(np.array([0, 0, 0, 7])) == pytest.approx(3 / 4)
    assert gini_coefficient(np.array([1, 2, 3, 4])) == pytest.approx(0.25)
    assert herfindahl(np.full(16, 3)) == pytest.approx(1 / 16)
    three_d = np.array([[[1, 3], [1, 1]], [[2, 0], [0, 2]]])  # layer shares (1/3, 2/3) and (1/2, 1/2)
    assert herfindahl(three_d) == pytest.approx((5 / 9 + 1 / 2) / 2)
    with pytest.raises(ConfigError):
        herfindahl(np.zeros(4))


# --------------------------------------------------------------------------- replay


def test_csv_round_trip_and_wrap_around(tmp_path):
    g = gen(num_layers=3, num_experts=8, micro_batches=2)
    recorded = [g.iteration(i) for i in range(4)]
    path = tmp_path / "counts.csv"
    write_counts_csv(path, recorded)
    r = ReplayedPopularity(path, predictor_accuracy=0.64, seed=1, num_layers=3, num_experts=8, micro_batches=2)
    for i in range(6):
        assert np.array_equal(r.iteration(i).counts, recorded[i % 4].counts)
    assert r.iteration(5).G == pytest.approx(recorded[1].G)
    assert abs(np.mean([r.iteration(i).predictor_accuracy for i in range(4)]) - 0.64) < 0.05
    again = ReplayedPopularity(path, predictor_accuracy=0.64, seed=1)
    assert np.array_equal(again.iteration(2).predicted, r.iteration(2).predicted)


def test_replay_missing_rows_are_zero_and_shape_is_checked(tmp_path):
    path = tmp_path / "sparse.csv"
    path.write_text("iteration,layer,microbatch,expert,tokens\n0,0,0,1,5\n0,0,1,0,3\n")
    r = ReplayedPopularity(path, num_experts=4)
    assert r.iteration(0).counts.tolist() == [[[0, 5, 0, 0], [3, 0, 0, 0]]]
    with pytest.raises(ConfigError, match="has 2 experts but the run has 1"):
        ReplayedPopularity(path, num_experts=1)
    with pytest.raises(ConfigError, match="no tokens for iteration 0, layer 1"):
        ReplayedPopularity(path, num_layers=2)


@pytest.mark.parametrize("text,problem", [
    ("iter,layer,mb,expert,tokens\n0,0,0,0,1\n", "header"),
    ("iteration,layer,microbatch,expert,tokens\n0,0,0,x,1\n", "line 2"),
    ("iteration,layer,microbatch,expert,tokens\n0,0,0,0,1\n0,0,0,1,-3\n", "line 3"),
    ("iteration,layer,microbatch,expert,tokens\n0,0,0,0,1\n0,0,0,0,2\n", "duplicate"),
    ("iteration,layer,microbatch,expert,tokens\n0,0,0\n", "5 non-negative integers"),
    ("iteration,layer,microbatch,expert,tokens\n", "no rows"),
    ("iteration,layer,microbatch,expert,tokens\n1,0,0,0,4\n", "no tokens for iteration 0"),
])
def test_corrupt_csv_is_a_config_error(tmp_path, text, problem):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(ConfigError, match=problem) as e:
        ReplayedPopularity(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_missing_replay_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        ReplayedPopularity(tmp_path / "nope.csv")


# --------------------------------------------------------------------------- from a run


def test_popularity_from_config_generator_dense_and_replay(tmp_path):
    cfg = RunConfig()
    it = popularity_from_config(cfg).iteration(0)
    assert it.counts.shape == (cfg.model.num_layers, cfg.micro_batches, cfg.model.num_experts)
    assert np.all(it.counts.sum(axis=2) == cfg.tokens_per_micro_batch)
    assert abs(it.G - cfg.popularity.gini) <= 0.01

    dense = cfg.replace(model=ModelConfig(is_moe=False, num_experts=1, num_layers=8))
    it = popularity_from_config(dense).iteration(0)
    assert it.counts.shape == (8, dense.micro_batches, 1)
    assert np.all(it.counts[..., 0] == dense.tokens_per_micro_batch)
    assert np.array_equal(it.predicted, it.counts)

    small = cfg.replace(model=ModelConfig(num_layers=8))
    path = tmp_path / "rec.csv"
    write_counts_csv(path, [popularity_from_config(small).iteration(0)])
    replayed = popularity_from_config(small.replace(popularity=PopularityConfig(replay=str(path))))
    assert isinstance(replayed, ReplayedPopularity)
    with pytest.raises(ConfigError, match="has 8 layers but the run has 4"):
        popularity_from_config(small.replace(model=ModelConfig(num_layers=4),
                                             popularity=PopularityConfig(replay=str(path))))


def test_iteration_counts_are_read_only():
    it = gen().iteration(0)
    assert isinstance(it, IterationCounts)
    with pytest.raises(ValueError):
        it.counts[0, 0, 0] = 1


def test_core_module_imports_neither_torch_nor_simpy():
    code = "import sys, aptmoe.popularity; print(sorted({'torch', 'simpy'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
