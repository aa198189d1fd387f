"""HER2ST (Andersson et al. 2021) and the small fixtures cut from it."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from .. import _constants as C
from .._logging import logger
from .._settings import settings
from ._download import fetch
from ._registry import HER2ST_FILES, HER2ST_SHA256

HER2ST_REPO_URL = "https://github.com/almaan/her2st/raw/85df7411"
HER2ST_URL = f"{HER2ST_REPO_URL}/data"
# the evaluation's sections (EVAL.md), whose images comtip's data folder holds: the default of her2st()
HER2ST_IMAGED = ("C2", "C3", "C4", "C5", "C6")
HER2ST_SECTIONS = tuple(sorted(Path(f).name.split(".")[0] for f in HER2ST_FILES if f.startswith("ST-cnts/")))
# every section's H&E image, as named in comtip's her2st/ folder (patient A's are the repository's *_HE_small.jpg)
HER2ST_IMAGES = {Path(f).name.split("_", 1)[0]: f for f in sorted(HER2ST_FILES) if f.startswith("ST-imgs/")}
HER2ST_PITCH_UM = 200.0  # centre-to-centre distance of neighbouring spots of legacy ST


def _data_dir(data_dir: str | os.PathLike | None) -> Path:
    return Path(data_dir).expanduser() if data_dir is not None else settings.data_dir


def _remote(rel: str) -> str:
    """URL in almaan/her2st of a file of our layout."""
    if rel in HER2ST_FILES:
        return f"{HER2ST_REPO_URL}/{HER2ST_FILES[rel].remote}"
    folder, name = rel.split("/", 1)
    if folder == "ST-imgs":  # C2_5714_HE_BT_C2.jpg -> ST-imgs/C/C2/5714_HE_BT_C2.jpg
        section, slide = name.split("_", 1)
        return f"{HER2ST_URL}/ST-imgs/{section[0]}/{section}/{slide}"
    if folder == "ST-pat-lbl":
        return f"{HER2ST_URL}/ST-pat/lbl/{name}"
    return f"{HER2ST_URL}/{rel}"


def _her2st_file(root: Path, rel: str, *, download: bool) -> Path | None:
    """The file ``her2st/<rel>`` of the data folder; downloaded (and checked) when missing and ``download``."""
    path = root / "her2st" / rel
    if path.is_file():
        return path
    entry = HER2ST_FILES.get(rel)
    if not download or (entry is None and rel not in HER2ST_SHA256):
        return None
    return fetch(
        _remote(rel),
        path,
        known_hash=HER2ST_SHA256.get(rel),
        git_sha1=None if entry is None else entry.git_sha1,
        size=None if entry is None else entry.size,
    )


def _section_mpp(section: str, spots: pd.DataFrame) -> float:
    """µm per image pixel of a section: 0.688 for C2–C6, else fitted from the spots (pixels per 200 µm array step).

    The images are not all at one scale (patient A's are downscaled), so each section's own spot file gives it.
    """
    if section in HER2ST_IMAGED or len(spots) < 3:
        return C.HER2ST_MPP
    steps = []
    for ax in ("x", "y"):
        a = spots[ax].to_numpy(float)
        if np.ptp(a) > 0:
            steps.append(abs(np.polyfit(a, spots[f"pixel_{ax}"].to_numpy(float), 1)[0]))
    if not steps or not np.isfinite(steps).all() or min(steps) <= 0:
        return C.HER2ST_MPP
    return float(HER2ST_PITCH_UM / np.exp(np.mean(np.log(steps))))


def _labels(path: Path | None, spots: pd.DataFrame) -> pd.DataFrame | None:
    """Pathologist labels joined to spots on the array position (the label file's ``x, y`` rounded)."""
    if path is None:
        return None
    lbl = pd.read_csv(path, sep="\t").dropna(subset=["x", "y"])
    lbl.index = [f"{round(x)}x{round(y)}" for x, y in zip(lbl["x"], lbl["y"], strict=True)]
    lbl = lbl[~lbl.index.duplicated()]
    return pd.DataFrame({"label": pd.Categorical(lbl["label"].reindex(spots.index))}, index=spots.index)


def her2st(
    sections: Sequence[str] = HER2ST_IMAGED,
    *,
    data_dir: str | os.PathLike | None = None,
    images: bool | Sequence[str] = True,
    download: bool = True,
):
    """HER2-positive breast tumours, legacy Spatial Transcriptomics (Andersson et al. 2021).

    36 sections of 8 patients (A1–A6, B1–B6, C1–C6, D1–D6, E1–E3, F1–F3, G1–G3, H1–H3), each with raw counts
    (~15.7k genes), its spot file and its H&E image: 100 µm spots on a 200 µm pitch. C2–C6 (the default) are the
    sections of comtip's evaluation, at about 0.688 µm/px; the pixel size of the other sections is fitted from their
    spot files (patient A's images are the repository's downscaled ``*_HE_small.jpg``, about 0.92 µm/px). Files that
    are not in the data folder (comtip's shared folder holds the images of C2–C6 only, and no file of patient B) are
    downloaded from the public repository at commit 85df7411 and checked against its git blob SHA-1 (and SHA-256
    where known) before use. Pathologist labels are added as ``obs['label']`` where the source has them.

    Parameters
    ----------
    sections
        Sections to read, e.g. ``["C2", "C3"]``.
    data_dir
        Folder holding ``her2st/`` (layout of the public repository's ``data/`` folder); by default
        :attr:`comtip.settings.data_dir`.
    images
        Read each section's H&E image (downloaded when missing and ``download``); ``False`` reads counts only; a list
        of sections reads the images of those sections and the counts alone of the others (e.g. imaged training
        sections plus count-only sections for gene-side pretraining).
    download
        Download missing files from the public ``almaan/her2st`` repository (checked by their git blob SHA-1). With
        ``download=False`` a section whose image is missing is read without it (counts only).

    Returns
    -------
    SpatialData with, per section, image ``"{section}_he"``, shapes ``"{section}_spots"`` and one table
    ``"table"`` (see :func:`comtip.io.read_st`).

    Examples
    --------
    >>> sdata = ct.datasets.her2st(sections=["C2", "C3"])
    """
    from ..io import read_st
    from ..io._utils import combine_sections

    root = _data_dir(data_dir)
    if isinstance(sections, str):
        sections = [sections]
    unknown = [s for s in sections if s not in HER2ST_SECTIONS]
    if unknown:
        msg = f"Unknown HER2ST section(s) {unknown}; available: {', '.join(HER2ST_SECTIONS)}."
        raise ValueError(msg)
    if not isinstance(images, bool):
        images = [images] if isinstance(images, str) else list(images)
        stray = [s for s in images if s not in sections]
        if stray:
            msg = f"images={stray} names sections that are not read (sections={list(sections)}): add them to sections."
            raise ValueError(msg)
    parts = []
    for s in sections:
        counts = _her2st_file(root, f"ST-cnts/{s}.tsv.gz", download=download)
        spots = _her2st_file(root, f"ST-spotfiles/{s}_selection.tsv", download=download)
        if counts is None or spots is None:
            msg = (
                f"HER2ST section {s!r}: files missing under {root / 'her2st'} and download=False. "
                "Set data_dir= (or $COMTIP_DATA_DIR) to the folder holding her2st/, or allow the download."
            )
            raise FileNotFoundError(msg)
        image = None
        if images is True or (images is not False and s in images):
            local = sorted((root / "her2st" / "ST-imgs").glob(f"{s}_*.jpg"))
            if local:
                image = local[0]
            elif s in HER2ST_IMAGES:
                image = _her2st_file(root, HER2ST_IMAGES[s], download=download)
            if image is None:
                logger.info("HER2ST section %s: no image under %s (download=False): counts only", s, root / "her2st")
        lbl_path = _her2st_file(root, f"ST-pat-lbl/{s}_labeled_coordinates.tsv", download=download)
        from ..io._st import read_st_spots

        spot_df = read_st_spots(spots, section=s)
        one = read_st(
            counts, spot_df, image, section=s, mpp=_section_mpp(s, spot_df), spot_diameter_um=C.HER2ST_SPOT_DIAMETER_UM,
            obs=_labels(lbl_path, spot_df),
        )  # fmt: skip
        parts.append(_unpack(one, s))
    return combine_sections(parts)


def _unpack(sdata, section: str):
    """``(images, shapes, table, coordinate_system)`` of a one-section SpatialData, for :func:`combine_sections`."""
    table = sdata.tables[C.TABLE_KEY].copy()
    table.uns.pop("spatialdata_attrs", None)
    return dict(sdata.images), dict(sdata.shapes), table, section


def her2st_tiny(*, data_dir: str | os.PathLike | None = None):
    """A 7 x 7 window (49 spots, 256 genes) cut from HER2ST C2, with its H&E crop (≈ 1.376 µm/px).

    For tests and quick looks; section name ``"C2crop"``.

    Returns
    -------
    SpatialData with image ``"C2crop_he"``, shapes ``"C2crop_spots"`` and table ``"table"``.
    """
    from ..io import read_st

    root = _data_dir(data_dir) / "her2st_tiny"
    if not root.is_dir():
        msg = f"her2st_tiny not found under {root.parent}; set data_dir= or $COMTIP_DATA_DIR to comtip's data folder."
        raise FileNotFoundError(msg)
    meta = json.loads((root / "meta.json").read_text())
    spots = pd.read_csv(root / "spots.tsv", sep="\t", index_col=0)
    spots = spots.rename(columns={"array_x": "x", "array_y": "y"})
    return read_st(
        root / "counts.tsv.gz",
        spots,
        root / "C2_crop_HE.jpg",
        section="C2crop",
        mpp=float(meta["approx_um_per_px_crop"]),
        spot_diameter_um=float(meta["spot_diameter_um"]),
    )


def mouse_olfactory_bulb(
    sections: Sequence[str] = ("MOB1", "MOB2", "MOB3", "MOB4"), *, data_dir: str | os.PathLike | None = None
):
    """Mouse olfactory bulb, legacy ST, 4 sections (STUtility example data, MIT); 1,000 genes.

    Genes are Ensembl IDs mapped to mouse symbols and upper-cased (which matches most human orthologs).
    The physical scale is not stated by the source: the pixel size is derived from the 200 µm spot pitch
    (≈ 9.3 µm/px; the H&E images are 1905 x 1905 px), so tiles are coarse.

    Returns
    -------
    SpatialData with, per section, image ``"{section}_he"``, shapes ``"{section}_spots"`` and table ``"table"``.
    """
    from .._spatial import nearest_neighbour_spacing
    from ..io import read_st
    from ..io._st import read_st_spots
    from ..io._utils import combine_sections

    root = _data_dir(data_dir) / "mouse_olfactory_bulb"
    if not root.is_dir():
        msg = f"mouse_olfactory_bulb not found under {root.parent}; set data_dir= or $COMTIP_DATA_DIR."
        raise FileNotFoundError(msg)
    if isinstance(sections, str):
        sections = [sections]
    genes = pd.read_csv(root / "mouse_genes.tsv.gz", sep="\t", index_col=0)["gene_name"].to_dict()
    parts = []
    for s in sections:
        if not (root / f"{s}.tsv.gz").is_file():
            msg = f"Unknown mouse olfactory bulb section {s!r}; available: MOB1, MOB2, MOB3, MOB4."
            raise ValueError(msg)
        spots = read_st_spots(root / f"alignment_table_{s}.tsv", section=s)
        mpp = 200.0 / nearest_neighbour_spacing(spots[["pixel_x", "pixel_y"]].to_numpy(float))
        one = read_st(root / f"{s}.tsv.gz", spots, root / f"{s}.jpg", section=s, mpp=mpp, gene_names=genes)
        parts.append(_unpack(one, s))
    return combine_sections(parts)
