"""Predictions the protocol scores: from a reference (retrieval, the ridge probe) and CoMTIP's zero-shot read-out."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from ..tl._reference import knn_retrieval, ridge_probe


def reference_predict(
    method: str,
    train_features: np.ndarray,
    train_expression: np.ndarray,
    query_features: np.ndarray,
    panels: Mapping[str, np.ndarray],
    genes: Sequence[str],
) -> np.ndarray:
    """EVAL.md's reference methods: kNN retrieval (all genes at once) or the ridge probe (one α per panel).

    Parameters
    ----------
    method
        A name containing ``"retrieval"`` (e.g. ``"imagenet_retrieval"``: :func:`knn_retrieval` with k = 50 and
        temperature 0.1) or else the probe (e.g. ``"comtip_probe"``: :func:`ridge_probe`, fitted once per panel).
    train_features, train_expression
        ``(n_train, d)`` image features and ``(n_train, n_genes)`` log-normalised expression of the reference spots.
    query_features
        ``(n_query, d)`` image features of the spots to predict.
    panels
        ``{panel: column indices}`` into ``genes`` (the probe's α is chosen per panel; columns in no panel stay 0).
    genes
        The columns of ``train_expression``.

    Returns
    -------
    ``(n_query, n_genes)`` predictions.

    Examples
    --------
    >>> idx = {p: np.array([genes.index(g) for g in panels[p]]) for p in ("hvg50", "heg250")}
    >>> pred = ct.bench.reference_predict("imagenet_probe", f_train, y_train, f_test, idx, genes)
    """
    if "retrieval" in method:
        return knn_retrieval(train_features, train_expression, query_features, k=50, temperature=0.1)
    pred = np.zeros((len(query_features), len(genes)))
    for gi in panels.values():
        p, _ = ridge_probe(train_features, train_expression[:, gi], query_features)
        pred[:, gi] = p
    return pred


def zero_shot(
    model,
    prompt_embeddings: np.ndarray,
    genes: Sequence[str],
    *,
    descriptions: Mapping[str, str] | None = None,
    n_levels: int | None = None,
) -> np.ndarray:
    """CoMTIP's zero-shot read-out of image embeddings: gene–value prompts, no reference expression.

    The prediction of :func:`comtip.tl.predict_expression` (``method="zero_shot"``) from embeddings already made.

    Parameters
    ----------
    model
        A :class:`comtip.CoMTIP`.
    prompt_embeddings
        ``(n, d)`` image embeddings in the prompt space (``image_embeddings(...)["prompt"]``).
    genes
        Genes to predict; genes outside the model's panel are prompted from their description (the model itself
        keeps its panel).
    descriptions
        ``{gene: text}`` for genes without an entry in comtip's gene-text table.
    n_levels
        Value levels per gene (``None``: the model's own).

    Returns
    -------
    ``(n, n_genes)`` float32 predicted log-normalised expression.

    Examples
    --------
    >>> emb = ct.bench.image_embeddings(model, spots, names)
    >>> pred = ct.bench.zero_shot(model, emb["prompt"], ["ERBB2", "KRT19"])
    """
    from ..tl._predict import _zero_shot

    return _zero_shot(model, prompt_embeddings, list(genes), descriptions=descriptions, n_levels=n_levels)


def new_gene_levels(model, n_genes: int, n_levels: int | None = None) -> np.ndarray:
    """The value levels zero-shot prediction gives genes outside the panel: the median level curve of the panel.

    Parameters
    ----------
    model
        A :class:`comtip.CoMTIP`.
    n_genes
        How many new genes (rows).
    n_levels
        Levels per gene (``None``: the model's own).

    Returns
    -------
    ``(n_genes, n_levels)`` float32, ascending in each row.
    """
    from ..tl._predict import _new_gene_levels

    return _new_gene_levels(model, n_genes, model.n_value_levels if n_levels is None else n_levels)
