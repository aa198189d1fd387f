"""EVAL.md's metrics on small cases with answers worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from comtip._metrics import pearson_depth_adjusted, pearson_per_gene, recall_at_k, spearman_per_gene


def test_pearson_per_gene_known_values_and_constant_columns():
    true = np.array([[1.0, 0.0, 2.0], [2.0, 0.0, 2.0], [3.0, 0.0, 2.0], [4.0, 0.0, 2.0]])
    pred = np.array([[2.0, 1.0, 5.0], [4.0, 2.0, 5.0], [6.0, 3.0, 5.0], [8.0, 4.0, 6.0]])
    r = pearson_per_gene(pred, true)
    # gene 0: exact linear relation; gene 1: true is constant; gene 2: true is constant (pred is not)
    np.testing.assert_allclose(r, [1.0, 0.0, 0.0])
    np.testing.assert_allclose(pearson_per_gene(-pred, true)[0], -1.0)
    # x = (1, 3, 2, 4), y = (1, 2, 3, 4): centred products 2.25 - 0.25 - 0.25 + 2.25 = 4, both sums of squares 5: r = 0.8
    r2 = pearson_per_gene(np.array([[1.0], [3.0], [2.0], [4.0]]), true[:, :1])
    np.testing.assert_allclose(r2, [0.8])
    with pytest.raises(ValueError, match="differ in shape"):
        pearson_per_gene(pred[:, :2], true)


def test_spearman_uses_average_ranks():
    true = np.array([[1.0], [2.0], [3.0], [4.0]])
    pred = np.array([[10.0], [100.0], [1000.0], [10000.0]])  # monotone, far from linear
    np.testing.assert_allclose(spearman_per_gene(pred, true), [1.0])
    assert pearson_per_gene(pred, true)[0] < 0.9
    tied = np.array([[1.0], [1.0], [2.0], [3.0]])  # ranks 1.5, 1.5, 3, 4
    expected = np.corrcoef([1.5, 1.5, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0])[0, 1]
    np.testing.assert_allclose(spearman_per_gene(tied, true), [expected])


def test_depth_adjusted_is_the_partial_correlation():
    rng = np.random.default_rng(0)
    n = 500
    depth = rng.normal(size=n)
    # both depend on depth; given depth, they share the signal s
    s = rng.normal(size=n)
    pred = (2.0 * depth + s + 0.5 * rng.normal(size=n))[:, None]
    true = (1.5 * depth + s + 0.5 * rng.normal(size=n))[:, None]
    # textbook formula r_xy.z = (r_xy - r_xz r_yz) / sqrt((1 - r_xz^2)(1 - r_yz^2))
    c = np.corrcoef(np.column_stack([pred[:, 0], true[:, 0], depth]).T)
    r_xy, r_xz, r_yz = c[0, 1], c[0, 2], c[1, 2]
    partial = (r_xy - r_xz * r_yz) / np.sqrt((1 - r_xz**2) * (1 - r_yz**2))
    np.testing.assert_allclose(pearson_depth_adjusted(pred, true, depth), [partial], rtol=1e-10)
    # depth alone "predicts" a depth-driven gene raw, and scores 0 once depth is controlled
    assert pearson_per_gene(depth[:, None], true)[0] > 0.7
    np.testing.assert_allclose(pearson_depth_adjusted(depth[:, None], true, depth), [0.0], atol=1e-12)


def test_recall_at_k_counts_own_key_in_top_k_ties_and_missing_rows_as_misses():
    keys = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]])
    # queries 0, 2 and 3 are closest to their own key; query 1 (0.5, 1) is closer to key 2 (cos 0.95) than to its
    # own key 1 (cos 0.89), so it ranks its own key second
    query = np.array([[1.0, 0.1], [0.5, 1.0], [1.0, 1.0], [-1.0, 0.0]])
    assert recall_at_k(query, keys, 1) == pytest.approx(3 / 4)  # query 1 ranks key 2 first
    assert recall_at_k(query, keys, 2) == pytest.approx(1.0)
    # a tie with another key counts as a miss at k = 1
    tie_keys = np.array([[1.0, 0.0], [1.0, 0.0]])
    assert recall_at_k(np.array([[1.0, 0.0], [1.0, 0.0]]), tie_keys, 1) == 0.0
    # a key without an embedding (NaN): its query misses, and it never ranks above another key
    nan_keys = keys.copy()
    nan_keys[3] = np.nan
    assert recall_at_k(query, nan_keys, 1) == pytest.approx(2 / 4)
    assert recall_at_k(query, nan_keys, 4) == pytest.approx(3 / 4)


def test_self_rank_counts_better_keys_and_ties_against_the_query():
    from comtip._metrics import self_rank

    sim = np.array([[0.9, 0.1, 0.2], [0.5, 0.4, 0.6], [0.3, 0.3, 0.3]])
    # row 0: nothing beats its own 0.9; row 1: two keys beat 0.4; row 2: two other keys tie with its own 0.3
    np.testing.assert_array_equal(self_rank(sim), [0, 2, 2])


def test_panel_metrics_and_profile_recall_are_evaluate_s_row():
    """One row of ct.bench.evaluate: means over each panel of the per-gene metrics, and the z-scored profile Recall."""
    import comtip as ct

    rng = np.random.default_rng(0)
    true = rng.normal(size=(40, 5))
    pred = true + rng.normal(size=(40, 5))
    pred[:, 4] = 1.0  # a constant prediction scores 0
    depth = rng.normal(size=40)
    panels = {"a": np.array([0, 1, 4]), "b": np.array([2, 3])}
    row = ct.bench.panel_metrics(pred, true, depth, panels)
    assert set(row) == {f"{m}_{p}" for p in "ab" for m in ("pcc", "spearman", "mse")} | {"pcc_a_adj", "pcc_b_adj"}
    r = pearson_per_gene(pred, true)
    assert r[4] == 0
    assert row["pcc_a"] == pytest.approx(np.mean(r[[0, 1, 4]]))
    assert row["pcc_b_adj"] == pytest.approx(np.mean(pearson_depth_adjusted(pred, true, depth)[[2, 3]]))
    assert row["spearman_b"] == pytest.approx(np.mean(spearman_per_gene(pred, true)[[2, 3]]))
    assert row["mse_a"] == pytest.approx(np.mean((pred[:, [0, 1, 4]] - true[:, [0, 1, 4]]) ** 2))
    mu, sd = true.mean(0), true.std(0)
    assert ct.bench.profile_recall(true, true, mu, sd) == 1.0  # a perfect prediction finds every spot
    assert ct.bench.profile_recall(pred, true, mu, sd, k=3) == recall_at_k((pred - mu) / sd, (true - mu) / sd, 3)
    # the metrics ct.bench exposes are EVAL.md's one implementation
    assert ct.bench.pearson_per_gene is pearson_per_gene and ct.bench.recall_at_k is recall_at_k
