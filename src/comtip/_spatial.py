"""Shared helpers for SpatialData: units of coordinate systems, finding tables/images/shapes, validation."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

import numpy as np

from . import _constants as C

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData


def set_units(sdata: SpatialData, coordinate_system: str, unit: str = "um") -> None:
    """Record that ``coordinate_system`` of ``sdata`` is in ``unit`` (µm for all comtip readers)."""
    attrs = sdata.attrs.setdefault(C.ATTRS_KEY, {})
    attrs.setdefault(C.ATTRS_UNITS, {})[coordinate_system] = unit


def get_units(sdata: SpatialData, coordinate_system: str) -> str | None:
    """Unit of ``coordinate_system`` recorded by comtip's readers, or ``None``."""
    return sdata.attrs.get(C.ATTRS_KEY, {}).get(C.ATTRS_UNITS, {}).get(coordinate_system)


def get_table(sdata: SpatialData, table_key: str) -> AnnData:
    """``sdata.tables[table_key]`` with an error that lists the tables when it is missing."""
    if table_key not in sdata.tables:
        msg = (
            f"No table {table_key!r} in the SpatialData object (tables: {list(sdata.tables) or 'none'}). "
            "Pass table_key= with the name of the table that annotates the spots."
        )
        raise KeyError(msg)
    return sdata.tables[table_key]


def table_regions(sdata: SpatialData, table_key: str) -> tuple[list[str], str, str]:
    """Regions the table annotates, its region key and instance key; errors name what is missing."""
    table = get_table(sdata, table_key)
    attrs: dict[str, Any] = table.uns.get("spatialdata_attrs", {})
    if not attrs or "region" not in attrs:
        msg = (
            f"Table {table_key!r} does not annotate any shapes element (no uns['spatialdata_attrs']). "
            "Parse it with spatialdata.models.TableModel.parse(adata, region=..., region_key=..., instance_key=...) "
            "or read the data with a comtip reader (ct.io.read_st, ct.io.visium, ct.io.from_anndata)."
        )
        raise ValueError(msg)
    regions = attrs["region"]
    regions = [regions] if isinstance(regions, str) else list(regions)
    missing = [r for r in regions if r not in sdata.shapes]
    if missing:
        msg = (
            f"Table {table_key!r} annotates {missing}, which are not shapes elements of the SpatialData object "
            f"(shapes: {list(sdata.shapes) or 'none'}). Add the spots as shapes or fix the table's region column."
        )
        raise ValueError(msg)
    return regions, attrs["region_key"], attrs["instance_key"]


def affine_matrix(transformation, axes: tuple[str, ...] = ("x", "y")) -> np.ndarray:
    """3x3 affine matrix (x, y) of a spatialdata transformation."""
    return np.asarray(transformation.to_affine_matrix(input_axes=axes, output_axes=axes), dtype=float)


def pixel_size(matrix: np.ndarray) -> float:
    """Size of one input unit in output units, from an affine matrix (geometric mean of the axes)."""
    return float(np.sqrt(abs(np.linalg.det(matrix[:2, :2]))))


def nearest_neighbour_spacing(xy: np.ndarray) -> float:
    """Median distance from each point to its nearest neighbour (``nan`` with fewer than 2 points)."""
    if len(xy) < 2:
        return float("nan")
    from scipy.spatial import cKDTree

    d, _ = cKDTree(xy).query(xy, k=2)
    return float(np.median(d[:, 1]))


def spatial_graph(xy: np.ndarray, groups: np.ndarray, *, radius: float = 1.5):
    """The (n, n) sparse 0/1 adjacency of spatial neighbours, built with :func:`squidpy.gr.spatial_neighbors_radius`.

    Neighbours are the other points of the same group (a section) within ``radius`` times that group's spot spacing
    (median nearest-neighbour distance): with the default 1.5, the 8 spots around a spot of a square ST grid, the 6
    of a hexagonal Visium grid. squidpy builds each group's radius graph (its ``spatial_connectivities``).
    """
    import warnings

    import anndata as ad
    from scipy import sparse

    with warnings.catch_warnings():  # squidpy's docstring machinery warns on import
        warnings.simplefilter("ignore", SyntaxWarning)
        import squidpy as sq

    xy, groups = np.asarray(xy, dtype=float), np.asarray(groups)
    n = len(xy)
    rows, cols = [np.zeros(0, dtype=np.int64)], [np.zeros(0, dtype=np.int64)]
    for g in np.unique(groups):
        m = np.flatnonzero(groups == g)
        spacing = nearest_neighbour_spacing(xy[m])
        if not np.isfinite(spacing) or spacing <= 0:
            continue
        section = ad.AnnData(obsm={"spatial": xy[m]}, shape=(len(m), 0))
        with _quiet_squidpy():
            result = sq.gr.spatial_neighbors_radius(section, radius=radius * spacing, copy=True)
        conn = result.connectivities.tocoo()
        rows.append(m[conn.row])
        cols.append(m[conn.col])
    r, c = np.concatenate(rows), np.concatenate(cols)
    return sparse.csr_matrix((np.ones(len(r)), (r, c)), shape=(n, n))


@contextlib.contextmanager
def _quiet_squidpy():
    """Silence the INFO line squidpy logs (through spatialdata's logger) for every graph it builds."""
    import logging

    log = logging.getLogger("spatialdata._logging")
    level = log.level
    log.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        log.setLevel(level)


def neighbour_means(xy: np.ndarray, groups: np.ndarray, *, radius: float = 1.5):
    """The (n, n) sparse operator whose row i averages the neighbours of point i (row i of the identity if none).

    The neighbours are those of :func:`spatial_graph` (squidpy's radius graph per section, ``radius`` spot
    spacings). Build it once per set of spots and apply it with :func:`mix_with_neighbours`.
    """
    from scipy import sparse

    adj = spatial_graph(xy, groups, radius=radius)
    deg = np.asarray(adj.sum(1)).ravel()
    lone = (deg == 0).astype(float)
    return (sparse.diags(1.0 / np.maximum(deg, 1)) @ adj + sparse.diags(lone)).tocsr()


def mix_with_neighbours(values: np.ndarray, means, weight: float) -> np.ndarray:
    """``(1 - weight) * own + weight * mean(neighbours)`` of each row, with ``means`` from :func:`neighbour_means`.

    Rows without a neighbour are returned exactly as they are. Returns a new float array.
    """
    out = np.array(values, dtype=float, copy=True)
    if weight:
        out += weight * (means @ out - out)
    return out


def neighbour_average(
    values: np.ndarray, xy: np.ndarray, groups: np.ndarray, *, weight: float, radius: float = 1.5
) -> np.ndarray:
    """Mix each row with the mean of its spatial neighbours: ``(1 - weight) * own + weight * mean(neighbours)``.

    Neighbours are the other points of the same group (a section) within ``radius`` times that group's spot spacing
    (median nearest-neighbour distance): with the default 1.5, the 8 spots around a spot of a square ST grid, the 6
    of a hexagonal Visium grid. Points without a neighbour keep their own row. To mix several arrays of the same
    spots, build :func:`neighbour_means` once and use :func:`mix_with_neighbours`.

    Parameters
    ----------
    values
        (n, d) rows to mix, e.g. image embeddings.
    xy
        (n, 2) spot centres.
    groups
        (n,) group labels; points of different groups are never neighbours.
    weight
        Share of the neighbours' mean, in [0, 1]; 0 returns ``values`` unchanged.
    radius
        Neighbourhood radius in spot spacings.

    Returns
    -------
    A new (n, d) float array.
    """
    if weight == 0 or len(values) < 2:
        return np.array(values, dtype=float, copy=True)
    return mix_with_neighbours(values, neighbour_means(xy, groups, radius=radius), weight)
