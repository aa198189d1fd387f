"""Predicted against measured expression: maps on the H&E, scatter plots, ranked per-gene scores."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np

from .. import _constants as C
from .._logging import logger
from .._metrics import pearson_per_gene
from ._sections import SectionView, section_rows, section_view, sections_of
from ._utils import dense, finish, get_table

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson r of the finite pairs (the metric of :func:`comtip.tl.score_expression`); NaN where undefined."""
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 3 or np.std(x[ok]) == 0 or np.std(y[ok]) == 0:
        return float("nan")
    return float(pearson_per_gene(x[ok, None], y[ok, None])[0])


def _predictions(table, genes: list[str], pred_layer: str) -> np.ndarray:
    """``.layers[pred_layer]`` of ``genes`` (n_obs x G), with errors that say which function writes what."""
    if pred_layer not in table.layers:
        msg = (
            f"No predictions in .layers[{pred_layer!r}] (layers: {list(table.layers) or 'none'}); run "
            f"ct.tl.predict_expression(data, genes={genes[:5]}) first, or pass pred_layer= with the layer that holds them."
        )
        raise KeyError(msg)
    missing = [g for g in genes if g not in table.var_names]
    if missing:
        obsm = table.obsm.get(pred_layer)
        unmeasured = [g for g in missing if obsm is not None and g in getattr(obsm, "columns", [])]
        if unmeasured:
            msg = (
                f"Genes {unmeasured[:10]} are not measured here (not in var_names): their predictions in "
                f".obsm[{pred_layer!r}] have no measurement to compare with. Plot measured genes."
            )
        else:
            msg = f"Genes {missing[:10]} are not in var_names; pass measured genes that ct.tl.predict_expression predicted."
        raise KeyError(msg)
    idx = table.var_names.get_indexer(genes)
    pred = dense(table.layers[pred_layer][:, idx])
    not_pred = [g for g, col in zip(genes, pred.T, strict=True) if np.isnan(col).all()]
    if not_pred:
        msg = (
            f"Genes {not_pred[:10]} have no prediction in .layers[{pred_layer!r}] (all NaN); run "
            f"ct.tl.predict_expression(data, genes={not_pred[:5]}, overwrite=True) with them."
        )
        raise ValueError(msg)
    return pred


def _measured(table, genes: list[str], layer: str | None) -> np.ndarray:
    """Log-normalised measured expression (counts -> 1e4 -> log1p), as ``ct.tl.score_expression`` compares."""
    from ..pp import log_normalized

    if table.X is None and (layer or C.COUNTS_LAYER) not in table.layers:
        msg = (
            "This table has no measured expression (X is empty: image-only data), so there is nothing to compare with."
        )
        raise ValueError(msg)
    return dense(log_normalized(table, layer=layer, genes=genes))


def _norm(values: np.ndarray, percentiles: tuple[float, float]):
    """A linear colour scale from the ``percentiles`` of ``values`` (widened when they are all equal)."""
    import matplotlib as mpl

    if values.size == 0:
        return mpl.colors.Normalize(vmin=0.0, vmax=1.0)
    vmin, vmax = (float(v) for v in np.percentile(values, percentiles))
    if vmax <= vmin:
        vmin, vmax = vmin - 0.5, vmax + 0.5
    return mpl.colors.Normalize(vmin=vmin, vmax=vmax)


def _draw_map(
    ax: Axes, view: SectionView, values: np.ndarray, *, cmap, norm, alpha: float, scalebar: bool = False
) -> None:
    """Spots as filled circles of their physical size on the H&E crop, in the crop's pixel space."""
    from matplotlib.collections import EllipseCollection

    if view.image is not None:
        h, w = view.image.shape[:2]
        ax.imshow(view.image, extent=(0, w, h, 0), interpolation="antialiased")
    coll = EllipseCollection(
        widths=2 * view.radius,
        heights=2 * view.radius,
        angles=np.zeros(len(view.radius)),
        units="xy",
        offsets=view.xy,
        offset_transform=ax.transData,
        cmap=cmap,
        norm=norm,
        alpha=alpha,
        linewidths=0,
    )
    coll.set_array(np.asarray(values, dtype=float))
    ax.add_collection(coll)
    x0, x1, y1, y0 = view.extent
    ax.set_xlim(x0, x1)
    ax.set_ylim(y1, y0)  # image convention: y down
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    if scalebar and np.isfinite(view.um_per_px):
        _scalebar(ax, view)


def _scalebar(ax: Axes, view: SectionView) -> None:
    from mpl_toolkits.axes_grid1.anchored_artists import AnchoredSizeBar

    width_um = (view.extent[1] - view.extent[0]) * view.um_per_px
    nice = [10, 20, 50, 100, 200, 250, 500, 1000, 2000, 5000]
    um = max([n for n in nice if n <= width_um / 4] or [nice[0]])
    label = f"{um / 1000:g} mm" if um >= 1000 else f"{um} µm"
    ax.add_artist(
        AnchoredSizeBar(ax.transData, um / view.um_per_px, label, "lower right", frameon=False, color="black", sep=2)
    )


def predicted_vs_measured(
    data,
    genes: str | Sequence[str],
    *,
    section: str | None = None,
    pred_layer: str = C.PRED_LAYER,
    layer: str | None = None,
    score_key: str = C.PEARSON_KEY,
    table_key: str = C.TABLE_KEY,
    image_key: str | None = None,
    spot_size: float | None = None,
    cmap: str = "viridis",
    percentiles: tuple[float, float] = (1.0, 99.0),
    pred_scale: Literal["own", "shared"] = "own",
    alpha: float = 0.9,
    ncols: int = 1,
    max_image_px: int = 1000,
    save: str | os.PathLike | None = None,
    show: bool | None = None,
    return_fig: bool | None = None,
) -> Figure | None:
    """Measured and predicted expression side by side on the H&E, with a scatter of one against the other.

    One block per gene: the measured map, the predicted map (spots drawn as filled circles of their physical size
    on a downsampled crop of the section's H&E, around the spots), their colour bars, and a scatter of predicted
    against measured values of the section's spots with their Pearson r, the identity line and a least-squares
    trend line. By default (``pred_scale="own"``) each map has its own colour scale: zero-shot predictions are
    compressed (their least-squares slope against the measured values is typically 0.05–0.3), so on the measured
    scale their pattern would be one flat colour; the scatter, on common axes, keeps the true magnitudes.
    ``pred_scale="shared"`` puts both maps on one scale (the ``percentiles`` of measured and predicted values
    together). Measured expression is log-normalised (counts -> 1e4 per spot -> log1p), as
    :func:`comtip.tl.score_expression` compares it. Spots without a prediction are grey.

    Parameters
    ----------
    data
        SpatialData (image placed through its transformations), or AnnData with scanpy's ``uns['spatial']`` Visium
        layout (its hires image, else lowres, and ``obsm['spatial']``), holding predictions from
        :func:`comtip.tl.predict_expression`.
    genes
        Gene or genes to show (measured genes, i.e. in ``var_names``).
    section
        Section to draw (``obs['section']``, or the library of an AnnData). ``None``: the first section, in the
        order of ``obs['section']``, that has predictions (with several sections, one figure shows one section).
    pred_layer
        Layer of predictions.
    layer
        Raw-count layer of the measured expression (default ``layers['counts']``, else ``X``; an AnnData whose
        ``uns['comtip_input']`` says ``X`` is log1p already is not normalised again).
    score_key
        ``.var`` column with each gene's Pearson r over all scored spots (:func:`comtip.tl.score_expression`),
        shown in the predicted map's title; when absent, r of the section's spots is computed and shown instead.
    table_key
        Table of a SpatialData.
    image_key
        Image to draw under the spots (SpatialData: an image element; AnnData: ``'hires'`` or ``'lowres'``); by
        default the section's H&E.
    spot_size
        Diameter of the drawn spots in µm; by default each spot's physical size.
    cmap
        Colour map of both maps.
    percentiles
        Lower and upper percentile of the values that set a colour scale: of the measured values for the measured
        map and of the predictions for the predicted map (``pred_scale="own"``), or of both together.
    pred_scale
        ``"own"``: the predicted map on a colour scale of its own, with a second colour bar, so that its spatial
        pattern is visible; ``"shared"``: both maps on one colour scale and one colour bar, to compare magnitudes.
    alpha
        Opacity of the spots.
    ncols
        Gene blocks per row of the figure.
    max_image_px
        Wanted width of the image crop in pixels: the coarsest pyramid level whose crop is at least this wide is
        read (and reduced to at most twice this).
    save
        Write the figure to this path (``.png`` when it has no suffix).
    show
        Show the figure; ``None``: on interactive backends, unless ``save`` is given.
    return_fig
        Return the Figure; ``None``: when it is not shown.

    Returns
    -------
    The :class:`~matplotlib.figure.Figure` (see ``return_fig``). For gene ``g`` its axes are, in order, the measured
    map (title ``"g measured"``), the predicted map (``"g predicted, r = …"``), the measured map's colour bar (with
    ``pred_scale="shared"``: the one colour bar of both), the scatter (``"section: r = …, n = …"``) and, with
    ``pred_scale="own"``, the predicted map's colour bar; ``fig.axes`` holds nothing else.

    Examples
    --------
    >>> ct.tl.predict_expression(test, genes=["ERBB2", "KRT19"])
    >>> ct.tl.score_expression(test)
    >>> ct.pl.predicted_vs_measured(test, genes=["ERBB2", "KRT19"], section="C6")
    """
    import matplotlib as mpl
    import matplotlib.pyplot as plt

    genes = [genes] if isinstance(genes, str) else [str(g) for g in genes]
    if not genes:
        msg = "genes is empty; pass one or more measured genes."
        raise ValueError(msg)
    if ncols < 1:
        msg = f"ncols must be at least 1, got {ncols}."
        raise ValueError(msg)
    if pred_scale not in ("own", "shared"):
        msg = f"pred_scale must be 'own' (a colour scale for the predicted map) or 'shared', got {pred_scale!r}."
        raise ValueError(msg)
    table = get_table(data, table_key)
    pred_all = _predictions(table, genes, pred_layer)
    has_pred = ~np.isnan(pred_all).all(axis=1)
    sections = sections_of(data, table, table_key=table_key)
    if section is None:
        with_pred = [s for s in sections if has_pred[section_rows(data, table, s, table_key=table_key)].any()]
        if not with_pred:
            msg = f"No spot has a prediction of {genes[:5]} in .layers[{pred_layer!r}]; run ct.tl.predict_expression."
            raise ValueError(msg)
        section = with_pred[0]
        if len(sections) > 1:
            logger.info("predicted_vs_measured: section %r (of %s); pass section= for another", section, sections)
    elif str(section) not in sections:
        msg = f"Unknown section {section!r}; the data holds sections {sections}."
        raise ValueError(msg)
    section = str(section)
    rows = section_rows(data, table, section, table_key=table_key)
    if len(rows) == 0:
        msg = f"Section {section!r} has no spots in table {table_key!r}."
        raise ValueError(msg)
    view = section_view(
        data,
        table,
        section,
        rows,
        table_key=table_key,
        image_key=image_key,
        spot_size=spot_size,
        max_px=max_image_px,
    )
    rows = view.rows
    pred = pred_all[rows]
    meas = _measured(table[rows], genes, layer)
    stored = table.var.get(score_key)

    # Hand-written matplotlib rather than spatialdata-plot / squidpy: the measured values are computed here and
    # must not be written into the user's table, AnnData input has no SpatialData to render, and each gene needs
    # two maps with chosen colour scales plus a scatter, in one block.
    own = pred_scale == "own"
    aspect = (view.extent[2] - view.extent[3]) / max(view.extent[1] - view.extent[0], 1e-9)
    panel_w = 3.4
    panel_h = float(np.clip(panel_w * aspect, 2.2, 5.0)) + 0.5
    nrows = int(np.ceil(len(genes) / ncols))
    fig = plt.figure(figsize=(ncols * (3 * panel_w + (1.0 if own else 0.4)), nrows * panel_h), layout="constrained")
    grid = fig.add_gridspec(nrows, ncols)
    base = mpl.colormaps[cmap].with_extremes(bad="lightgrey")
    label = "log1p(counts / 1e4 per spot)"
    for i, gene in enumerate(genes):
        if own:  # measured map | its bar | predicted map | its bar | scatter
            sub = grid[i // ncols, i % ncols].subgridspec(1, 5, width_ratios=[1, 0.05, 1, 0.05, 0.95])
            ax_m, ax_p, cax, ax_s, cax_p = (fig.add_subplot(sub[0, j]) for j in (0, 2, 1, 4, 3))
        else:
            sub = grid[i // ncols, i % ncols].subgridspec(1, 4, width_ratios=[1, 1, 0.05, 0.95])
            ax_m, ax_p, cax, ax_s = (fig.add_subplot(sub[0, j]) for j in range(4))
        m, p = meas[:, i], pred[:, i]
        finite = p[np.isfinite(p)]
        if own:
            norm = _norm(m, percentiles)
            norm_p = _norm(finite, percentiles)
        else:
            norm = norm_p = _norm(np.concatenate([m, finite]), percentiles)
        _draw_map(ax_m, view, m, cmap=base, norm=norm, alpha=alpha, scalebar=True)
        _draw_map(ax_p, view, p, cmap=base, norm=norm_p, alpha=alpha)
        r_sec = _pearson(p, m)
        r_all = float(stored[gene]) if stored is not None and np.isfinite(stored[gene]) else float("nan")
        r_title = r_all if np.isfinite(r_all) else r_sec
        ax_m.set_title(f"{gene} measured")
        ax_p.set_title(f"{gene} predicted, r = {r_title:.2f}")
        fig.colorbar(mpl.cm.ScalarMappable(norm=norm, cmap=base), cax=cax, extend="both")
        if own:
            fig.colorbar(mpl.cm.ScalarMappable(norm=norm_p, cmap=base), cax=cax_p, extend="both")
            cax.set_ylabel(f"measured, {label}", fontsize="small")
            cax_p.set_ylabel("predicted (its own scale)", fontsize="small")
        else:
            cax.set_ylabel(label, fontsize="small")
        _draw_scatter(ax_s, m, p, r_sec, section=section, gene=gene)
    where = f".var[{score_key!r}] (all scored spots)" if stored is not None else f"section {section}'s spots"
    fig.suptitle(f"Section {section}: measured vs predicted ({pred_layer!r}); map titles give Pearson r from {where}")
    return finish(fig, show=show, save=save, return_fig=return_fig)


def _draw_scatter(ax: Axes, measured: np.ndarray, predicted: np.ndarray, r: float, *, section: str, gene: str) -> None:
    ok = np.isfinite(measured) & np.isfinite(predicted)
    x, y = measured[ok], predicted[ok]
    ax.scatter(x, y, s=10, alpha=0.6, color="tab:blue", linewidths=0)
    # limits from the data, then the identity line across them: zero-shot predictions often span a much narrower
    # range than the measurement, and an identity line drawn over both ranges would squash the points flat
    for lim, v in ((ax.set_xlim, x), (ax.set_ylim, y)):
        lo, hi = float(v.min()), float(v.max())
        pad = 0.05 * (hi - lo) if hi > lo else 0.5
        lim(lo - pad, hi + pad)
    ax.axline((0.0, 0.0), slope=1.0, ls="--", color="grey", lw=1, label="identity")
    if len(x) >= 2 and np.std(x) > 0:
        slope, intercept = np.polyfit(x, y, 1)
        xs = np.array([x.min(), x.max()])
        ax.plot(xs, slope * xs + intercept, color="tab:red", lw=1.2, label=f"trend (slope {slope:.2f})")
    ax.set_xlabel(f"measured {gene}")
    ax.set_ylabel(f"predicted {gene}")
    ax.set_title(f"{section}: r = {r:.2f}, n = {int(ok.sum())}")
    ax.legend(loc="best", fontsize="x-small", frameon=False)


def gene_scores(
    data,
    *,
    key: str = C.PEARSON_KEY,
    n_top: int = 20,
    panel: str | Sequence[str] | None = None,
    table_key: str = C.TABLE_KEY,
    figsize: tuple[float, float] | None = None,
    save: str | os.PathLike | None = None,
    show: bool | None = None,
    return_fig: bool | None = None,
) -> Figure | None:
    """Per-gene prediction scores, ranked: the whole distribution and the best and worst genes by name.

    Left: every scored gene's score against its rank, with the panel means of
    ``.uns['comtip']['score_expression']`` (e.g. ``all``, ``hvg50``, ``heg250``) as horizontal lines. Right: the
    ``n_top`` best and ``n_top`` worst genes by name (all genes when there are at most ``2 * n_top``), best at the top.

    Parameters
    ----------
    data
        SpatialData or AnnData scored by :func:`comtip.tl.score_expression`.
    key
        ``.var`` column of scores (``'comtip_pearson'``, ``'comtip_spearman'`` or ``'comtip_pearson_adj'``).
    n_top
        Genes named at each end of the ranking.
    panel
        Restrict to a gene panel: a list of genes, a panel of :func:`comtip.tl.score_expression` (``'hvg50'``,
        ``'heg250'``), or the name of a boolean ``.var`` column (e.g. ``'highly_variable'``). ``None``: every
        scored gene.
    table_key
        Table of a SpatialData.
    figsize
        Figure size in inches; by default from the number of genes named.
    save
        Write the figure to this path (``.png`` when it has no suffix).
    show
        Show the figure; ``None``: on interactive backends, unless ``save`` is given.
    return_fig
        Return the Figure; ``None``: when it is not shown.

    Returns
    -------
    The :class:`~matplotlib.figure.Figure` (see ``return_fig``), with two axes: the ranked distribution, then the
    named genes (a horizontal bar per gene; y tick labels are the gene names, best first).

    Examples
    --------
    >>> ct.tl.score_expression(test)
    >>> ct.pl.gene_scores(test, n_top=15)
    """
    import matplotlib.pyplot as plt
    import pandas as pd

    table = get_table(data, table_key)
    if key not in table.var:
        have = [c for c in table.var.columns if str(c).startswith(C.UNS_KEY)]
        msg = (
            f"No scores in .var[{key!r}] (comtip columns: {have or 'none'}); run ct.tl.score_expression(data) first, "
            "or pass key= with the column that holds them."
        )
        raise KeyError(msg)
    if n_top < 1:
        msg = f"n_top must be at least 1, got {n_top}."
        raise ValueError(msg)
    scores = pd.Series(np.asarray(table.var[key], dtype=float), index=table.var_names.astype(str)).dropna()
    panel_name = None
    if panel is not None:
        stored = table.uns.get(C.UNS_KEY, {}).get("score_expression", {}).get(panel) if isinstance(panel, str) else None
        if isinstance(stored, dict) and "genes" in stored:
            panel_name = panel  # a panel of ct.tl.score_expression, e.g. "hvg50"
            chosen = [str(g) for g in stored["genes"]]
        elif isinstance(panel, str):
            if panel not in table.var:
                msg = (
                    f"panel={panel!r} is neither a panel of ct.tl.score_expression ('hvg50', 'heg250') nor a boolean "
                    ".var column; pass a list of genes, a panel name or the name of such a column."
                )
                raise KeyError(msg)
            panel_name = panel
            chosen = table.var_names[np.asarray(table.var[panel], dtype=bool)].astype(str)
        else:
            chosen = [str(g) for g in panel]
        scores = scores[scores.index.isin(list(chosen))]
    if scores.empty:
        msg = f"No gene has a score in .var[{key!r}]" + (" within the panel." if panel is not None else ".")
        raise ValueError(msg)
    scores = scores.sort_values(ascending=False)
    metric = key.removeprefix(f"{C.UNS_KEY}_")
    summary = table.uns.get(C.UNS_KEY, {}).get("score_expression", {})
    means = {
        name: (float(v[metric]), int(v.get("n_genes", 0)))
        for name, v in summary.items()
        if isinstance(v, dict) and metric in v and np.isfinite(float(v[metric]))
    }
    if len(scores) > 2 * n_top:
        shown = pd.concat([scores.iloc[:n_top], scores.iloc[-n_top:]])
    else:
        shown = scores
    figsize = figsize or (11.0, max(3.5, 0.2 * len(shown) + 1.2))
    fig, (ax_r, ax_g) = plt.subplots(1, 2, figsize=figsize, layout="constrained", width_ratios=[1.3, 1])

    ranks = np.arange(1, len(scores) + 1)
    ax_r.plot(ranks, scores.to_numpy(), marker="o", ms=2.5, lw=1, color="tab:blue")
    ax_r.axhline(0, color="black", lw=0.6)
    colors = plt.get_cmap("tab10")
    for j, (name, (mean, n)) in enumerate(means.items()):
        ax_r.axhline(mean, ls="--", lw=1, color=colors(j + 1), label=f"{name} mean {mean:.3f} (n = {n})")
    ax_r.set_xlabel("rank")
    ax_r.set_ylabel(key)
    where = f" in {panel_name}" if panel_name else (" in panel" if panel is not None else "")
    ax_r.set_title(f"{key} of {len(scores)} genes{where}, ranked")
    if means:
        ax_r.legend(fontsize="small", frameon=False, title="score_expression", title_fontsize="small")

    y = np.arange(len(shown))[::-1]
    top = np.arange(len(shown)) < min(n_top, len(shown)) if len(scores) > 2 * n_top else shown.to_numpy() >= 0
    ax_g.barh(y, shown.to_numpy(), color=np.where(top, "tab:blue", "tab:orange"), height=0.7)
    ax_g.set_yticks(y, shown.index.tolist(), fontsize="small")
    ax_g.axvline(0, color="black", lw=0.6)
    if len(scores) > 2 * n_top:
        ax_g.axhline(n_top - 0.5, color="grey", ls=":", lw=1)
        ax_g.set_title(f"top and bottom {n_top} of {len(scores)} genes")
    else:
        ax_g.set_title(f"all {len(scores)} genes")
    ax_g.set_xlabel(key)
    ax_g.set_ylim(-0.7, len(shown) - 0.3)
    return finish(fig, show=show, save=save, return_fig=return_fig)
