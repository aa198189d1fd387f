"""Scoring predicted against measured expression (EVAL.md's metrics) into ``.var`` and ``.uns``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from .. import _constants as C
from .._checks import check_expression, check_names
from .._logging import logger
from .._metrics import pearson_depth_adjusted, pearson_per_gene, spearman_per_gene
from ._data import copy_data
from ._utils import check_free, record, resolve_table

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData


def score_expression(
    data,
    model=None,
    *,
    pred_layer: str = C.PRED_LAYER,
    layer: str | None = None,
    genes: Sequence[str] | None = None,
    panels: Mapping[str, Sequence[str]] | None = None,
    table_key: str = C.TABLE_KEY,
    key_added: str = C.SCORE_KEY,
    overwrite: bool = False,
    copy: bool = False,
) -> pd.DataFrame | AnnData | SpatialData:
    """Per-gene Pearson and Spearman correlation of predicted and measured expression (EVAL.md).

    Measured expression is log-normalised (counts -> 1e4 -> log1p) from the raw counts; correlations pool all
    spots with a prediction; a gene whose prediction or measurement is constant scores 0. The depth-controlled
    Pearson residualises both on [1, log total UMI] (the partial correlation given sequencing depth).

    Parameters
    ----------
    data
        SpatialData or AnnData with predictions in ``.layers[pred_layer]`` (from :func:`predict_expression`).
    model
        Model whose panels to use (default: the current model, if any); it is not run.
    pred_layer
        Layer of predictions (NaN = not predicted).
    layer
        Raw-count layer of the measured expression (default ``layers['counts']``, else ``X``).
    genes
        Genes to score; by default every gene with a prediction.
    panels
        ``{name: genes}`` to summarise over; by default the HVG50 / HEG250 panels stored in the model (fixed on its
        training spots), else those of ``data`` itself (then the summary says so).
    table_key
        Table of a SpatialData.
    key_added
        Prefix of the ``.var`` columns.
    overwrite
        Replace existing columns.
    copy
        Work on a copy of ``data`` (an AnnData's :meth:`~anndata.AnnData.copy`; for a SpatialData, a new object with
        copies of its tables, sharing its images and shapes) and return it; ``data`` is left as it was.

    Returns
    -------
    With ``copy=False``, a DataFrame indexed by gene with ``pearson``, ``spearman``, ``pearson_adj`` and one boolean
    column per panel; with ``copy=True``, the copy (the scores are in its ``.var``, the panels' summary in its
    ``.uns``). Sets ``.var['{key_added}_pearson']``, ``.var['{key_added}_spearman']``, ``.var['{key_added}_pearson_adj']``
    (NaN for genes not scored) and ``.uns['comtip']['score_expression']`` with the mean of each over every panel
    and over all scored genes, and the model that made the predictions (``model``, ``comtip_version``,
    ``weights_sha256``, copied from ``.uns['comtip']['predict_expression']``).

    Raises
    ------
    KeyError
        No ``.layers[pred_layer]`` (predictions of unmeasured genes live in ``.obsm`` and cannot be scored).
    ValueError
        Duplicated spot or gene names, no measured expression (image-only data), NaN or negative counts, fewer
        than 3 spots with predictions. Nothing is written.

    Examples
    --------
    >>> ct.tl.predict_expression(test)
    >>> ct.tl.score_expression(test).sort_values("pearson").tail()
    >>> scored = ct.tl.score_expression(test, copy=True)  # test is left as it was
    """
    from ..pp._expression import log_depth, log_normalized

    if copy:
        data = copy_data(data)
    adata = resolve_table(data, table_key)
    element = "The AnnData" if adata is data else f"Table {table_key!r}"
    check_names(adata, element=element)
    if pred_layer not in adata.layers:
        if pred_layer in adata.obsm:
            msg = (
                f"No predictions in .layers[{pred_layer!r}], only in .obsm[{pred_layer!r}]: none of the predicted genes "
                f"is among the measured genes (var_names, e.g. {list(adata.var_names[:3])}), so there is nothing to "
                "score against. Predict measured genes (ct.tl.predict_expression(data, genes=[...])) and check that "
                "var_names are gene symbols like the model's."
            )
        else:
            msg = (
                f"No predictions in .layers[{pred_layer!r}]; run ct.tl.predict_expression first (or pass pred_layer=)."
            )
        raise KeyError(msg)
    if adata.X is None and layer is None and C.COUNTS_LAYER not in adata.layers:
        msg = (
            f"{element} has no measured expression (X is empty: image-only data whose genes are the predicted ones), "
            "so predictions cannot be scored. Score on data with measured counts, or pass layer= with them."
        )
        raise ValueError(msg)
    check_expression(adata, layer=layer, element=element)
    cols = [f"{key_added}_pearson", f"{key_added}_spearman", f"{key_added}_pearson_adj"]
    check_free(adata.var, cols, where=".var", overwrite=overwrite)
    pred_all = np.asarray(
        adata.layers[pred_layer].toarray()
        if hasattr(adata.layers[pred_layer], "toarray")
        else adata.layers[pred_layer],
        dtype=np.float64,
    )
    predicted = ~np.isnan(pred_all).all(axis=0)
    if genes is None:
        gi = np.flatnonzero(predicted)
    else:
        unknown = [g for g in genes if g not in adata.var_names]
        if unknown:
            msg = f"Genes {unknown[:10]} are not in var_names; score only measured genes."
            raise KeyError(msg)
        gi = adata.var_names.get_indexer(list(genes))
        not_pred = [g for g, i in zip(genes, gi, strict=True) if not predicted[i]]
        if not_pred:
            msg = f"Genes {not_pred[:10]} have no prediction in .layers[{pred_layer!r}]; predict them first."
            raise ValueError(msg)
    if len(gi) == 0:
        msg = f".layers[{pred_layer!r}] holds no prediction (all NaN)."
        raise ValueError(msg)
    pred = pred_all[:, gi]
    spots = ~np.isnan(pred).any(axis=1)
    if spots.sum() < 3:
        msg = (
            f"Only {int(spots.sum())} spots have predictions for all scored genes; correlations need at least 3. "
            "Score a section with more spots (or several sections together)."
        )
        raise ValueError(msg)
    names = adata.var_names[gi]
    true = log_normalized(adata[spots], layer=layer, genes=names).toarray().astype(np.float64)
    pred = pred[spots]
    depth = log_depth(adata[spots], layer=layer)
    r = pearson_per_gene(pred, true)
    rho = spearman_per_gene(pred, true)
    r_adj = pearson_depth_adjusted(pred, true, depth) if np.isfinite(depth).all() else np.full(len(gi), np.nan)
    df = pd.DataFrame({"pearson": r, "spearman": rho, "pearson_adj": r_adj}, index=pd.Index(names, name="gene"))

    panel_source = "given"
    if panels is None:
        from ._utils import get_model

        try:
            m = get_model(model)
            panels = m.training_summary.get("eval_panels")
            panel_source = "model training spots"
        except (ValueError, TypeError, AttributeError):
            panels = None
        if not panels:
            from ..pp._expression import eval_panels

            p = eval_panels(adata[spots], layer=layer)
            panels = {"hvg50": p["hvg50"], "heg250": p["heg250"]}
            panel_source = "evaluation spots (no model panels)"
            logger.warning(
                "score_expression: HVG50/HEG250 taken from the evaluated spots themselves, not from training spots"
            )
    summary: dict = {"n_spots": int(spots.sum()), "n_genes": len(gi), "panels_from": panel_source}
    for pname, pgenes in {**dict(panels), "all": list(names)}.items():
        sel = df.index.isin(list(pgenes))
        if pname != "all":
            df[pname] = sel
        n_missing = len(set(pgenes)) - int(sel.sum())
        summary[pname] = {
            "pearson": float(df.loc[sel, "pearson"].mean()) if sel.any() else float("nan"),
            "spearman": float(df.loc[sel, "spearman"].mean()) if sel.any() else float("nan"),
            "pearson_adj": float(df.loc[sel, "pearson_adj"].mean()) if sel.any() else float("nan"),
            "n_genes": int(sel.sum()),
            "n_not_predicted": int(n_missing),
        }
        if pname != "all":
            summary[pname]["genes"] = list(df.index[sel])
    for col, src in zip(cols, ["pearson", "spearman", "pearson_adj"], strict=True):
        v = np.full(adata.n_vars, np.nan)
        v[gi] = df[src].to_numpy()
        adata.var[col] = v
    # the predictions' provenance: which model wrote them
    made_by = adata.uns.get(C.UNS_KEY, {}).get("predict_expression", {})
    provenance = {k: made_by[k] for k in ("model", "comtip_version", "weights_sha256") if k in made_by}
    record(adata, "score_expression", {"pred_layer": pred_layer, "layer": layer, **summary, **provenance})
    logger.info("scores of %d genes in .var[%s], summary in .uns['comtip']['score_expression']", len(gi), cols)
    return data if copy else df
