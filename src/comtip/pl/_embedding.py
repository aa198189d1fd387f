"""UMAP of CoMTIP's image and gene embeddings, coloured by section, pathologist label or any ``obs`` column."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from .. import _constants as C
from ._utils import categorical_colors, finish, get_table

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

DEFAULT_BASIS = (f"{C.EMBED_KEY}{C.IMAGE_EMBED_SUFFIX}", f"{C.EMBED_KEY}{C.GENE_EMBED_SUFFIX}")
DEFAULT_COLOR = (C.SECTION_KEY, "label")
MODALITY = "modality"


def _umap(X: np.ndarray, *, n_neighbors: int, seed: int) -> np.ndarray:
    """2-D UMAP of the rows of ``X`` (cosine kNN graph), on a temporary AnnData: the user's object is not touched."""
    import anndata as ad
    import scanpy as sc

    tmp = ad.AnnData(
        obsm={"X_rep": np.asarray(X, dtype=np.float32)}, obs=pd.DataFrame(index=[str(i) for i in range(len(X))])
    )
    sc.pp.neighbors(tmp, n_neighbors=min(n_neighbors, len(X) - 1), use_rep="X_rep", metric="cosine", random_state=seed)
    sc.tl.umap(tmp, random_state=seed)
    return np.asarray(tmp.obsm["X_umap"])


MARKERS = ("o", "^", "s", "D")


def _scatter(
    ax: Axes, xy: np.ndarray, values: pd.Series, *, title: str, size: float, modality: np.ndarray | None = None
) -> None:
    """Points coloured by ``values``; in a joint map each modality has its own marker (o image, ^ gene, ...)."""
    import matplotlib as mpl

    order = np.random.default_rng(0).permutation(len(xy))  # no colour hides another by drawing order
    mods = list(dict.fromkeys(modality)) if modality is not None else [None]
    categorical = isinstance(values.dtype, pd.CategoricalDtype) or not pd.api.types.is_numeric_dtype(values)
    if categorical:
        rgba, lut = categorical_colors(values)
        marker = {m: MARKERS[j % len(MARKERS)] for j, m in enumerate(mods)} if values.name == MODALITY else {}
        handles = [mpl.lines.Line2D([], [], ls="", marker=marker.get(k, "o"), color=c, label=k) for k, c in lut.items()]
    else:
        v = values.to_numpy(dtype=float)
        norm = mpl.colors.Normalize(np.nanmin(v), np.nanmax(v))
        handles = []
    for j, mod in enumerate(mods):
        sel = order if mod is None else order[modality[order] == mod]
        kw = {"c": rgba[sel]} if categorical else {"c": v[sel], "cmap": "viridis", "norm": norm}
        sc = ax.scatter(xy[sel, 0], xy[sel, 1], s=size, marker=MARKERS[j % len(MARKERS)], linewidths=0, **kw)
    if len(mods) > 1 and values.name != MODALITY:
        handles += [
            mpl.lines.Line2D([], [], ls="", marker=MARKERS[j % len(MARKERS)], color="dimgrey", label=m)
            for j, m in enumerate(mods)
        ]
    if handles:
        ax.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False, fontsize="small")
    if not categorical:
        ax.figure.colorbar(sc, ax=ax, shrink=0.8)
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlabel("UMAP1")
    ax.set_ylabel("UMAP2")


def embedding(
    data,
    *,
    basis: str | Sequence[str] = DEFAULT_BASIS,
    color: str | Sequence[str] = DEFAULT_COLOR,
    joint: bool = True,
    table_key: str = C.TABLE_KEY,
    n_neighbors: int = 15,
    seed: int = 0,
    point_size: float | None = None,
    panel_size: tuple[float, float] = (4.0, 3.6),
    save: str | os.PathLike | None = None,
    show: bool | None = None,
    return_fig: bool | None = None,
) -> Figure | None:
    """UMAP of the spots' image and gene embeddings, coloured by section and pathologist label.

    By default (``joint=True``) one UMAP of both modalities together: image and gene embeddings live in CoMTIP's
    shared space, so a joint map shows at once whether the two modalities are aligned (the ``modality`` panel: mixed,
    or two islands, the "modality gap" of contrastive models) and what each organises spots by (sections, i.e.
    batch effects; tissue regions). ``joint=False`` gives one UMAP per modality (rows) instead, which shows each
    modality's own structure without the other pulling on its neighbourhoods. Spots without an embedding (NaN rows:
    no tile, or no gene of the model's panel) are left out. The UMAP is computed on a temporary AnnData (cosine kNN
    graph, :func:`scanpy.pp.neighbors` and :func:`scanpy.tl.umap`, seeded); nothing is written into ``data``.

    Parameters
    ----------
    data
        SpatialData or AnnData embedded by :func:`comtip.tl.embed`.
    basis
        ``.obsm`` keys of the embeddings. With the default, a missing gene embedding (image-only data) is skipped.
    color
        ``obs`` columns to colour by (categorical or numeric). With the default, ``'label'`` is skipped where the
        data has no pathologist labels.
    joint
        One UMAP of all modalities together (a ``modality`` panel comes first), else one per modality.
    table_key
        Table of a SpatialData.
    n_neighbors
        Neighbours of the kNN graph (at most the number of points minus one).
    seed
        Random seed of the UMAP.
    point_size
        Marker size; by default from the number of points.
    panel_size
        Width and height of one panel in inches.
    save
        Write the figure to this path (``.png`` when it has no suffix).
    show
        Show the figure; ``None``: on interactive backends, unless ``save`` is given.
    return_fig
        Return the Figure; ``None``: when it is not shown.

    Returns
    -------
    The :class:`~matplotlib.figure.Figure` (see ``return_fig``). Joint: one axes per colour (``'modality'`` first),
    titled with the column's name, each holding one point per embedded spot and modality. Separate: a grid of
    ``len(basis)`` rows x ``len(color)`` axes, titled ``'<basis>: <column>'``. Numeric colours add a colour-bar axes.

    Examples
    --------
    >>> ct.tl.embed(sdata)
    >>> ct.pl.embedding(sdata, color=["section", "label"])
    """
    import matplotlib.pyplot as plt

    table = get_table(data, table_key)
    basis_given = basis != DEFAULT_BASIS
    basis = [basis] if isinstance(basis, str) else list(basis)
    missing = [b for b in basis if b not in table.obsm]
    if missing and (basis_given or len(missing) == len(basis)):
        msg = (
            f"No embeddings in .obsm{missing} (obsm: {list(table.obsm) or 'none'}); run ct.tl.embed(data) first, or "
            "pass basis= with the keys that hold them."
        )
        raise KeyError(msg)
    basis = [b for b in basis if b in table.obsm]
    color_given = color != DEFAULT_COLOR
    color = [color] if isinstance(color, str) else list(color)
    unknown = [c for c in color if c not in table.obs and c != MODALITY]
    if unknown and color_given:
        msg = f"Columns {unknown} are not in obs (columns: {list(table.obs.columns)}); pass obs columns as color=."
        raise KeyError(msg)
    color = [c for c in color if c in table.obs and c != MODALITY]

    parts = []  # (basis, positions of the embedded spots, their embedding)
    for b in basis:
        X = np.asarray(table.obsm[b], dtype=np.float64)
        if X.ndim != 2:
            msg = f".obsm[{b!r}] has shape {X.shape}; expected spots x dimensions."
            raise ValueError(msg)
        ok = np.flatnonzero(np.isfinite(X).all(axis=1))
        if len(ok) < 4:
            msg = f".obsm[{b!r}] has {len(ok)} spots with an embedding; a UMAP needs at least 4."
            raise ValueError(msg)
        parts.append((b, ok, X[ok]))

    def modality(b: str) -> str:
        return b.removeprefix(f"{C.EMBED_KEY}_") if b.startswith(f"{C.EMBED_KEY}_") else b

    if joint:
        dims = {X.shape[1] for _, _, X in parts}
        if len(dims) > 1:
            msg = f"A joint UMAP needs embeddings of one dimension; {basis} have {sorted(dims)}. Pass joint=False."
            raise ValueError(msg)
        xy = _umap(np.vstack([X for _, _, X in parts]), n_neighbors=n_neighbors, seed=seed)
        obs = pd.concat([table.obs.iloc[ok][color].reset_index(drop=True) for _, ok, _ in parts], ignore_index=True)
        mod = pd.Categorical(
            np.concatenate([[modality(b)] * len(ok) for b, ok, _ in parts]), categories=[modality(b) for b in basis]
        )
        columns = ([MODALITY] if len(parts) > 1 else []) + color
        obs.insert(0, MODALITY, mod)
        size = point_size or float(np.clip(3000 / len(xy), 4, 40))
        fig, axes = plt.subplots(
            1,
            len(columns),
            figsize=(panel_size[0] * len(columns) + 1.0, panel_size[1]),
            layout="constrained",
            squeeze=False,
        )
        mods = obs[MODALITY].astype(str).to_numpy()
        for ax, col in zip(axes[0], columns, strict=True):
            _scatter(ax, xy, obs[col], title=col, size=size, modality=mods if len(parts) > 1 else None)
        names = " + ".join(modality(b) for b in basis)
        fig.suptitle(f"Joint UMAP of the {names} embeddings ({len(xy)} points)")
    else:
        columns = color or [MODALITY]
        fig, axes = plt.subplots(
            len(parts),
            len(columns),
            figsize=(panel_size[0] * len(columns) + 1.0, panel_size[1] * len(parts)),
            layout="constrained",
            squeeze=False,
        )
        for row, (b, ok, X) in enumerate(parts):
            xy = _umap(X, n_neighbors=n_neighbors, seed=seed)
            obs = table.obs.iloc[ok][color].reset_index(drop=True)
            obs[MODALITY] = pd.Categorical([modality(b)] * len(ok))
            size = point_size or float(np.clip(3000 / len(xy), 4, 40))
            for ax, col in zip(axes[row], columns, strict=True):
                _scatter(ax, xy, obs[col], title=f"{b}: {col}", size=size)
        fig.suptitle("UMAP of each embedding")
    return finish(fig, show=show, save=save, return_fig=return_fig)
