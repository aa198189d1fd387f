"""Pseudo-spots on a grid over the tissue of an image: the spots of an image-only slide (no expression)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from .. import _constants as C
from .._images import choose_level, image_levels
from .._logging import logger
from .._spatial import get_units


def tissue_mask(rgb: np.ndarray) -> np.ndarray:
    """Tissue vs glass of a small RGB image ``(3, y, x)`` uint8: Otsu threshold on colour saturation and darkness."""
    from skimage.filters import threshold_otsu

    x = rgb[:3].astype(np.float32)
    sat = x.max(0) - x.min(0)
    dark = 255.0 - x.mean(0)
    score = sat + 0.5 * dark
    if np.ptp(score) < 1e-6:
        return np.zeros(score.shape, dtype=bool)
    return score > max(threshold_otsu(score), 20.0)


def grid_spots(
    sdata,
    *,
    image_key: str | None = None,
    spacing_um: float = 100.0,
    spot_diameter_um: float = 55.0,
    tissue_only: bool = True,
    min_tissue: float = 0.5,
    table_key: str = C.TABLE_KEY,
    key_added: str | None = None,
    overwrite: bool = False,
) -> str:
    """Place pseudo-spots on a square grid over the tissue of an image, with an (empty) table annotating them.

    For image-only slides (e.g. from :func:`comtip.io.wsi`): the spots get tiles with :func:`spot_tiles` and
    predictions with :func:`comtip.tl.predict_expression`, which fills the table with the predicted genes.

    Parameters
    ----------
    sdata
        SpatialData with the H&E image (its coordinate system in µm, as comtip's readers write it).
    image_key
        The image; default the only one.
    spacing_um
        Distance between neighbouring spots in µm.
    spot_diameter_um
        Diameter of the circles (for plots; tiles have their own size).
    tissue_only
        Keep only spots on tissue (Otsu threshold on saturation and darkness of a low-resolution level).
    min_tissue
        Minimal tissue fraction under a spot to keep it.
    table_key
        Name of the table created.
    key_added
        Name of the shapes element; default ``"{section}_grid"`` where the image is ``"{section}_he"``.
    overwrite
        Replace an existing table / shapes element of the same names.

    Returns
    -------
    The key of the shapes element. Also sets ``sdata.tables[table_key]``: spots x 0 genes, ``obs['section']``,
    ``obs['region']``, ``obs['spot_id']``, ``obs['tissue_fraction']``.

    Examples
    --------
    >>> sdata = ct.io.wsi("slide.svs")
    >>> ct.pp.grid_spots(sdata, spacing_um=100)
    >>> ct.pp.spot_tiles(sdata)
    """
    import anndata as ad
    import geopandas as gpd
    from shapely import points
    from spatialdata.models import ShapesModel, TableModel
    from spatialdata.transformations import Affine, get_transformation

    if image_key is None:
        if len(sdata.images) != 1:
            msg = f"Pass image_key=: the SpatialData object has {len(sdata.images)} images ({list(sdata.images)})."
            raise ValueError(msg)
        image_key = next(iter(sdata.images))
    if image_key not in sdata.images:
        msg = f"No image {image_key!r} (images: {list(sdata.images)})."
        raise KeyError(msg)
    cs_all = list(get_transformation(sdata.images[image_key], get_all=True))
    cs = next((c for c in cs_all if get_units(sdata, c) == "um"), None)
    if cs is None:
        msg = f"The coordinate systems of image {image_key!r} ({cs_all}) have no known unit; read the slide with ct.io.wsi (µm) first."
        raise ValueError(msg)
    section = image_key[: -len(C.IMAGE_SUFFIX)] if image_key.endswith(C.IMAGE_SUFFIX) else image_key
    key_added = key_added or f"{section}_grid"
    if not overwrite:
        for where, key in (("shapes", key_added), ("tables", table_key)):
            if key in getattr(sdata, where):
                msg = f"sdata.{where}[{key!r}] exists already; pass overwrite=True or another name."
                raise ValueError(msg)
    if spacing_um <= 0 or spot_diameter_um <= 0:
        msg = "spacing_um and spot_diameter_um must be positive."
        raise ValueError(msg)
    levels = image_levels(sdata.images[image_key], cs, 1.0)
    full = levels[0]
    h, w = full.shape_yx
    step = spacing_um / full.mpp
    xs = np.arange(step / 2, w, step)
    ys = np.arange(step / 2, h, step)
    gx, gy = np.meshgrid(xs, ys)
    xy = np.column_stack([gx.ravel(), gy.ravel()])
    frac = np.ones(len(xy))
    if tissue_only and len(xy):
        low = choose_level(levels, max(spacing_um / 8, full.mpp))
        arr = np.asarray(low.data if isinstance(low.data, np.ndarray) else low.data.compute())
        mask = tissue_mask(arr)
        # fraction of tissue within each spot's radius, on the low-resolution mask
        f = full.mpp / low.mpp
        r = max(1, int(round(spot_diameter_um / 2 / low.mpp)))
        from scipy.ndimage import uniform_filter

        density = uniform_filter(mask.astype(np.float32), size=2 * r + 1, mode="constant")
        iy = np.clip((xy[:, 1] * f).astype(int), 0, mask.shape[0] - 1)
        ix = np.clip((xy[:, 0] * f).astype(int), 0, mask.shape[1] - 1)
        frac = density[iy, ix]
        keep = frac >= min_tissue
        xy, frac = xy[keep], frac[keep]
    if len(xy) == 0:
        msg = f"No tissue found on image {image_key!r}: lower min_tissue, or pass tissue_only=False."
        raise ValueError(msg)
    gdf = gpd.GeoDataFrame(
        {"radius": np.full(len(xy), spot_diameter_um / 2 / full.mpp)},
        geometry=points(xy[:, 0], xy[:, 1]),
        index=pd.RangeIndex(len(xy)),
    )
    shapes = ShapesModel.parse(
        gdf, transformations={cs: Affine(full.to_cs, input_axes=("x", "y"), output_axes=("x", "y"))}
    )
    obs = pd.DataFrame(
        {
            C.SECTION_KEY: pd.Categorical([section] * len(xy)),
            C.REGION_KEY: pd.Categorical([key_added] * len(xy)),
            C.INSTANCE_KEY: np.arange(len(xy), dtype=np.int64),
            "tissue_fraction": frac.astype(np.float32),
        },
        index=pd.Index([f"{section}_grid{i}" for i in range(len(xy))], dtype=str),
    )
    table = TableModel.parse(
        ad.AnnData(obs=obs), region=key_added, region_key=C.REGION_KEY, instance_key=C.INSTANCE_KEY
    )
    sdata.shapes[key_added] = shapes
    sdata.tables[table_key] = table
    logger.info("added %d grid spots as sdata.shapes[%r] and sdata.tables[%r]", len(xy), key_added, table_key)
    return key_added
