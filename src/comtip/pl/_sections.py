"""Where a section's spots lie on its H&E: a downsampled crop of the image and the spots in its pixel space.

SpatialData: the spots' shapes and the image are placed through their spatialdata transformations, and the pyramid
level is chosen so that the crop around the spots is about ``max_px`` pixels wide. AnnData with scanpy's
``uns['spatial']``: the hires image (else lowres) and ``obsm['spatial'] * tissue_hires_scalef``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import _constants as C
from .._logging import logger


@dataclass
class SectionView:
    """One section, ready to draw.

    Attributes
    ----------
    section
        Name of the section (``obs['section']``, or the library of an AnnData).
    rows
        Positions in the table of the spots drawn.
    xy
        Spot centres ``(n, 2)`` in the pixel space of ``image``.
    radius
        Spot radii ``(n,)`` in pixels of ``image``.
    image
        ``(h, w, 3)`` uint8 crop of the H&E, or ``None`` (no image: spots only).
    extent
        ``(x0, x1, y1, y0)`` axis limits around the spots, in the pixel space of ``image``.
    um_per_px
        µm per pixel of ``image`` (``nan`` when unknown).
    """

    section: str
    rows: np.ndarray
    xy: np.ndarray
    radius: np.ndarray
    image: np.ndarray | None
    extent: tuple[float, float, float, float]
    um_per_px: float


def sections_of(data, table, *, table_key: str) -> list[str]:
    """The sections of ``data`` in their order (``obs['section']``, the table's regions, or ``uns['spatial']``)."""
    from anndata import AnnData

    if C.SECTION_KEY in table.obs:
        col = table.obs[C.SECTION_KEY]
        return [str(s) for s in (col.cat.categories if hasattr(col, "cat") else dict.fromkeys(col))]
    if isinstance(data, AnnData):
        return [str(s) for s in (data.uns.get("spatial") or {})] or ["library"]
    from .._spatial import table_regions

    regions, _, _ = table_regions(data, table_key)
    return regions


def section_rows(data, table, section: str, *, table_key: str) -> np.ndarray:
    """Positions in the table of the spots of ``section``."""
    from anndata import AnnData

    if C.SECTION_KEY in table.obs:
        return np.flatnonzero(table.obs[C.SECTION_KEY].astype(str).to_numpy() == section)
    if isinstance(data, AnnData):
        libs = list(data.uns.get("spatial") or {})
        if "library_id" in table.obs and len(libs) > 1:
            return np.flatnonzero(table.obs["library_id"].astype(str).to_numpy() == section)
        return np.arange(table.n_obs)
    from .._spatial import table_regions

    _, region_key, _ = table_regions(data, table_key)
    return np.flatnonzero(table.obs[region_key].astype(str).to_numpy() == section)


def section_view(
    data,
    table,
    section: str,
    rows: np.ndarray,
    *,
    table_key: str,
    image_key: str | None,
    spot_size: float | None,
    max_px: int = 1000,
    margin: float = 0.08,
) -> SectionView:
    """The image crop and spot geometry of ``rows`` (spots of one section); see :class:`SectionView`."""
    from anndata import AnnData

    if isinstance(data, AnnData):
        geo = _anndata_geometry(data, section, rows, image_key=image_key)
    else:
        geo = _sdata_geometry(data, table, rows, table_key=table_key, image_key=image_key)
    xy, radius, images, um_per_unit, keep = geo
    rows = rows[keep]
    if spot_size is not None:
        if not np.isfinite(um_per_unit):
            msg = "spot_size= is a diameter in µm, but the pixel size of this image is not known; leave spot_size=None."
            raise ValueError(msg)
        radius = np.full(len(xy), spot_size / 2 / um_per_unit)
    # bounding box of the spots with a margin, in the units of xy
    lo = (xy - radius[:, None]).min(axis=0)
    hi = (xy + radius[:, None]).max(axis=0)
    pad = margin * float((hi - lo).max()) + float(np.median(radius))
    lo, hi = lo - pad, hi + pad
    if images is None:
        return SectionView(section, rows, xy, radius, None, (lo[0], hi[0], hi[1], lo[1]), um_per_unit)

    # images: [(array (c, y, x) or (y, x, c) lazy, 3x3 affine level px -> units of xy)], finest first
    def crop_box(m):
        inv = np.linalg.inv(m)
        corners = np.array([[lo[0], lo[1], 1], [hi[0], lo[1], 1], [lo[0], hi[1], 1], [hi[0], hi[1], 1]]).T
        px = (inv @ corners)[:2]
        return px.min(axis=1), px.max(axis=1)

    # coarsest level whose crop is still at least max_px wide (else the finest)
    chosen = 0
    for i, (_, m) in enumerate(images):
        a, b = crop_box(m)
        if (b - a).max() >= max_px:
            chosen = i
    arr, m = images[chosen]
    (x0, y0), (x1, y1) = (np.floor(v).astype(int) for v in crop_box(m))
    h, w = int(arr.shape[-2]), int(arr.shape[-1])
    cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
    if cx1 <= cx0 or cy1 <= cy0:
        logger.warning("section %s: the spots lie outside its image; drawing them without it", section)
        return SectionView(section, rows, xy, radius, None, (lo[0], hi[0], hi[1], lo[1]), um_per_unit)
    crop = np.asarray(arr[:3, cy0:cy1, cx0:cx1]).transpose(1, 2, 0)
    step = max(1, int(np.ceil(max(crop.shape[:2]) / (2 * max_px))))
    if step > 1:
        from PIL import Image

        crop = np.asarray(Image.fromarray(np.ascontiguousarray(crop)).reduce(step))
    # spots into the crop's pixel space: level pixels, minus the crop origin, divided by the reduction step
    inv = np.linalg.inv(m)
    pix = (inv @ np.column_stack([xy, np.ones(len(xy))]).T).T[:, :2]
    scale = 1.0 / (np.sqrt(abs(np.linalg.det(m[:2, :2]))) * step)
    pix = (pix - [cx0, cy0]) / step
    box_lo = (np.array([x0, y0]) - [cx0, cy0]) / step
    box_hi = (np.array([x1, y1]) - [cx0, cy0]) / step
    extent = (float(box_lo[0]), float(box_hi[0]), float(box_hi[1]), float(box_lo[1]))
    return SectionView(section, rows, pix, radius * scale, crop.astype(np.uint8), extent, um_per_unit / scale)


def _sdata_geometry(sdata, table, rows: np.ndarray, *, table_key: str, image_key: str | None):
    """Spot centres and radii in the section's coordinate system, its image levels, µm per unit, kept rows."""
    from spatialdata.transformations import get_transformation

    from .._images import image_levels
    from .._spatial import affine_matrix, get_units, pixel_size, table_regions
    from ..pp._tiles import _centres, _find_image

    regions, region_key, instance_key = table_regions(sdata, table_key)
    sub = table.obs.iloc[rows]
    present = [r for r in regions if (sub[region_key].astype(str) == r).any()]
    if len(present) != 1:
        msg = f"The spots drawn must belong to one shapes element; they belong to {present}."
        raise ValueError(msg)
    region = present[0]
    shapes = sdata.shapes[region]
    img_key, cs = _find_image(sdata, region, image_key)
    if cs is None:
        cs = sorted(get_transformation(shapes, get_all=True))[0]
    to_cs = affine_matrix(get_transformation(shapes, cs))
    ids = sub[instance_key].to_numpy()
    pos = shapes.index.get_indexer(ids)
    keep = pos >= 0
    if not keep.any():
        msg = f"None of the spots of {region!r} in table {table_key!r} is in sdata.shapes[{region!r}]."
        raise ValueError(msg)
    gdf = shapes.iloc[pos[keep]]
    centres = _centres(gdf)
    xy = (to_cs @ np.column_stack([centres, np.ones(len(centres))]).T).T[:, :2]
    if "radius" in gdf.columns:
        r = gdf["radius"].to_numpy(float)
    else:
        r = np.sqrt(gdf.geometry.area.to_numpy(float) / np.pi)
    radius = r * pixel_size(to_cs)
    um_per_unit = 1.0 if get_units(sdata, cs) == "um" else float("nan")
    images = None
    if img_key is not None:
        images = [(lv.data, lv.to_cs) for lv in image_levels(sdata.images[img_key], cs, 1.0)]
    return xy, radius, images, um_per_unit, keep


def _anndata_geometry(adata, library: str, rows: np.ndarray, *, image_key: str | None):
    """The same from scanpy's layout: full-resolution pixels as units, the hires (else lowres) image."""
    if "spatial" not in adata.obsm:
        msg = "adata.obsm['spatial'] is missing: the spots cannot be placed (scanpy's Visium layout has it)."
        raise KeyError(msg)
    xy = np.asarray(adata.obsm["spatial"], dtype=float)[rows, :2]
    keep = np.isfinite(xy).all(axis=1)
    xy = xy[keep]
    spatial = adata.uns.get("spatial") or {}
    lib = spatial.get(library) or (next(iter(spatial.values())) if len(spatial) == 1 else {}) or {}
    sf = lib.get("scalefactors") or {}
    diameter = sf.get("spot_diameter_fullres")
    # pixel size as ct.io.from_anndata assumes it: a Visium spot is 55 µm wide
    um_per_unit = C.VISIUM_SPOT_DIAMETER_UM / float(diameter) if diameter else float("nan")
    if diameter:
        radius = np.full(len(xy), float(diameter) / 2)
    else:
        from .._spatial import nearest_neighbour_spacing

        radius = np.full(len(xy), 0.4 * np.nan_to_num(nearest_neighbour_spacing(xy), nan=1.0))
    images = None
    for res in [image_key] if image_key else ["hires", "lowres"]:
        img = (lib.get("images") or {}).get(res)
        scalef = sf.get(f"tissue_{res}_scalef")
        if img is None or not scalef:
            continue
        arr = np.asarray(img)
        lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
        if arr.ndim != 3 or arr.shape[-1] < 3 or lo == hi:
            continue  # e.g. the black hires placeholder of a Space Ranger folder
        if lo < 0 or hi > 255:
            logger.warning(
                "uns['spatial'][%r]['images'][%r] holds values in [%.3g, %.3g], not an RGB image; skipped",
                library,
                res,
                lo,
                hi,
            )
            continue
        if np.issubdtype(arr.dtype, np.floating):
            arr = (np.clip(arr * (255.0 if hi <= 1.0 else 1.0), 0, 255) + 0.5).astype(np.uint8)
        m = np.diag([1 / float(scalef), 1 / float(scalef), 1.0])  # image px -> full-resolution px
        images = [(arr[..., :3].transpose(2, 0, 1), m)]
        break
    if images is None and image_key:
        msg = f"No image {image_key!r} with a scale factor in adata.uns['spatial'][{library!r}]."
        raise KeyError(msg)
    return xy, radius, images, um_per_unit, keep
