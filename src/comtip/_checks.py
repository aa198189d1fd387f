"""Validation of user data at the public entry points, run before any work so that bad input never half-writes.

Each check raises (or warns) with a message that names the element, the key and the fix. They only read.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import numpy as np
from scipy import sparse

from . import _constants as C

if TYPE_CHECKING:
    from anndata import AnnData

#: nearest-neighbour spot spacing (µm) outside which a pixel size is suspect: legacy ST has a 200 µm pitch and
#: Visium 100 µm, so a pixel size off by 10x puts the spacing at 10-20 µm or 1-2 mm
SPOT_SPACING_UM = (25.0, 800.0)


def _dups(index) -> list[str]:
    return [str(v) for v in index[index.duplicated()].unique()[:5]]


def check_counts(
    X, *, element: str = "table", fix: str = "pass layer= with the raw UMI counts", stacklevel: int = 3
) -> None:
    """Refuse NaN or negative counts; warn on non-integer counts (normalised data passed as counts?).

    Parameters
    ----------
    X
        Spots x genes counts (sparse or dense).
    element
        How to name the counts in messages (e.g. ``"table 'table' (.layers['counts'])"``).
    fix
        What the user can do, ending the messages.
    stacklevel
        Of the non-integer warning (as :func:`warnings.warn`'s, counted from the caller of this function + 1).
    """
    data = X.data if sparse.issparse(X) else np.asarray(X).ravel()
    if data.size == 0:
        return
    if not np.isfinite(data).all():
        msg = (
            f"Counts of {element} contain NaN or infinite values ({int((~np.isfinite(data)).sum())} entries); comtip "
            f"needs raw UMI counts: fix or drop those spots, or {fix}."
        )
        raise ValueError(msg)
    if (data < 0).any():
        msg = (
            f"Counts of {element} contain negative values ({int((data < 0).sum())} entries), so they are not raw counts "
            f"(scaled or centred data?): {fix}."
        )
        raise ValueError(msg)
    head = data[: min(data.size, 100_000)]
    if not np.allclose(head, np.round(head)):
        warnings.warn(
            f"Counts of {element} are not integers: is this normalised data? comtip normalises raw counts itself "
            f"(to 1e4 per spot, then log1p): {fix} if you have them.",
            UserWarning,
            stacklevel=stacklevel,
        )


def check_names(adata: AnnData, *, element: str, genes: bool = True) -> None:
    """Refuse duplicated spot names (``obs_names``) and, with ``genes``, duplicated gene names (``var_names``).

    Parameters
    ----------
    adata
        The table.
    element
        How to name the table in messages: ``"Table '<key>'"`` for a SpatialData table, ``"The AnnData"`` for an
        AnnData of the user's.
    genes
        Check ``var_names`` as well.
    """
    in_sdata = element.startswith("Table")
    name = "table" if in_sdata else "adata"
    if adata.obs_names.has_duplicates:
        note = (
            " (a SpatialData table stays linked to its shapes through its region and instance columns, not its "
            "obs_names)"
            if in_sdata
            else ""
        )
        msg = (
            f"{element} has duplicated spot names (obs_names) {_dups(adata.obs_names)}; comtip matches spots to their "
            f"tiles and results by name. Make them unique first: {name}.obs_names_make_unique(){note}."
        )
        raise ValueError(msg)
    if genes and adata.var_names.has_duplicates:
        msg = (
            f"{element} has duplicated gene names (var_names) {_dups(adata.var_names)}, so a gene's expression is "
            "ambiguous. Sum the duplicated columns into one (comtip's readers do so with harmonize_genes=True), or "
            f"make them unique: {name}.var_names_make_unique()."
        )
        raise ValueError(msg)


def check_has_spots(adata: AnnData, *, element: str) -> None:
    """Refuse a table without any spot."""
    if adata.n_obs == 0:
        msg = f"{element} has no spots (0 rows): there is nothing to work on. Check how the table was subset or read."
        raise ValueError(msg)


def counts_matrix(adata: AnnData, layer: str | None) -> tuple[sparse.csr_matrix, bool]:
    """The matrix comtip normalises and whether it holds counts (False: already log-normalised).

    ``.layers[layer]``, else ``.layers['counts']``, else ``.X``; ``X`` holds counts unless
    ``.uns['comtip_input']['x_is_counts']`` says otherwise (see :func:`expression_source`).
    """
    info = adata.uns.get(C.INPUT_KEY, {})
    if layer is not None:
        if layer not in adata.layers:
            msg = (
                f"Layer {layer!r} not found (layers: {list(adata.layers) or 'none'}). Pass layer= with the raw counts."
            )
            raise KeyError(msg)
        return sparse.csr_matrix(adata.layers[layer]), True
    if C.COUNTS_LAYER in adata.layers:
        return sparse.csr_matrix(adata.layers[C.COUNTS_LAYER]), True
    return sparse.csr_matrix(adata.X), bool(info.get("x_is_counts", True))


def expression_source(adata: AnnData, layer: str | None) -> str:
    """Where comtip reads a table's expression from: ``.layers[layer]``, ``.layers['counts']`` or ``.X``."""
    if layer is not None:
        return f".layers[{layer!r}]"
    if C.COUNTS_LAYER in adata.layers:
        return f".layers[{C.COUNTS_LAYER!r}]"
    return ".X"


def check_expression(adata: AnnData, *, layer: str | None, element: str) -> None:
    """Refuse NaN or negative counts (and warn on non-integer ones) where comtip will read raw counts.

    A table whose ``.uns['comtip_input']['x_is_counts']`` is False (log-normalised ``X`` from
    :func:`comtip.io.from_anndata`) is only checked for NaN.

    Parameters
    ----------
    adata
        The table.
    layer
        The raw-count layer the caller was given (``None``: ``layers['counts']``, else ``X``).
    element
        How to name the table in messages.
    """
    if layer is None and C.COUNTS_LAYER not in adata.layers and adata.X is None:
        msg = (
            f"{element} has no expression (X is empty and there is no layers[{C.COUNTS_LAYER!r}]), e.g. an image-only "
            "slide. Pass layer= with the raw counts, or use data with measured expression."
        )
        raise ValueError(msg)
    X, is_counts = counts_matrix(adata, layer)
    where = f"{element[:1].lower()}{element[1:]} ({expression_source(adata, layer)})"  # mid-sentence
    if is_counts:
        check_counts(X, element=where)
        return
    data = X.data if sparse.issparse(X) else np.asarray(X).ravel()
    if data.size and not np.isfinite(data).all():
        msg = f"Expression of {where} contains NaN or infinite values; fix or drop those spots, or pass layer= with raw counts."
        raise ValueError(msg)


def check_image_pixels(image, *, key: str, warn_rgba: bool = True) -> None:
    """Refuse image elements that are not 8-bit RGB(A); warn that RGBA loses its alpha channel.

    Parameters
    ----------
    image
        A spatialdata image element (``DataArray`` or multiscale ``DataTree``).
    key
        Its name in ``sdata.images``.
    warn_rgba
        Warn for 4 channels (``False``: accept them silently, e.g. when tiles were made already).
    """
    from ._images import level_arrays

    arr = level_arrays(image)[0]
    n, dtype = int(arr.shape[0]), np.dtype(arr.dtype)
    if n < 3 or n > 4:
        msg = (
            f"Image {key!r} has {n} channel(s); comtip reads RGB H&E images (3 channels, or 4 whose alpha is dropped). "
            f"Replace sdata.images[{key!r}] with the RGB scan (e.g. Image2DModel.parse(rgb, dims=('c', 'y', 'x')))."
        )
        raise ValueError(msg)
    if dtype != np.uint8:
        msg = (
            f"Image {key!r} has pixel type {dtype}; comtip reads 8-bit RGB (uint8, 0-255). Convert it first, e.g. "
            "(img * 255).round().astype('uint8') for floats in [0, 1], or img // 257 for 16-bit."
        )
        raise ValueError(msg)
    if n == 4 and warn_rgba:
        warnings.warn(
            f"Image {key!r} has 4 channels (RGBA?); comtip uses the first 3 as RGB and drops the 4th.",
            UserWarning,
            stacklevel=3,
        )


def check_spot_spacing(spacing_um: float, *, region: str, cs: str, mpp: float | None) -> None:
    """Warn when neighbouring spots are implausibly far apart or close in µm (a pixel size off by ~10x).

    Parameters
    ----------
    spacing_um
        Median nearest-neighbour distance of the spots, in µm (``nan`` with fewer than 2 spots: no check).
    region
        The spots element.
    cs
        The coordinate system the spacing was measured in.
    mpp
        The ``mpp=`` the caller was given, if any.
    """
    lo, hi = SPOT_SPACING_UM
    if not np.isfinite(spacing_um) or lo <= spacing_um <= hi:
        return
    source = f"mpp={mpp}" if mpp is not None else f"the transformations of the spots and image to {cs!r}"
    warnings.warn(
        f"Spots {region!r} are {spacing_um:.4g} µm apart (nearest neighbours), far from the 100 µm (Visium) or "
        f"200 µm (legacy ST) pitch of spot-based data: is the pixel size off (e.g. by 10x)? Check {source}; tiles "
        "will have the wrong physical size. "
        "If the spacing is right (e.g. a dense ct.pp.grid_spots grid), ignore this warning.",
        UserWarning,
        stacklevel=3,
    )
