"""EVAL.md's metrics in plain numpy: per-gene Pearson/Spearman (constant -> 0), depth control, Recall@k.

The one implementation of each, used by :mod:`comtip.tl` (scores), :mod:`comtip.train` (validation) and
:mod:`comtip.bench` (the evaluation protocol, which exposes them publicly). A leaf module: it imports nothing of comtip.
"""

from __future__ import annotations

import numpy as np


def _center(x: np.ndarray) -> np.ndarray:
    return x - x.mean(axis=0, keepdims=True)


def pearson_per_gene(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Pearson r of each column of ``pred`` with the same column of ``true``; a constant column scores 0.

    Parameters
    ----------
    pred, true
        ``(n_spots, n_genes)`` arrays; rows with NaN in ``pred`` are not allowed (select the spots first).
    """
    pred = np.asarray(pred, dtype=np.float64)
    true = np.asarray(true, dtype=np.float64)
    if pred.shape != true.shape:
        msg = f"pred and true differ in shape: {pred.shape} vs {true.shape}."
        raise ValueError(msg)
    a, b = _center(pred), _center(true)
    na, nb = np.sqrt((a * a).sum(0)), np.sqrt((b * b).sum(0))
    scale = np.maximum(np.abs(pred).max(0, initial=0), np.abs(true).max(0, initial=0)) + 1.0
    ok = (na > 1e-9 * scale * np.sqrt(len(a))) & (nb > 1e-9 * scale * np.sqrt(len(b)))
    r = np.zeros(pred.shape[1])
    r[ok] = (a[:, ok] * b[:, ok]).sum(0) / (na[ok] * nb[ok])
    return np.clip(r, -1.0, 1.0)


def _rank(x: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata

    return rankdata(x, axis=0, method="average")


def spearman_per_gene(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Spearman rho per gene (Pearson of average ranks); a constant column scores 0."""
    return pearson_per_gene(_rank(np.asarray(pred)), _rank(np.asarray(true)))


def residualize(x: np.ndarray, covariate: np.ndarray) -> np.ndarray:
    """Residuals of each column of ``x`` after least squares on ``[1, covariate]``."""
    x = np.asarray(x, dtype=np.float64)
    design = np.column_stack([np.ones(len(covariate)), np.asarray(covariate, dtype=np.float64)])
    coef, *_ = np.linalg.lstsq(design, x, rcond=None)
    return x - design @ coef


def pearson_depth_adjusted(pred: np.ndarray, true: np.ndarray, log_depth: np.ndarray) -> np.ndarray:
    """Partial correlation given sequencing depth: Pearson r after residualising both on [1, log total UMI]."""
    return pearson_per_gene(residualize(pred, log_depth), residualize(true, log_depth))


def self_rank(sim: np.ndarray) -> np.ndarray:
    """Rank of each query's own key (row i's column i) among all keys by similarity; ties count against it.

    The number of keys strictly more similar than its own, plus the other keys exactly as similar: a query finds
    itself in the top k when its rank is below k (EVAL.md: ties are misses).

    Parameters
    ----------
    sim
        ``(n, n)`` similarities of query i (rows) to key j (columns).
    """
    own = np.diag(sim)[:, None]
    return (sim > own).sum(1) + ((sim == own).sum(1) - 1)


def recall_at_k(query: np.ndarray, keys: np.ndarray, k: int = 5) -> float:
    """Share of queries i whose own key i is among the k most similar keys (cosine); ties count as misses.

    A query or key with a non-finite entry (e.g. the NaN gene embedding of a spot without panel genes) has no
    similarity: such a query counts as a miss, and such a key never ranks above another.

    Parameters
    ----------
    query, keys
        ``(n, d)``, row i of ``query`` belongs with row i of ``keys``.
    """
    q = np.asarray(query, dtype=np.float64)
    kk = np.asarray(keys, dtype=np.float64)
    valid = np.isfinite(q).all(1) & np.isfinite(kk).all(1)
    q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
    kk = kk / np.maximum(np.linalg.norm(kk, axis=1, keepdims=True), 1e-12)
    with np.errstate(invalid="ignore"):
        sim = q @ kk.T
    sim[~np.isfinite(sim)] = -np.inf
    return float(np.mean((self_rank(sim) < k) & valid))


def panel_metrics(
    pred: np.ndarray, true: np.ndarray, log_depth: np.ndarray, panels: dict[str, np.ndarray]
) -> dict[str, float]:
    """EVAL.md's per-panel scores of predictions: mean Pearson, depth-controlled Pearson, Spearman and MSE.

    Parameters
    ----------
    pred, true
        ``(n_spots, n_genes)`` predicted and measured log-normalised expression.
    log_depth
        ``(n_spots,)`` log total UMI of each spot (the depth control).
    panels
        ``{panel: column indices}``, e.g. ``{"hvg50": ..., "heg250": ...}``.

    Returns
    -------
    ``{"pcc_<panel>", "pcc_<panel>_adj", "spearman_<panel>", "mse_<panel>"}`` for every panel, unrounded.
    """
    out = {}
    for panel, gi in panels.items():
        p, t = pred[:, gi], true[:, gi]
        out[f"pcc_{panel}"] = float(np.mean(pearson_per_gene(p, t)))
        out[f"pcc_{panel}_adj"] = float(np.mean(pearson_depth_adjusted(p, t, log_depth)))
        out[f"spearman_{panel}"] = float(np.mean(spearman_per_gene(p, t)))
        out[f"mse_{panel}"] = float(np.mean((p - t) ** 2))
    return out


def profile_recall(pred: np.ndarray, true: np.ndarray, mean: np.ndarray, sd: np.ndarray, k: int = 5) -> float:
    """Recall@k of predicted against measured profiles, both z-scored with the training ``mean`` and ``sd``.

    EVAL.md's Recall@5 for methods without a shared space: spot i's predicted profile against all measured ones
    (cosine; ties count as misses, see :func:`recall_at_k`).
    """
    return recall_at_k((pred - mean) / sd, (true - mean) / sd, k)
