"""Building blocks shared by the readers: spot circles, the spot table, combining sections."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any, Literal

import anndata as ad
import numpy as np
import pandas as pd
from scipy import sparse

from .. import _constants as C
from .._gene_text import harmonize_symbols
from .._spatial import set_units


def spot_circles(pixel_xy: np.ndarray, radius_px: float, *, coordinate_system: str, mpp: float):
    """Circles at the spots' full-resolution pixel positions, with a µm transformation to ``coordinate_system``."""
    import geopandas as gpd
    from shapely import points
    from spatialdata.models import ShapesModel
    from spatialdata.transformations import Scale

    gdf = gpd.GeoDataFrame(
        {"radius": np.full(len(pixel_xy), float(radius_px))},
        geometry=points(pixel_xy[:, 0], pixel_xy[:, 1]),
        index=pd.RangeIndex(len(pixel_xy)),
    )
    return ShapesModel.parse(gdf, transformations={coordinate_system: Scale([mpp, mpp], axes=("x", "y"))})


def harmonize_var(
    X: sparse.csr_matrix,
    genes: Sequence[str],
    original: Sequence[str],
    *,
    var: pd.DataFrame | None = None,
    aggregate: Literal["sum", "first"] = "sum",
) -> tuple[sparse.csr_matrix, pd.DataFrame]:
    """Harmonise gene symbols, merging the columns that map to the same symbol; keep the original names.

    ``aggregate="sum"`` adds merged columns (raw counts); ``"first"`` keeps the first of them (transformed values,
    which must not be added). Extra ``var`` columns (aligned to ``genes``) are carried along, ``";"``-joined when merged.
    """
    symbols = harmonize_symbols(list(genes))
    codes, uniques = pd.factorize(pd.Index(symbols), sort=False)
    extra = None if var is None else var.reset_index(drop=True)
    if len(uniques) == len(symbols):
        out = pd.DataFrame({C.ORIGINAL_SYMBOLS: list(original)}, index=pd.Index(uniques, dtype=str))
        if extra is not None:
            for col in extra.columns:
                out[col] = extra[col].to_numpy()
        return X, out
    if aggregate == "sum":
        agg = sparse.csr_matrix(
            (np.ones(len(codes), dtype=X.dtype), (np.arange(len(codes)), codes)), shape=(len(codes), len(uniques))
        )
        X = (X @ agg).tocsr()
    else:
        first = pd.Series(np.arange(len(codes))).groupby(codes).first().sort_index().to_numpy()
        X = sparse.csr_matrix(X)[:, first]
    join = lambda s: ";".join(dict.fromkeys(map(str, s)))
    orig = pd.Series(list(original)).groupby(codes).agg(lambda s: ";".join(s))
    out = pd.DataFrame({C.ORIGINAL_SYMBOLS: orig.sort_index().to_numpy()}, index=pd.Index(uniques, dtype=str))
    if extra is not None:
        for col in extra.columns:
            out[col] = extra[col].groupby(codes).agg(join).sort_index().to_numpy()
    return X, out


def build_table(
    X: sparse.csr_matrix,
    *,
    spot_names: np.ndarray,
    genes: Sequence[str],
    section: str,
    region: str,
    obs: pd.DataFrame | None = None,
    harmonize: bool = True,
    original_names: Sequence[str] | None = None,
    var: pd.DataFrame | None = None,
    is_counts: bool = True,
) -> ad.AnnData:
    """One section's spot table (not yet parsed by TableModel): raw counts in ``X`` and ``layers['counts']``.

    With ``is_counts=False`` (``X`` holds transformed values), there is no ``layers['counts']`` and genes that
    harmonise to the same symbol keep their first column instead of being summed. ``var`` holds extra gene columns
    (aligned to ``genes``), kept in the table's ``var``.
    """
    original_names = list(genes) if original_names is None else list(original_names)
    if harmonize:
        X, var_df = harmonize_var(X, genes, original_names, var=var, aggregate="sum" if is_counts else "first")
    else:
        if pd.Index(genes).has_duplicates:
            index = pd.Index(genes)
            dup = [str(g) for g in index[index.duplicated()].unique()[:5]]
            msg = f"Section {section!r} has duplicated gene names {dup}; pass harmonize_genes=True to merge (sum) them."
            raise ValueError(msg)
        var_df = pd.DataFrame({C.ORIGINAL_SYMBOLS: original_names}, index=pd.Index(list(genes), dtype=str))
        if var is not None:
            for col in var.columns:
                var_df[col] = var[col].to_numpy()
    obs_df = pd.DataFrame(index=pd.Index([f"{section}_{s}" for s in spot_names], dtype=str))
    obs_df["spot"] = pd.array(spot_names, dtype=str)
    if obs is not None:
        for col in obs.columns:
            obs_df[col] = obs[col].to_numpy()
    obs_df[C.SECTION_KEY] = section
    obs_df[C.REGION_KEY] = region
    obs_df[C.INSTANCE_KEY] = np.arange(len(spot_names), dtype=np.int64)
    X = sparse.csr_matrix(X, dtype=np.float32)
    layers = {C.COUNTS_LAYER: X.copy()} if is_counts else {}
    return ad.AnnData(X=X, obs=obs_df, var=var_df, layers=layers)


def combine_sections(
    sections: Sequence[tuple[dict, dict, ad.AnnData | None, str]], *, attrs: dict[str, Any] | None = None
):
    """One SpatialData from per-section ``(images, shapes, table, coordinate_system)``; one table annotates all spots.

    Genes are outer-joined across sections (zeros where a section lacks a gene); ``var`` keeps the first
    section's original names.
    """
    from spatialdata import SpatialData
    from spatialdata.models import TableModel

    images: dict = {}
    shapes: dict = {}
    tables = []
    for imgs, shps, table, _ in sections:
        for k in list(imgs) + list(shps):
            if k in images or k in shapes:
                msg = f"Element {k!r} appears in two sections; give each section a unique name."
                raise ValueError(msg)
        images.update(imgs)
        shapes.update(shps)
        if table is not None:
            tables.append(table)
    out_tables = {}
    if tables:
        if len(tables) == 1:
            table = tables[0]
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                table = ad.concat(tables, join="outer", merge="first", fill_value=0)
            table.X = sparse.csr_matrix(table.X, dtype=np.float32)
            if C.COUNTS_LAYER in table.layers:
                table.layers[C.COUNTS_LAYER] = sparse.csr_matrix(table.layers[C.COUNTS_LAYER], dtype=np.float32)
            var = pd.concat([t.var for t in tables])
            table.var = var[~var.index.duplicated()].reindex(table.var_names)
        table.obs[C.SECTION_KEY] = pd.Categorical(
            table.obs[C.SECTION_KEY], categories=list(dict.fromkeys(table.obs[C.SECTION_KEY]))
        )
        table.obs[C.REGION_KEY] = pd.Categorical(
            table.obs[C.REGION_KEY], categories=list(dict.fromkeys(table.obs[C.REGION_KEY]))
        )
        table.strings_to_categoricals()
        regions = list(table.obs[C.REGION_KEY].cat.categories)
        out_tables[C.TABLE_KEY] = TableModel.parse(
            table, region=regions, region_key=C.REGION_KEY, instance_key=C.INSTANCE_KEY
        )
    sdata = SpatialData(images=images, shapes=shapes, tables=out_tables, attrs=dict(attrs or {}))
    for *_, cs in sections:
        set_units(sdata, cs, "um")
    return sdata
