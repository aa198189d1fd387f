"""Expression for comtip: raw counts -> library-size normalisation (1e4) -> log1p, depth, gene panels, value levels."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import sparse

from .. import _constants as C
from .._checks import check_counts, counts_matrix

INPUT_KEY = C.INPUT_KEY  # table.uns["comtip_input"] = {"x_is_counts": False, "x_transform": "log1p"}
# the matrix to normalise and whether it holds counts (kept under its old name for the modules that import it here)
_counts_matrix = counts_matrix


def log_normalized(adata, *, layer: str | None = None, genes: Sequence[str] | None = None) -> sparse.csr_matrix:
    """Log-normalised expression (counts -> total 1e4 per spot -> log1p), without touching ``adata``.

    Parameters
    ----------
    adata
        Spots x genes; raw counts in ``layer``, else ``layers['counts']``, else ``X``. When
        ``adata.uns['comtip_input']['x_is_counts']`` is False, ``X`` is taken as log-normalised already.
    layer
        Layer with the raw counts.
    genes
        Return only these columns (in this order); genes not measured are all-zero columns.

    Returns
    -------
    CSR float32 matrix, spots x genes.
    """
    X, is_counts = counts_matrix(adata, layer)
    X = X.astype(np.float32)
    if is_counts:
        # a fixed warning location: shown once, however many times a tool normalises the same table
        check_counts(X, element=f"layer {layer!r}" if layer else "the table", stacklevel=1)
        total = np.asarray(X.sum(axis=1)).ravel()
        scale = np.divide(C.TARGET_SUM, total, out=np.zeros_like(total), where=total > 0)
        X = sparse.diags(scale.astype(np.float32)) @ X
        X = X.tocsr()
        X.data = np.log1p(X.data)
    if genes is not None:
        X = _columns(X, adata.var_names, genes)
    return sparse.csr_matrix(X, dtype=np.float32)


def _columns(X: sparse.csr_matrix, var_names: pd.Index, genes: Sequence[str]) -> sparse.csr_matrix:
    pos = pd.Index(var_names).get_indexer(list(genes))
    have = pos >= 0
    sel = sparse.csr_matrix((X.shape[0], len(pos)), dtype=np.float32)
    if have.any():
        sub = X[:, pos[have]]
        cols = np.flatnonzero(have)
        P = sparse.csr_matrix(
            (np.ones(len(cols), dtype=np.float32), (np.arange(len(cols)), cols)), shape=(len(cols), len(pos))
        )
        sel = (sub @ P).tocsr()
    return sel


def log_depth(adata, *, layer: str | None = None) -> np.ndarray:
    """``log1p`` of each spot's total count (sequencing depth); ``nan`` when only log-normalised data is at hand."""
    X, is_counts = counts_matrix(adata, layer)
    if not is_counts:
        return np.full(adata.n_obs, np.nan, dtype=np.float32)
    return np.log1p(np.asarray(X.sum(axis=1)).ravel()).astype(np.float32)


def candidate_genes(adata, *, min_frac: float = 0.1, layer: str | None = None) -> pd.Index:
    """Genes detected (count > 0) in at least ``min_frac`` of the spots (EVAL.md: 10 % of training spots)."""
    X, _ = counts_matrix(adata, layer)
    frac = np.asarray((X > 0).mean(axis=0)).ravel()
    return adata.var_names[frac >= min_frac]


def eval_panels(
    adata, *, min_frac: float = 0.1, n_hvg: int = 50, n_heg: int = 250, layer: str | None = None
) -> dict[str, list[str]]:
    """EVAL.md's gene panels from training spots: ``hvg50`` (highest variance) and ``heg250`` (highest mean).

    Both are taken among the candidate genes (detected in at least 10 % of the given spots) of the
    log-normalised expression.

    Parameters
    ----------
    adata
        The training spots only.

    Returns
    -------
    ``{"hvg50": [...], "heg250": [...], "candidates": [...]}``.
    """
    cand = candidate_genes(adata, min_frac=min_frac, layer=layer)
    Xn = log_normalized(adata, layer=layer, genes=cand)
    mean = np.asarray(Xn.mean(axis=0)).ravel()
    sq = np.asarray(Xn.multiply(Xn).mean(axis=0)).ravel()
    var = sq - mean**2
    hvg = cand[np.argsort(-var, kind="stable")[:n_hvg]]
    heg = cand[np.argsort(-mean, kind="stable")[:n_heg]]
    return {f"hvg{n_hvg}": list(hvg), f"heg{n_heg}": list(heg), "candidates": list(cand)}


def gene_panel(
    adata,
    *,
    n_top: int = 2048,
    min_frac: float = 0.1,
    include: Sequence[str] = (),
    layer: str | None = None,
) -> list[str]:
    """The gene panel of a model: candidate genes ranked by mean and by variance, interleaved, plus ``include``.

    Parameters
    ----------
    adata
        Training spots.
    n_top
        Panel size (before ``include``).
    min_frac
        Minimum fraction of spots in which a gene is detected.
    include
        Genes always in the panel when measured.

    Returns
    -------
    Gene symbols, the highest-expressed first.
    """
    cand = candidate_genes(adata, min_frac=min_frac, layer=layer)
    Xn = log_normalized(adata, layer=layer, genes=cand)
    mean = np.asarray(Xn.mean(axis=0)).ravel()
    var = np.asarray(Xn.multiply(Xn).mean(axis=0)).ravel() - mean**2
    by_mean = list(cand[np.argsort(-mean, kind="stable")])
    by_var = list(cand[np.argsort(-var, kind="stable")])
    panel: dict[str, None] = {}
    for a, b in zip(by_mean, by_var, strict=True):
        for g in (a, b):
            if len(panel) < n_top:
                panel.setdefault(g, None)
    for g in include:
        if g in adata.var_names:
            panel.setdefault(g, None)
    return list(panel)


def value_levels(values: np.ndarray, n_levels: int = 16) -> np.ndarray:
    """Prompt value levels per gene: 0, then ``n_levels - 1`` quantiles of the gene's positive values.

    Parameters
    ----------
    values
        ``(n, G)`` log-normalised expression of training spots (dense or sparse).
    n_levels
        K, the number of levels (level 0 included).

    Returns
    -------
    ``(G, K)`` float32, strictly increasing along K.
    """
    if n_levels < 2:
        msg = f"n_levels must be at least 2 (level 0 and one positive level), got {n_levels}."
        raise ValueError(msg)
    X = sparse.csc_matrix(values, dtype=np.float32)
    probs = (np.arange(1, n_levels) - 0.5) / (n_levels - 1)
    out = np.zeros((X.shape[1], n_levels), dtype=np.float32)
    global_pos = X.data[X.data > 0]
    fallback = np.quantile(global_pos, probs) if global_pos.size else np.linspace(0.1, 1.0, n_levels - 1)
    for g in range(X.shape[1]):
        col = X.data[X.indptr[g] : X.indptr[g + 1]]
        col = col[col > 0]
        out[g, 1:] = np.quantile(col, probs) if col.size >= 2 else fallback
    # strictly increasing (genes with few distinct values repeat quantiles)
    eps = 1e-3
    for k in range(1, n_levels):
        out[:, k] = np.maximum(out[:, k], out[:, k - 1] + eps)
    return out
