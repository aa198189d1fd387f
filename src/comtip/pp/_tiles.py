"""Tile boxes of spots: computed once per spot in the pixel grid of the chosen pyramid level."""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import numpy as np
import pandas as pd

from .. import _constants as C
from .._checks import check_image_pixels, check_names, check_spot_spacing
from .._images import choose_level, image_levels
from .._logging import logger
from .._spatial import get_units, nearest_neighbour_spacing, table_regions

TILE_COLUMNS = [
    "region",
    C.INSTANCE_KEY,
    "obs_name",
    "image",
    "level",
    "x0",
    "y0",
    "size",
    "inside",
    "tile_size_um",
    "tile_size_px",
]


def _find_image(sdata, region: str, image_key: str | Mapping[str, str] | None) -> tuple[str | None, str | None]:
    """The image of a spots element and the coordinate system they share (``None, None`` for count-only spots)."""
    from spatialdata.transformations import get_transformation

    shapes_cs = set(get_transformation(sdata.shapes[region], get_all=True))
    if isinstance(image_key, Mapping):
        candidates = [image_key[region]] if region in image_key else []
    elif isinstance(image_key, str):
        candidates = [image_key]
    else:
        candidates = [k for k, img in sdata.images.items() if shapes_cs & set(get_transformation(img, get_all=True))]
        if len(candidates) > 1:
            section = region[: -len(C.SPOTS_SUFFIX)] if region.endswith(C.SPOTS_SUFFIX) else region
            preferred = [k for k in candidates if k == f"{section}{C.IMAGE_SUFFIX}"]
            if len(preferred) != 1:
                msg = (
                    f"Spots {region!r} share a coordinate system with several images {candidates}; "
                    f"pass image_key={{'{region}': '<image>'}} to say which one to tile."
                )
                raise ValueError(msg)
            candidates = preferred
    if not candidates:
        section = region[: -len(C.SPOTS_SUFFIX)] if region.endswith(C.SPOTS_SUFFIX) else region
        own = f"{section}{C.IMAGE_SUFFIX}"
        if image_key is None and own in sdata.images:
            # the section's own image is there but cannot be reached: misaligned, not count-only
            msg = (
                f"Image {own!r} and spots {region!r} share no coordinate system (image: "
                f"{sorted(get_transformation(sdata.images[own], get_all=True))}, spots: {sorted(shapes_cs)}), so the "
                "spots cannot be placed on the image. Add a transformation of both to one coordinate system "
                "(spatialdata.transformations.set_transformation)."
            )
            raise ValueError(msg)
        if image_key is None and sdata.images:
            msg_cs = {k: sorted(get_transformation(img, get_all=True)) for k, img in sdata.images.items()}
            logger.info("spots %r share no coordinate system with any image %s: no tiles (count-only)", region, msg_cs)
        return None, None
    key = candidates[0]
    if key not in sdata.images:
        msg = f"Image {key!r} (for spots {region!r}) is not an image element of the SpatialData object (images: {list(sdata.images)})."
        raise KeyError(msg)
    common = shapes_cs & set(get_transformation(sdata.images[key], get_all=True))
    if not common:
        msg = (
            f"Image {key!r} and spots {region!r} share no coordinate system (image: "
            f"{sorted(get_transformation(sdata.images[key], get_all=True))}, spots: {sorted(shapes_cs)}), so the spots "
            "cannot be placed on the image. Add a transformation of both to one coordinate system "
            "(spatialdata.transformations.set_transformation)."
        )
        raise ValueError(msg)
    um = [cs for cs in common if get_units(sdata, cs) == "um"]
    return key, (um or sorted(common))[0]


def _centres(gdf) -> np.ndarray:
    geom = gdf.geometry
    if (geom.geom_type == "Point").all():
        return np.column_stack([geom.x.to_numpy(), geom.y.to_numpy()])
    c = geom.centroid
    return np.column_stack([c.x.to_numpy(), c.y.to_numpy()])


def spot_tiles(
    sdata,
    *,
    tile_size_um: float = C.TILE_SIZE_UM,
    tile_size_px: int | None = C.TILE_SIZE_PX,
    table_key: str = C.TABLE_KEY,
    image_key: str | Mapping[str, str] | None = None,
    target_mpp: float | None = None,
    mpp: float | None = None,
    key_added: str = C.TILES_KEY,
    overwrite: bool = False,
) -> str:
    """Compute the tile box of every spot, once, and store the boxes as shapes.

    For each spots element the table annotates, the image sharing its coordinate system is found, each
    spot centre is mapped into the image's pixel grid through the spatialdata transformations, and the
    pyramid level is chosen from the target µm per pixel (the coarsest level at least as fine as
    ``target_mpp``). A tile is a square of ``tile_size_um`` centred on the spot; its centre pixel is the
    image pixel holding the spot centre. Tiles are read later, in batches, by :class:`comtip.data.SpotDataset`.

    Parameters
    ----------
    sdata
        SpatialData with a table annotating spots (shapes) and H&E images.
    tile_size_um
        Physical side of a tile in µm (EVAL.md: 112).
    tile_size_px
        Side of the tiles handed to the model, in pixels (224); ``None`` keeps the native size of the level.
    table_key
        Table that annotates the spots.
    image_key
        Image to tile, or ``{spots element: image}``; by default the image sharing the spots' coordinate system.
    target_mpp
        Wanted µm per pixel; by default ``tile_size_um / tile_size_px`` (0.5 µm/px, as HEST).
    mpp
        µm per unit of the shared coordinate system, for data not read by a comtip reader (whose coordinate
        systems are in µm).
    key_added
        Name of the shapes element written.
    overwrite
        Replace an existing ``key_added`` element.

    Returns
    -------
    The key of the shapes element written, ``sdata.shapes[key_added]``: one box polygon per spot in the pixel
    grid of the chosen level, with columns ``region``, ``spot_id``, ``obs_name``, ``image``, ``level``, ``x0``,
    ``y0``, ``size`` (pixels of that level), ``inside`` (fraction of the tile within the image),
    ``tile_size_um`` and ``tile_size_px``. Spots of count-only sections (no image) get no tile.

    Raises
    ------
    ValueError
        Duplicated spot names in the table; an image that is not 8-bit RGB(A); spots sharing no coordinate system
        with their section's image (``"{section}_he"``); every spot of an element outside its image.

    Warns
    -----
    UserWarning
        RGBA images (the 4th channel is dropped); spots whose nearest-neighbour spacing in µm is far from any
        spot-based technology's (a pixel size off by about 10x); tiles leaving the image (padded with white).

    Examples
    --------
    >>> sdata = ct.datasets.her2st(sections=["C2"])
    >>> ct.pp.spot_tiles(sdata, tile_size_um=112)
    'comtip_tiles'
    """
    import geopandas as gpd
    from shapely import box
    from spatialdata.models import ShapesModel
    from spatialdata.transformations import Affine, get_transformation

    from .._spatial import affine_matrix

    if key_added in sdata.shapes and not overwrite:
        msg = f"sdata.shapes[{key_added!r}] exists already; pass overwrite=True to replace it, or another key_added."
        raise ValueError(msg)
    if not tile_size_um > 0:
        msg = f"tile_size_um must be positive, got {tile_size_um}."
        raise ValueError(msg)
    if tile_size_px is not None and int(tile_size_px) < 8:
        msg = f"tile_size_px={tile_size_px} is too small for an image model; use at least 8 (224 is the default)."
        raise ValueError(msg)
    target = target_mpp if target_mpp is not None else (tile_size_um / tile_size_px if tile_size_px else 0.0)

    regions, region_key, instance_key = table_regions(sdata, table_key)
    table = sdata.tables[table_key]
    check_names(table, element=f"Table {table_key!r}", genes=False)
    checked_images: set[str] = set()
    frames, transforms, no_image = [], {}, []
    n_partial = n_outside = 0
    for region in regions:
        img_key, cs = _find_image(sdata, region, image_key)
        if img_key is None:
            no_image.append(region)
            continue
        unit = get_units(sdata, cs)
        if mpp is not None:
            um_per_unit = float(mpp)
        elif unit == "um":
            um_per_unit = 1.0
        else:
            msg = (
                f"Pixel size missing: the unit of coordinate system {cs!r} (image {img_key!r}, spots {region!r}) is not "
                "known. Pass mpp= (µm per unit of that coordinate system), or read the data with a comtip reader."
            )
            raise ValueError(msg)
        image = sdata.images[img_key]
        if img_key not in checked_images:
            check_image_pixels(image, key=img_key)
            checked_images.add(img_key)
        levels = image_levels(image, cs, um_per_unit)
        level = choose_level(levels, target) if target > 0 else levels[0]
        size = round(tile_size_um / level.mpp)
        if size < 1:
            msg = f"A {tile_size_um} µm tile is under one pixel of image {img_key!r} ({level.mpp:.3g} µm/px): check the pixel size."
            raise ValueError(msg)
        shapes = sdata.shapes[region]
        xy_shapes = _centres(shapes)
        to_cs = affine_matrix(get_transformation(shapes, cs))
        xy_cs = (to_cs @ np.column_stack([xy_shapes, np.ones(len(xy_shapes))]).T).T
        if not np.isfinite(xy_cs[:, :2]).all():
            msg = (
                f"Spots {region!r} have {int((~np.isfinite(xy_cs[:, :2]).all(axis=1)).sum())} centres that are not "
                "finite numbers (NaN or empty geometries); fix or drop them in sdata.shapes first."
            )
            raise ValueError(msg)
        check_spot_spacing(nearest_neighbour_spacing(xy_cs[:, :2]) * um_per_unit, region=region, cs=cs, mpp=mpp)
        xy_px = (np.linalg.inv(level.to_cs) @ xy_cs.T).T[:, :2]
        cx, cy = np.floor(xy_px[:, 0]).astype(np.int64), np.floor(xy_px[:, 1]).astype(np.int64)
        x0, y0 = cx - size // 2, cy - size // 2
        h, w = level.shape_yx
        ix = np.clip(np.minimum(x0 + size, w) - np.maximum(x0, 0), 0, None)
        iy = np.clip(np.minimum(y0 + size, h) - np.maximum(y0, 0), 0, None)
        inside = (ix * iy) / float(size * size)
        if (inside == 0).all():
            msg = (
                f"All {len(inside)} spots of {region!r} fall outside image {img_key!r} ({w} x {h} px at level "
                f"{level.index}). The spots and the image are probably misaligned or the pixel size is wrong: check "
                f"their transformations to {cs!r}."
            )
            raise ValueError(msg)
        n_partial += int(((inside > 0) & (inside < 1)).sum())
        n_outside += int((inside == 0).sum())
        # spots -> table rows
        rows = table.obs[table.obs[region_key] == region]
        inst = pd.Series(rows.index.to_numpy(), index=rows[instance_key].to_numpy())
        obs_names = inst.reindex(shapes.index.to_numpy()).to_numpy()
        frames.append(
            pd.DataFrame(
                {
                    "region": region,
                    C.INSTANCE_KEY: shapes.index.to_numpy(),
                    "obs_name": obs_names,
                    "image": img_key,
                    "level": level.index,
                    "x0": x0,
                    "y0": y0,
                    "size": size,
                    "inside": inside,
                    "tile_size_um": float(tile_size_um),
                    "tile_size_px": int(tile_size_px or size),
                }
            )
        )
        m = level.to_cs
        if cs in transforms and not np.allclose(transforms[cs], m):
            msg = f"Several images with different pixel grids share coordinate system {cs!r}; tile them with separate key_added."
            raise ValueError(msg)
        transforms[cs] = m
    if not frames:
        msg = (
            f"No spots of table {table_key!r} lie on an image: regions {no_image} share no coordinate system with any "
            f"image (images: {list(sdata.images) or 'none'}). Add the H&E image, or a transformation that places the spots on it."
        )
        raise ValueError(msg)
    df = pd.concat(frames, ignore_index=True)
    df = df[df["obs_name"].notna()].reset_index(drop=True)  # shapes without a table row get no tile
    geometry = box(df["x0"], df["y0"], df["x0"] + df["size"], df["y0"] + df["size"])
    gdf = gpd.GeoDataFrame(df, geometry=geometry)
    gdf["obs_name"] = gdf["obs_name"].astype(str)
    tfs = {cs: Affine(m, input_axes=("x", "y"), output_axes=("x", "y")) for cs, m in transforms.items()}
    parsed = ShapesModel.parse(gdf, transformations=tfs)
    if n_partial or n_outside:  # before writing: with warnings as errors, nothing is half-written
        warnings.warn(
            f"{n_partial + n_outside} of {len(df)} spot tiles leave the image ({n_outside} entirely); the missing part is "
            "padded with white. Column 'inside' of the tiles gives the fraction within the image.",
            UserWarning,
            stacklevel=2,
        )
    sdata.shapes[key_added] = parsed
    if no_image:
        logger.info("no tiles for %s: no image shares their coordinate system (count-only)", no_image)
    logger.info("added %d tiles as sdata.shapes[%r]", len(df), key_added)
    return key_added
