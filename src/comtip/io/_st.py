"""Legacy Spatial Transcriptomics sections (HER2ST, STUtility examples) -> SpatialData."""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import sparse

from .. import _constants as C
from .._checks import check_counts
from .._logging import logger
from .._spatial import nearest_neighbour_spacing
from ._utils import build_table, combine_sections, spot_circles


def read_st_counts(path: str | os.PathLike, *, section: str) -> pd.DataFrame:
    """Spots x genes count table of a legacy ST section (``"<x>x<y>"`` rows, gene columns)."""
    path = Path(path)
    if not path.is_file():
        msg = f"Counts of section {section!r} not found: {str(path)!r}."
        raise FileNotFoundError(msg)
    df = pd.read_csv(path, sep="\t", index_col=0)
    df.index = df.index.astype(str)
    return df


def read_st_spots(path: str | os.PathLike, *, section: str) -> pd.DataFrame:
    """Spot file of a legacy ST section: ``x y [new_x new_y] pixel_x pixel_y [selected]``, indexed ``"<x>x<y>"``."""
    path = Path(path)
    if not path.is_file():
        msg = f"Spot file of section {section!r} not found: {str(path)!r}."
        raise FileNotFoundError(msg)
    df = pd.read_csv(path, sep="\t")
    need = {"x", "y", "pixel_x", "pixel_y"}
    if not need <= set(df.columns):
        msg = (
            f"Spot file of section {section!r} ({path.name}) lacks columns {sorted(need - set(df.columns))}; "
            "a legacy ST spot file has x, y, pixel_x, pixel_y (and optionally new_x, new_y, selected)."
        )
        raise ValueError(msg)
    if "selected" in df.columns:
        df = df[df["selected"].astype(int) == 1]
    df.index = [f"{int(x)}x{int(y)}" for x, y in zip(df["x"], df["y"], strict=True)]
    return df


def read_st(
    counts: str | os.PathLike | pd.DataFrame,
    spots: str | os.PathLike | pd.DataFrame,
    image: str | os.PathLike | None = None,
    *,
    section: str,
    mpp: float | None,
    spot_diameter_um: float = C.HER2ST_SPOT_DIAMETER_UM,
    spot_pitch_um: float = 200.0,
    harmonize_genes: bool = True,
    gene_names: Mapping[str, str] | None = None,
    obs: pd.DataFrame | None = None,
):
    """Read a legacy Spatial Transcriptomics section into SpatialData.

    The section gets its own coordinate system, named ``section``, in micrometres.

    Parameters
    ----------
    counts
        Spots x genes table of raw UMI counts (``.tsv[.gz]`` path or DataFrame); rows ``"<x>x<y>"``.
    spots
        Spot file (``x y pixel_x pixel_y`` [``selected``]) with positions in full-resolution image pixels.
    image
        The H&E image (JPEG/PNG/TIFF). ``None`` for a count-only section.
    section
        Name of the section (prefix of the element names and name of its coordinate system).
    mpp
        Pixel size of the full-resolution image in µm per pixel. Required; when it is ``None`` the error
        reports the value estimated from the spot spacing.
    spot_diameter_um
        Physical diameter of a spot (100 µm for legacy ST, 55 µm for Visium).
    spot_pitch_um
        Centre-to-centre distance of neighbouring spots, used to check ``mpp`` (200 µm for legacy ST).
    harmonize_genes
        Upper-case gene symbols and map old ones to current HGNC symbols (summing duplicates).
    gene_names
        Optional ``{name in counts: symbol}`` applied before harmonisation (e.g. Ensembl IDs to symbols).
    obs
        Extra per-spot columns, indexed like ``counts`` (e.g. pathologist labels).

    Returns
    -------
    SpatialData with image ``"{section}_he"`` (multiscale, lazy; absent without ``image``), shapes
    ``"{section}_spots"`` (circles, radius in pixels) and table ``"table"`` (raw counts in ``X`` and
    ``layers['counts']``, ``obs['section']``, ``obs['region']``, ``var['original_symbols']``).

    Raises
    ------
    FileNotFoundError
        A missing counts, spot or image file.
    ValueError
        Empty counts, duplicated spots, non-numeric, NaN or negative counts, spots without a position, an
        unreadable or single-channel image, a missing or non-positive ``mpp``.

    Warns
    -----
    UserWarning
        ``mpp`` far from the one the spot spacing suggests (e.g. off by 10x); non-integer counts; spots outside
        the image; an RGBA image (alpha dropped).

    Examples
    --------
    >>> sdata = ct.io.read_st("C2.tsv.gz", "C2_selection.tsv", "C2_HE.jpg", section="C2", mpp=0.688)
    """
    cnt = counts if isinstance(counts, pd.DataFrame) else read_st_counts(counts, section=section)
    spt = spots if isinstance(spots, pd.DataFrame) else read_st_spots(spots, section=section)
    cnt = _check_counts(cnt, section=section)
    if spt.index.has_duplicates:
        msg = f"Spot file of section {section!r} has duplicated spots {list(spt.index[spt.index.duplicated()][:5])}; keep one row per spot."
        raise ValueError(msg)

    xy = spt[["pixel_x", "pixel_y"]].apply(pd.to_numeric, errors="coerce").to_numpy(float)
    if not np.isfinite(xy).all():
        bad = list(spt.index[~np.isfinite(xy).all(axis=1)][:5])
        msg = (
            f"Spot file of section {section!r} has spots without a valid position (pixel_x, pixel_y) {bad}; "
            "fix or drop those rows."
        )
        raise ValueError(msg)
    spacing_px = nearest_neighbour_spacing(xy)
    estimate = spot_pitch_um / spacing_px if np.isfinite(spacing_px) and spacing_px > 0 else float("nan")
    if mpp is None:
        hint = f" The spot spacing suggests about {estimate:.3f} µm/px." if np.isfinite(estimate) else ""
        msg = f"Pixel size missing for section {section!r}: pass mpp= (µm per full-resolution pixel).{hint}"
        raise ValueError(msg)
    if not (np.isfinite(mpp) and mpp > 0):
        msg = f"Pixel size of section {section!r} must be a positive number of µm per pixel, got {mpp!r}."
        raise ValueError(msg)
    if np.isfinite(estimate) and not (0.5 < mpp / estimate < 2.0):
        warnings.warn(
            f"Section {section!r}: mpp={mpp} µm/px disagrees with the spot spacing, which suggests {estimate:.3f} µm/px "
            f"(for a {spot_pitch_um:g} µm spot pitch). Check the pixel size: tiles will have the wrong physical size.",
            UserWarning,
            stacklevel=2,
        )

    common = spt.index.intersection(cnt.index, sort=False)
    if len(common) == 0:
        msg = (
            f"Spot file and counts of section {section!r} do not match: none of the {len(spt)} spots "
            f"(e.g. {list(spt.index[:3])}) is a row of the counts (e.g. {list(cnt.index[:3])}). "
            "Rows must be named '<x>x<y>' after the spot file's x and y columns."
        )
        raise ValueError(msg)
    n_no_counts, n_no_spot = len(spt) - len(common), len(cnt) - len(common)
    if n_no_counts or n_no_spot:
        logger.info(
            "section %s: %d spots without counts and %d count rows without a spot dropped",
            section,
            n_no_counts,
            n_no_spot,
        )
    spt = spt.loc[common]
    cnt = cnt.loc[common]

    images = {}
    if image is not None:
        from ._image import parse_image, read_image_lazy

        arr = read_image_lazy(image, element=f"{section}{C.IMAGE_SUFFIX}")
        from ._anndata import check_spots_in_image

        check_spots_in_image(
            spt[["pixel_x", "pixel_y"]].to_numpy(float), arr.shape[1:], element=f"{section}{C.IMAGE_SUFFIX}"
        )
        images[f"{section}{C.IMAGE_SUFFIX}"] = parse_image(arr, coordinate_system=section, mpp=mpp)

    region = f"{section}{C.SPOTS_SUFFIX}"
    radius_px = spot_diameter_um / 2 / mpp
    shapes = {
        region: spot_circles(spt[["pixel_x", "pixel_y"]].to_numpy(float), radius_px, coordinate_system=section, mpp=mpp)
    }

    extra = pd.DataFrame(
        {"array_x": spt["x"].astype(int).to_numpy(), "array_y": spt["y"].astype(int).to_numpy()}, index=spt.index
    )
    if obs is not None:
        extra = extra.join(obs.reindex(spt.index))
    genes = cnt.columns.astype(str)
    if gene_names is not None:
        genes = pd.Index([gene_names.get(g, g) for g in genes])
    table = build_table(
        sparse.csr_matrix(cnt.to_numpy(dtype=np.float32)),
        spot_names=spt.index.to_numpy(),
        genes=genes,
        section=section,
        region=region,
        obs=extra,
        harmonize=harmonize_genes,
        original_names=cnt.columns.astype(str),
    )
    return combine_sections([(images, shapes, table, section)])


def _check_counts(cnt: pd.DataFrame, *, section: str) -> pd.DataFrame:
    if cnt.shape[0] == 0 or cnt.shape[1] == 0:
        msg = (
            f"Counts of section {section!r} are empty ({cnt.shape[0]} spots x {cnt.shape[1]} genes): pass the "
            "section's table of raw UMI counts (spots x genes), and check the file or how it was subset."
        )
        raise ValueError(msg)
    if cnt.index.has_duplicates:
        dup = list(cnt.index[cnt.index.duplicated()][:5])
        msg = f"Counts of section {section!r} have duplicated spot rows {dup}; keep one row per spot."
        raise ValueError(msg)
    # by position: with duplicated gene columns, cnt[name] is a DataFrame
    non_numeric = [str(c) for c, t in zip(cnt.columns, cnt.dtypes, strict=True) if not pd.api.types.is_numeric_dtype(t)]
    if non_numeric:
        msg = f"Counts of section {section!r} have non-numeric columns {non_numeric[:5]}; the table must hold UMI counts only."
        raise ValueError(msg)
    check_counts(cnt.to_numpy(dtype=np.float32), element=f"section {section!r}", fix="pass the raw UMI count table")
    return cnt
