"""10x Visium (Space Ranger output folders) -> SpatialData in comtip's conventions, through spatialdata-io."""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from scipy import sparse

from .. import _constants as C
from .._logging import logger
from ._anndata import GENE_VAR_COLUMNS, check_spots_in_image, is_blank, rgb_array, visium_mpp
from ._utils import build_table, combine_sections, spot_circles

if TYPE_CHECKING:
    from spatialdata import SpatialData
    from spatialdata.transformations import BaseTransformation

COUNTS_FILE = "filtered_feature_bc_matrix.h5"


def _library_id(path: Path, dataset_id: str | None) -> str | None:
    """Name of the library: ``dataset_id``, else ``None`` (spatialdata-io infers it), else the folder's name.

    spatialdata-io infers it from ``<lib>_filtered_feature_bc_matrix.h5``; for Space Ranger's ``outs/`` the folder
    name is its parent's.
    """
    if dataset_id is not None:
        return dataset_id
    if any(p.name.endswith(f"_{COUNTS_FILE}") for p in path.iterdir()):
        return None
    name = path.resolve().parent.name if path.resolve().name == "outs" else path.resolve().name
    return re.sub(r"[^0-9A-Za-z_.-]", "_", name) or "visium"


def _feature_names(h5: Path, gene_ids: pd.Series) -> np.ndarray | None:
    """Feature names as written in the counts file (spatialdata-io makes duplicates unique with ``-1`` suffixes)."""
    import h5py

    try:
        with h5py.File(h5, "r") as f:
            ids = f["matrix/features/id"][:].astype(str)
            names = f["matrix/features/name"][:].astype(str)
    except (OSError, KeyError) as e:
        logger.debug("feature names not read from %s (%s)", h5, e)
        return None
    lookup = dict(zip(ids, names, strict=True))
    if len(lookup) != len(ids) or not gene_ids.isin(list(lookup)).all():
        return None
    return np.asarray([lookup[g] for g in gene_ids], dtype=object)


def _genes_for_symbols(names: np.ndarray, ids: np.ndarray | None) -> list[str]:
    """Names to harmonise: the feature name, or the human Ensembl ID where the name is not a known symbol."""
    from .._gene_text import gene_text_table, harmonize_symbols

    if ids is None:
        return list(names)
    known = set(gene_text_table().index)
    symbols = harmonize_symbols(list(names))
    return [
        n if (s in known or not str(i).upper().startswith("ENSG")) else i
        for n, s, i in zip(names, symbols, ids, strict=True)
    ]


def _to_um(transformation: BaseTransformation, mpp: float, axes: tuple[str, ...] = ("y", "x")) -> BaseTransformation:
    """``transformation`` (pixels -> full-resolution pixels) followed by full-resolution pixels -> µm."""
    from spatialdata.transformations import Identity, Scale, Sequence

    to_um = Scale([mpp, mpp], axes=axes)
    if isinstance(transformation, Identity):
        return to_um
    if isinstance(transformation, Scale):
        scale = dict(zip(transformation.axes, transformation.scale, strict=True))
        if set(scale) == set(axes):
            return Scale([scale[a] * mpp for a in axes], axes=axes)
    return Sequence([transformation, to_um])


def _image_from_io(data: Any, *, name: str, lib: str, mpp: float, skip_blank: bool) -> tuple[Any, float | None]:
    """A spatialdata-io image (``(c, y, x)``, a transformation to full-resolution pixels) in comtip's conventions.

    Returns the element (``None`` when ``skip_blank`` and the image is blank) and its size in full-resolution pixels
    per image pixel (``None`` when its transformation is not a plain isotropic scale).
    """
    from spatialdata.transformations import Scale, get_transformation, set_transformation

    from ._image import parse_image

    transformation = get_transformation(data, to_coordinate_system=lib)
    if skip_blank and is_blank(data.data[:3]):  # colour channels only: a placeholder may have an opaque alpha
        return None, None
    arr = rgb_array(data.data, element=name, channels_last=False)
    if isinstance(transformation, Scale) and np.allclose(transformation.scale, transformation.scale[0]):
        scale = float(transformation.scale[0])
        return parse_image(arr, coordinate_system=lib, mpp=scale * mpp), scale
    element = parse_image(arr, coordinate_system=lib, mpp=1.0)
    set_transformation(element, {lib: _to_um(transformation, mpp)}, set_all=True)
    return element, None


def visium(
    path: str | os.PathLike,
    *,
    dataset_id: str | None = None,
    fullres_image: str | os.PathLike | None = None,
    mpp: float | None = None,
    harmonize_genes: bool = True,
) -> SpatialData:
    """Read a 10x Visium Space Ranger output folder into comtip's SpatialData.

    The folder is read with :func:`spatialdata_io.visium` (``filtered_feature_bc_matrix.h5``,
    ``spatial/tissue_positions[_list].csv``, ``spatial/scalefactors_json.json``, the hires/lowres PNGs) and converted:
    the library gets one coordinate system in micrometres, only spots under the tissue are kept and the genes are
    harmonised to upper-case symbols.

    Parameters
    ----------
    path
        The Space Ranger output folder (``outs/``).
    dataset_id
        Name of the library (element prefix and coordinate system); by default the prefix of
        ``<id>_filtered_feature_bc_matrix.h5``, else the folder's name (its parent's for ``outs/``).
    fullres_image
        The full-resolution H&E given to Space Ranger (JPEG/PNG, or a TIFF/whole slide read with its own pyramid).
    mpp
        µm per full-resolution pixel; by default 55 µm / ``spot_diameter_fullres`` (Visium spots are 55 µm wide).
    harmonize_genes
        Map feature names (human Ensembl IDs where the name is not a symbol) to current upper-case HGNC symbols,
        summing duplicates; ``False`` keeps spatialdata-io's unique names.

    Returns
    -------
    SpatialData with image ``"{lib}_he"`` (the best available image: ``fullres_image``, else the hires PNG, else the
    lowres PNG; multiscale, lazy, RGB; level 0 maps to coordinate system ``lib`` in µm), the other PNGs as
    ``"{lib}_hires_image"`` / ``"{lib}_lowres_image"`` (same coordinate system), shapes ``"{lib}_spots"`` (circles at
    the in-tissue spots, geometry and ``radius`` in full-resolution pixels) and table ``"table"`` (raw counts in ``X``
    and ``layers['counts']``, ``obs`` ``spot`` (barcode), ``array_row``, ``array_col``, ``array_x``, ``array_y``,
    ``section``, ``region``, ``spot_id``; ``var['original_symbols']``, ``var['gene_ids']``).

    Examples
    --------
    >>> sdata = ct.io.visium("sample1/outs", fullres_image="sample1/he.tif")
    """
    import spatialdata_io
    from spatialdata.transformations import get_transformation

    path = Path(path)
    if not path.is_dir():
        msg = f"Space Ranger output folder not found: {str(path)!r}. Pass the folder that holds {COUNTS_FILE} and spatial/."
        raise FileNotFoundError(msg)
    lib_arg = _library_id(path, dataset_id)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*region_key.*categorical", category=UserWarning)
            raw = spatialdata_io.visium(path, dataset_id=lib_arg)
    except (OSError, KeyError, IndexError, ValueError, NameError, AssertionError) as e:  # all raised by spatialdata-io
        msg = (
            f"Could not read the Space Ranger folder {str(path)!r} with spatialdata_io.visium ({type(e).__name__}: {e}). "
            f"It needs {COUNTS_FILE} (or <id>_{COUNTS_FILE}), spatial/tissue_positions[_list].csv and "
            "spatial/scalefactors_json.json."
        )
        raise ValueError(msg) from e
    lib = lib_arg or next(iter(raw.shapes))
    io_table = raw.tables["table"]
    io_shapes = raw.shapes[lib]

    # spots: spatialdata-io's circles in full-resolution pixels (Identity to the library's coordinate system)
    diameter_px = float(2 * io_shapes["radius"].iloc[0])
    mpp = visium_mpp(mpp, diameter_px, name=f"Visium library {lib}")
    xy = np.asarray(io_table.obsm["spatial"], dtype=float)
    affine = get_transformation(io_shapes, to_coordinate_system=lib).to_affine_matrix(
        input_axes=("x", "y"), output_axes=("x", "y")
    )
    xy = xy @ np.asarray(affine)[:2, :2].T + np.asarray(affine)[:2, 2]
    keep = np.isfinite(xy).all(axis=1)
    if "in_tissue" in io_table.obs:
        keep &= io_table.obs["in_tissue"].to_numpy() == 1
    if (n_drop := int((~keep).sum())) > 0:
        logger.info("Visium library %s: %d spots outside the tissue or without a position dropped", lib, n_drop)
    if not keep.any():
        msg = f"Visium library {lib!r} ({path}) has no spot under the tissue (tissue_positions in_tissue == 1)."
        raise ValueError(msg)
    idx = np.flatnonzero(keep)
    xy = xy[idx]
    region = f"{lib}{C.SPOTS_SUFFIX}"
    shapes = {region: spot_circles(xy, C.VISIUM_SPOT_DIAMETER_UM / 2 / mpp, coordinate_system=lib, mpp=mpp)}

    # images: the best one is "{lib}_he"
    images: dict[str, Any] = {}
    he = f"{lib}{C.IMAGE_SUFFIX}"
    if fullres_image is not None:
        from ._image import image_element, level0_shape

        images[he], _ = image_element(Path(fullres_image), element=he, coordinate_system=lib, mpp=mpp)
        check_spots_in_image(xy, level0_shape(images[he]), element=he)
    for res in ("hires", "lowres"):
        key = f"{lib}_{res}_image"
        if key not in raw.images:
            continue
        name = key if he in images else he
        element, scale = _image_from_io(raw.images[key], name=name, lib=lib, mpp=mpp, skip_blank=True)
        if element is None:
            warnings.warn(
                f"The {res} image of Visium library {lib!r} is blank (one value everywhere, a placeholder?); left out.",
                UserWarning,
                stacklevel=2,
            )
            continue
        if name == he and scale is not None:
            h, w = raw.images[key].shape[-2:]
            check_spots_in_image(xy, (h * scale, w * scale), element=f"{res} image of {lib!r}")
        images[name] = element
    if he not in images:
        logger.info("Visium library %s: no image", lib)

    # table: raw counts of the in-tissue spots, genes as symbols
    obs = io_table.obs.iloc[idx]
    extra = pd.DataFrame(index=obs.index)
    for col in ("array_row", "array_col"):
        if col in obs:
            extra[col] = obs[col].astype(int).to_numpy()
    if {"array_row", "array_col"} <= set(extra.columns):
        extra["array_x"] = extra["array_col"]
        extra["array_y"] = extra["array_row"]
    var_extra = io_table.var[[c for c in GENE_VAR_COLUMNS if c in io_table.var.columns]].astype(str)
    ids = io_table.var["gene_ids"].astype(str).to_numpy() if "gene_ids" in io_table.var else None
    original = io_table.var_names.astype(str).to_numpy()
    if harmonize_genes:
        names = _feature_names(path / _counts_file(path, lib), io_table.var["gene_ids"]) if ids is not None else None
        original = names if names is not None else original
        genes = _genes_for_symbols(original, ids)
    else:
        genes = list(original)
    X = sparse.csr_matrix(io_table.X[idx], dtype=np.float32)
    table = build_table(
        X,
        spot_names=io_table.obs_names[idx].to_numpy(),
        genes=genes,
        section=lib,
        region=region,
        obs=extra,
        harmonize=harmonize_genes,
        original_names=list(original),
        var=var_extra,
    )
    attrs = {k: v for k, v in raw.attrs.items() if k.startswith("spatialdata_io")}
    sdata = combine_sections([(images, shapes, table, lib)], attrs=attrs)
    logger.info(
        "Visium library %s: %d spots, %d genes, images %s, %.4g µm/px",
        lib,
        table.n_obs,
        table.n_vars,
        list(images),
        mpp,
    )
    return sdata


def _counts_file(path: Path, lib: str) -> str:
    prefixed = f"{lib}_{COUNTS_FILE}"
    return prefixed if (path / prefixed).is_file() else COUNTS_FILE
