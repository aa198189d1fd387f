"""AnnData with scanpy's Visium layout (``uns['spatial']``, ``obsm['spatial']``) -> SpatialData."""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dask.array as da
import numpy as np
import pandas as pd
from scipy import sparse

from .. import _constants as C
from .._logging import logger
from ._utils import build_table, combine_sections, spot_circles

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

ImageLike = str | os.PathLike | np.ndarray | da.Array
GENE_VAR_COLUMNS = ("gene_ids", "feature_types", "genome")  # gene annotations carried into the table's var
RESERVED_OBS = ("spot", C.SECTION_KEY, C.REGION_KEY, C.INSTANCE_KEY)


# --- shared image helpers (also used by ct.io.visium) ---------------------------------------------------------------
def rgb_array(arr: Any, *, element: str, channels_last: bool | None = None) -> da.Array:
    """A ``(3, y, x)`` uint8 dask array from an in-memory or dask image; RGBA warns, 1 channel errors.

    ``channels_last=None`` guesses the layout: ``(y, x, c)`` (scanpy, PIL) unless the first axis looks like channels.
    Float images in ``[0, 1]`` (scanpy's ``uns['spatial']`` images) are scaled to ``[0, 255]``.
    """
    if not isinstance(arr, da.Array):
        arr = np.asarray(arr)
    if arr.ndim == 2:
        msg = f"Image of {element!r} has one channel (shape {arr.shape}); comtip needs an RGB H&E image."
        raise ValueError(msg)
    if arr.ndim != 3:
        msg = f"Image of {element!r} has shape {arr.shape}; expected a 2D RGB image (y, x, 3) or (3, y, x)."
        raise ValueError(msg)
    if channels_last is None:
        channels_last = not (arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4))
    if channels_last:
        arr = arr.transpose(2, 0, 1)
    n = arr.shape[0]
    if n < 3:
        msg = f"Image of {element!r} has {n} channel(s); comtip needs an RGB H&E image. Convert it to RGB."
        raise ValueError(msg)
    if n == 4:
        warnings.warn(
            f"Image of {element!r} is RGBA; using its RGB channels and dropping alpha.", UserWarning, stacklevel=3
        )
    elif n > 4:
        msg = f"Image of {element!r} has {n} channels; comtip needs a brightfield RGB (H&E) image."
        raise ValueError(msg)
    arr = arr[:3]
    if np.issubdtype(arr.dtype, np.floating):
        top = float(arr.max())
        if top <= 1.0:
            arr = arr * 255.0
        else:
            warnings.warn(
                f"Image of {element!r} is floating point with values up to {top:.4g}, neither in [0, 1] nor uint8; "
                "values are clipped to [0, 255].",
                UserWarning,
                stacklevel=3,
            )
        arr = (arr.clip(0, 255) + 0.5).astype(np.uint8)
    elif arr.dtype == np.uint16:
        arr = (arr // 257).astype(np.uint8)
    elif arr.dtype != np.uint8:
        if int(arr.min()) < 0 or int(arr.max()) > 255:
            msg = f"Image of {element!r} has {arr.dtype} values outside [0, 255]; pass an 8-bit RGB image."
            raise ValueError(msg)
        arr = arr.astype(np.uint8)
    return arr if isinstance(arr, da.Array) else da.from_array(arr, chunks=arr.shape)


def is_blank(arr: Any) -> bool:
    """Whether an image has one value everywhere (e.g. the black placeholder of a Space Ranger folder)."""
    return (
        bool(arr.min() == arr.max()) if not isinstance(arr, da.Array) else bool(da.compute(arr.min() == arr.max())[0])
    )


def check_spots_in_image(xy_px: np.ndarray, image_shape_px: tuple[float, float], *, element: str) -> None:
    """Warn when spots (full-resolution pixels, ``x, y``) fall outside the image's extent (full-resolution pixels)."""
    h, w = image_shape_px
    outside = (xy_px[:, 0] < 0) | (xy_px[:, 1] < 0) | (xy_px[:, 0] > w) | (xy_px[:, 1] > h)
    if outside.any():
        warnings.warn(
            f"{int(outside.sum())} of {len(xy_px)} spots lie outside image {element!r} ({w:.0f} x {h:.0f} full-resolution "
            f"px; spots up to x={xy_px[:, 0].max():.0f}, y={xy_px[:, 1].max():.0f}). Is it the full-resolution image "
            "the spot positions refer to?",
            UserWarning,
            stacklevel=3,
        )


def visium_mpp(mpp: float | None, spot_diameter_px: float | None, *, name: str) -> float:
    """µm per full-resolution pixel: ``mpp`` or 55 µm / ``spot_diameter_fullres``; checks that they agree."""
    estimate = C.VISIUM_SPOT_DIAMETER_UM / spot_diameter_px if spot_diameter_px and spot_diameter_px > 0 else None
    if mpp is None:
        if estimate is None:
            msg = (
                f"Pixel size missing for {name!r}: no scalefactors['spot_diameter_fullres'] to derive it from. "
                "Pass mpp= (µm per full-resolution pixel)."
            )
            raise ValueError(msg)
        return float(estimate)
    if not (np.isfinite(mpp) and mpp > 0):
        msg = f"Pixel size of {name!r} must be a positive number of µm per pixel, got mpp={mpp!r}."
        raise ValueError(msg)
    if estimate is not None and not (0.5 < mpp / estimate < 2.0):
        warnings.warn(
            f"{name!r}: mpp={mpp} µm/px disagrees with spot_diameter_fullres ({spot_diameter_px:.4g} px for a 55 µm spot "
            f"gives {estimate:.4g} µm/px). Check the pixel size: tiles will have the wrong physical size.",
            UserWarning,
            stacklevel=3,
        )
    return float(mpp)


# --- counts ---------------------------------------------------------------------------------------------------------
def _values(m: Any) -> np.ndarray:
    return np.asarray(m.data if sparse.issparse(m) else m)


def _is_counts(m: Any) -> bool:
    v = _values(m)
    if v.size == 0:
        return True
    return bool(np.isfinite(v).all() and v.min() >= 0 and np.all(np.mod(v, 1) == 0))


def _guess_transform(m: Any, uns: Mapping[str, Any]) -> str:
    v = _values(m)
    if "log1p" in uns:
        return "log1p"
    if v.size and np.nanmin(v) < 0:
        return "scaled"
    if v.size and np.nanmax(v) <= 20:  # log1p of normalised counts; raw or normalised counts go far higher
        return "log1p"
    return "unknown"


def _expression(adata: AnnData, counts_layer: str | None) -> tuple[Any, dict[str, Any]]:
    """The matrix to store and the ``uns['comtip_input']`` record of what it holds."""
    if counts_layer is not None:
        if counts_layer not in adata.layers:
            msg = f"Layer {counts_layer!r} not in adata.layers (layers: {list(adata.layers) or 'none'}); pass counts_layer=None to use X."
            raise KeyError(msg)
        m = adata.layers[counts_layer]
        v = _values(m)
        if v.size and (not np.isfinite(v).all() or v.min() < 0):
            msg = f"Layer {counts_layer!r} has negative or non-finite values; counts_layer= must name raw counts."
            raise ValueError(msg)
        if not _is_counts(m):
            warnings.warn(
                f"Layer {counts_layer!r} has non-integer values; storing it as counts, as asked (counts_layer=).",
                UserWarning,
                stacklevel=3,
            )
        return m, {"x_is_counts": True, "x_transform": None, "source": f"layers[{counts_layer!r}]"}
    m = adata.X
    if m is None:
        msg = "adata.X is empty; pass counts_layer= with the name of the layer of raw counts."
        raise ValueError(msg)
    if _is_counts(m):
        return m, {"x_is_counts": True, "x_transform": None, "source": "X"}
    transform = _guess_transform(m, adata.uns)
    hint = (
        f" adata has layers {list(adata.layers)}: pass counts_layer= if one holds raw counts."
        if len(adata.layers)
        else ""
    )
    warnings.warn(
        f"adata.X is not raw counts (non-integer or negative values; looks {transform}). It is stored as is in the "
        f"table's X, without layers['counts'], and table.uns[{C.INPUT_KEY!r}] records x_is_counts=False so that comtip "
        f"does not normalise it again. Duplicated gene symbols keep their first column.{hint}",
        UserWarning,
        stacklevel=3,
    )
    return m, {"x_is_counts": False, "x_transform": transform, "source": "X"}


# --- libraries ------------------------------------------------------------------------------------------------------
def _libraries(adata: AnnData, library_id: str | Sequence[str] | None, library_key: str) -> dict[str, np.ndarray]:
    """``{library: boolean mask of its spots}``."""
    spatial = adata.uns.get("spatial", {}) or {}
    in_uns = list(spatial)
    if library_key in adata.obs:
        col = adata.obs[library_key].astype(str)
        found = list(dict.fromkeys(col))
        masks = {lib: (col == lib).to_numpy() for lib in found}
        if in_uns:
            missing = [lib for lib in found if lib not in spatial]
            if missing and len(in_uns) > 1:
                logger.warning("libraries %s of obs[%r] have no uns['spatial'] entry", missing, library_key)
    elif len(in_uns) > 1:
        msg = (
            f"adata.uns['spatial'] holds {len(in_uns)} libraries {in_uns} but obs has no {library_key!r} column to "
            f"tell their spots apart. Add obs[{library_key!r}] or pass library_key= with the column's name."
        )
        raise ValueError(msg)
    else:
        name = in_uns[0] if in_uns else (library_id if isinstance(library_id, str) else "library")
        masks = {name: np.ones(adata.n_obs, dtype=bool)}
    if library_id is not None:
        wanted = [library_id] if isinstance(library_id, str) else list(library_id)
        if len(masks) == 1 and not in_uns and library_key not in adata.obs:
            return {wanted[0]: next(iter(masks.values()))}
        unknown = [lib for lib in wanted if lib not in masks]
        if unknown:
            msg = f"Unknown library_id {unknown}; the AnnData holds {list(masks)}."
            raise ValueError(msg)
        masks = {lib: masks[lib] for lib in wanted}
    return masks


def _library_image(
    adata: AnnData,
    lib: str,
    image: ImageLike | None,
    *,
    mpp: float,
    xy_px: np.ndarray,
) -> dict[str, Any]:
    """Image elements of one library: the best image as ``"{lib}_he"`` (full-res ``image``, else hires, else lowres)."""
    from ._image import image_element, level0_shape, parse_image

    element = f"{lib}{C.IMAGE_SUFFIX}"
    if image is not None:
        if isinstance(image, str | os.PathLike):
            el, _ = image_element(Path(image), element=element, coordinate_system=lib, mpp=mpp)
        else:
            el = parse_image(rgb_array(image, element=element), coordinate_system=lib, mpp=mpp)
        check_spots_in_image(xy_px, level0_shape(el), element=element)
        return {element: el}
    lib_uns = (adata.uns.get("spatial", {}) or {}).get(lib, {}) or {}
    images = lib_uns.get("images", {}) or {}
    scalefactors = lib_uns.get("scalefactors", {}) or {}
    candidates = []
    for res in ("hires", "lowres"):
        scalef = scalefactors.get(f"tissue_{res}_scalef")
        if res in images and scalef:
            candidates.append((res, images[res], float(scalef)))
        elif res in images:
            logger.warning("library %s: uns image %r has no scalefactors['tissue_%s_scalef']; left out", lib, res, res)
    out: dict[str, Any] = {}
    for res, img, scalef in candidates:
        name = element if not out else f"{lib}_{res}_image"
        arr = rgb_array(img, element=name, channels_last=True)
        if not out and is_blank(arr):
            warnings.warn(
                f"Image {res!r} of library {lib!r} is blank (one value everywhere); left out.",
                UserWarning,
                stacklevel=3,
            )
            continue
        if not out:
            _, h, w = arr.shape
            check_spots_in_image(xy_px, (h / scalef, w / scalef), element=f"{res} image of {lib!r}")
        out[name] = parse_image(arr, coordinate_system=lib, mpp=mpp / scalef)
    if not out:
        logger.info("library %s: no image (pass image= for the full-resolution H&E)", lib)
    return out


def from_anndata(
    adata: AnnData,
    *,
    library_id: str | Sequence[str] | None = None,
    image: ImageLike | Mapping[str, ImageLike] | None = None,
    mpp: float | None = None,
    counts_layer: str | None = None,
    library_key: str = "library_id",
    harmonize_genes: bool = True,
) -> SpatialData:
    """Convert an AnnData with scanpy's Visium layout to comtip's SpatialData.

    Reads ``obsm['spatial']`` (spot centres in full-resolution pixels, ``x, y``), ``uns['spatial'][library]``
    (``scalefactors`` and ``images['hires'|'lowres']``) and the expression. Each library becomes a section with its
    own coordinate system in micrometres. The AnnData is not modified.

    Parameters
    ----------
    adata
        E.g. from :func:`scanpy.read_visium` or :func:`squidpy.datasets.visium`.
    library_id
        Library (or libraries) to read; by default all of ``uns['spatial']`` (or of ``obs[library_key]``). Names
        the section when the AnnData has no ``uns['spatial']``.
    image
        The full-resolution H&E (path to a JPEG/PNG/TIFF/whole slide, or a ``(y, x, 3)`` array) in the pixel space
        of ``obsm['spatial']``; ``{library: image}`` for several libraries. Takes precedence over the
        ``uns['spatial']`` images, which are used otherwise (hires, else lowres, placed by their scale factors).
    mpp
        µm per full-resolution pixel; by default 55 µm / ``scalefactors['spot_diameter_fullres']``.
    counts_layer
        Layer of raw counts. By default ``X`` is used as counts when it holds non-negative integers; otherwise it is
        stored as is, with a warning, and the table records that it is not counts (see Returns).
    library_key
        Column of ``obs`` naming each spot's library when there are several.
    harmonize_genes
        Upper-case gene symbols and map old ones to current HGNC symbols (see :func:`comtip.io.read_st`).

    Returns
    -------
    SpatialData with, per library ``lib``: image ``"{lib}_he"`` (multiscale, lazy; absent without any image; the
    other ``uns`` image is kept as ``"{lib}_lowres_image"``), shapes ``"{lib}_spots"`` (circles, radius in
    full-resolution pixels) and one table ``"table"`` with the expression in ``X`` (and ``layers['counts']`` when it
    is counts), ``obs['section']``, ``obs['region']``, ``obs['spot_id']``, the AnnData's other ``obs`` columns,
    ``var['original_symbols']`` (and ``var['gene_ids']`` when present), and ``uns['comtip_input']`` =
    ``{'x_is_counts': bool, 'x_transform': None | 'log1p' | 'scaled' | 'unknown', 'source': 'X' | "layers['...']"}``.

    Examples
    --------
    >>> import scanpy as sc
    >>> adata = sc.read_visium("outs/")
    >>> sdata = ct.io.from_anndata(adata, image="outs/tissue_fullres.tif")
    """
    from .._checks import check_has_spots, check_names

    check_has_spots(adata, element="The AnnData")
    check_names(adata, element="The AnnData", genes=False)  # duplicated genes are merged (harmonize_genes)
    if "spatial" not in adata.obsm:
        msg = "adata.obsm['spatial'] is missing: from_anndata needs the spot centres in full-resolution image pixels."
        raise KeyError(msg)
    xy_all = np.asarray(adata.obsm["spatial"], dtype=float)
    if xy_all.ndim != 2 or xy_all.shape[1] < 2:
        msg = f"adata.obsm['spatial'] has shape {xy_all.shape}; expected (n_obs, 2) spot centres (x, y) in pixels."
        raise ValueError(msg)
    xy_all = xy_all[:, :2]
    masks = _libraries(adata, library_id, library_key)
    matrix, record = _expression(adata, counts_layer)
    if image is not None and not isinstance(image, Mapping) and len(masks) > 1:
        msg = f"image= is one image but the AnnData holds {len(masks)} libraries {list(masks)}; pass image={{library: image}}."
        raise ValueError(msg)
    finite = np.isfinite(xy_all).all(axis=1)
    if "in_tissue" in adata.obs:
        in_tissue = pd.to_numeric(adata.obs["in_tissue"], errors="coerce").fillna(1).to_numpy() == 1
    else:
        in_tissue = np.ones(adata.n_obs, dtype=bool)

    genes = adata.var_names.astype(str)
    var_extra = adata.var[[c for c in GENE_VAR_COLUMNS if c in adata.var.columns]].astype(str)
    obs_cols = [c for c in adata.obs.columns if c not in RESERVED_OBS and c != library_key]
    dropped = [c for c in adata.obs.columns if c in RESERVED_OBS]
    if dropped:
        logger.info("obs columns %s are comtip's own and are replaced", dropped)

    parts = []
    for lib, mask in masks.items():
        keep = mask & finite & in_tissue
        if (n_out := int((mask & finite & ~in_tissue).sum())) > 0:
            logger.info("library %s: %d spots outside the tissue (obs['in_tissue'] == 0) dropped", lib, n_out)
        if (n_nan := int((mask & ~finite).sum())) > 0:
            logger.warning("library %s: %d spots without a position in obsm['spatial'] dropped", lib, n_nan)
        if not keep.any():
            msg = f"Library {lib!r} has no spot with a position under the tissue."
            raise ValueError(msg)
        idx = np.flatnonzero(keep)
        xy = xy_all[idx]
        scalefactors = ((adata.uns.get("spatial", {}) or {}).get(lib, {}) or {}).get("scalefactors", {}) or {}
        lib_mpp = visium_mpp(mpp, scalefactors.get("spot_diameter_fullres"), name=f"library {lib}")
        lib_image = image.get(lib) if isinstance(image, Mapping) else image
        if isinstance(image, Mapping) and lib_image is None:
            logger.warning("library %s: not in image=, falling back to the uns['spatial'] images", lib)
        images = _library_image(adata, lib, lib_image, mpp=lib_mpp, xy_px=xy)
        region = f"{lib}{C.SPOTS_SUFFIX}"
        shapes = {region: spot_circles(xy, C.VISIUM_SPOT_DIAMETER_UM / 2 / lib_mpp, coordinate_system=lib, mpp=lib_mpp)}
        obs = adata.obs.iloc[idx][obs_cols].copy()
        table = build_table(
            sparse.csr_matrix(matrix[idx], dtype=np.float32),
            spot_names=adata.obs_names[idx].to_numpy(),
            genes=genes,
            section=lib,
            region=region,
            obs=obs,
            harmonize=harmonize_genes,
            original_names=genes,
            var=var_extra,
            is_counts=record["x_is_counts"],
        )
        parts.append((images, shapes, table, lib))
        logger.info("library %s: %d spots, %s", lib, len(idx), f"image {list(images)}" if images else "no image")
    sdata = combine_sections(parts)
    sdata.tables[C.TABLE_KEY].uns[C.INPUT_KEY] = record
    return sdata
