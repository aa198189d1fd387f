"""HEST-1k samples (``st/``, ``metadata/``, ``patches/``, ``wsis/``) -> one SpatialData with its spot tiles.

HEST-1k (Jaume et al. 2024, https://huggingface.co/datasets/MahmoodLab/hest) stores each sample as

- ``st/{id}.h5ad``: AnnData of raw counts; ``obsm['spatial']`` holds the spot centres in full-resolution WSI pixels;
- ``metadata/{id}.json``: ``pixel_size_um_estimated`` / ``pixel_size_um_embedded`` (µm per WSI pixel),
  ``spot_diameter`` and ``inter_spot_dist`` (µm), ``st_technology``, ``species``, ``organ``, ...;
- ``patches/{id}.h5``: ``img`` (N, 224, 224, 3) uint8 patches at 0.5 µm/px centred on the spots, ``barcode`` (N, 1)
  bytes (the spot's ``obs_name``) and ``coords`` (N, 2) int, the patch's top-left corner in level-0 WSI pixels
  (HEST's ``dump_patches`` writes ``spot centre - patch footprint // 2``);
- ``wsis/{id}.tif``: the H&E whole-slide image, pyramidal TIFF.

The patches become comtip tiles without being copied: the ``N`` patches of a sample are the cells of a lazy mosaic
image (``"{id}_patches"``, patch ``i`` at row ``i // cols``, column ``i % cols``) whose chunks are the patches, read
from the HDF5 file when a tile is read; the tiles table points into that mosaic. Its geometry (the box the tile covers
around the spot on the slide) lives in the sample's coordinate system, as ``ct.pp.spot_tiles`` writes it.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .. import _constants as C
from .._logging import logger
from ._wsi import _dask_level, _LevelReader

if TYPE_CHECKING:
    from spatialdata import SpatialData

HEST_REPO_ID = "MahmoodLab/hest"
HEST_PATCH_MPP = 0.5  # µm per pixel of HEST's patches (dump_patches' target_pixel_size)
MPP_KEYS = ("pixel_size_um_estimated", "pixel_size_um_embedded")  # µm per WSI pixel, in order of preference
PATCHES_SUFFIX = "_patches"  # mosaic image element and coordinate system of a sample's patches
IMG_KEYS = ("img", "imgs", "images")
BARCODE_KEYS = ("barcode", "barcodes")
PATCH_MPP_ATTRS = ("pixel_size", "mpp", "dst_pixel_size", "target_pixel_size", "patch_mpp")
MAX_UNMATCHED = 0.1  # share of patch barcodes absent from the st table above which the pair is refused
FOLDERS = {"st": ".h5ad", "metadata": ".json", "patches": ".h5", "wsis": ".tif"}


def _fix(sample: str, *folders: str) -> str:
    patterns = ", ".join(repr(f"{folder}/{sample}{FOLDERS[folder]}") for folder in folders)
    return (
        f"download it with huggingface_hub.snapshot_download(repo_id={HEST_REPO_ID!r}, repo_type='dataset', "
        f"local_dir=root, allow_patterns=[{patterns}]) (see the docs page 'Pretraining data from HEST-1k')"
    )


@dataclass
class _PatchFile:
    """What ``patches/{id}.h5`` holds (read once, from its header and its small datasets)."""

    path: Path
    img_key: str
    n: int
    size: int
    barcodes: np.ndarray
    coords: np.ndarray | None
    mpp: float


@dataclass
class _Sample:
    sample: str
    st: Path
    meta: dict[str, Any]
    mpp: float
    patches: _PatchFile | None = None
    wsi: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)


# --- the lazy mosaic of a sample's patches -------------------------------------------------------------------------
class _PatchMosaicReader(_LevelReader):
    """``(3, rows * P, cols * P)`` uint8 view of ``N`` patches laid out row by row; empty cells are white.

    The HDF5 file is opened on the first read in each process (never shared across a fork).
    """

    def __init__(self, path: Path, *, img_key: str, n: int, size: int, cols: int):
        rows = max(math.ceil(n / cols), 1)
        super().__init__(path, 0, (rows * size, cols * size))
        self.img_key = img_key
        self.n = int(n)
        self.size = int(size)
        self.cols = int(cols)

    def _open(self) -> Any:
        import h5py

        f = h5py.File(self.path, "r")
        return f, f[self.img_key]

    def _read(self, handle: Any, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        _, img = handle
        p, cols = self.size, self.cols
        out = np.full((y1 - y0, x1 - x0, 3), 255, dtype=np.uint8)
        c0, c1 = x0 // p, (x1 - 1) // p
        for r in range(y0 // p, (y1 - 1) // p + 1):
            i0, i1 = r * cols + c0, min(r * cols + c1 + 1, self.n)
            if i0 >= self.n:
                break
            block = np.asarray(img[i0:i1])  # the patches of this row the window touches, in one read
            ya, yb = max(y0, r * p), min(y1, (r + 1) * p)
            for k in range(i1 - i0):
                c = c0 + k
                xa, xb = max(x0, c * p), min(x1, (c + 1) * p)
                out[ya - y0 : yb - y0, xa - x0 : xb - x0] = block[
                    k, ya - r * p : yb - r * p, xa - c * p : xb - c * p, :3
                ]
        return out


def mosaic_columns(n: int) -> int:
    """Columns of the mosaic of ``n`` patches (nearly square)."""
    return max(math.ceil(math.sqrt(n)), 1)


def _mosaic_element(pf: _PatchFile, *, sample: str):
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import Scale

    reader = _PatchMosaicReader(pf.path, img_key=pf.img_key, n=pf.n, size=pf.size, cols=mosaic_columns(pf.n))
    arr = _dask_level(reader, chunks=(3, pf.size, pf.size), backend="hest-patches")
    return Image2DModel.parse(
        arr,
        dims=("c", "y", "x"),
        c_coords=["r", "g", "b"],
        transformations={f"{sample}{PATCHES_SUFFIX}": Scale([pf.mpp, pf.mpp], axes=("y", "x"))},
    )


# --- files --------------------------------------------------------------------------------------------------------
def _available(root: Path) -> list[str]:
    found: set[str] = set()
    for folder, suffix in FOLDERS.items():
        d = root / folder
        if d.is_dir():
            found.update(p.name[: -len(suffix)] for p in d.iterdir() if p.name.endswith(suffix))
    return sorted(found)


def _read_patch_file(path: Path, *, sample: str, patch_mpp: float | None) -> _PatchFile:
    import h5py

    try:
        f = h5py.File(path, "r")
    except OSError as e:
        msg = f"Patches of HEST sample {sample!r} could not be read: {str(path)!r} ({e}). Download the file again."
        raise ValueError(msg) from e
    with f:
        img_key = next((k for k in IMG_KEYS if k in f), None)
        bc_key = next((k for k in BARCODE_KEYS if k in f), None)
        if img_key is None or bc_key is None:
            msg = (
                f"Patches of HEST sample {sample!r} ({path.name}) hold datasets {sorted(f)}; a HEST patch file has "
                f"'img' (N, P, P, 3) and 'barcode' (N, 1). Download patches/{sample}.h5 again."
            )
            raise ValueError(msg)
        img = f[img_key]
        shape, dtype = img.shape, img.dtype
        if len(shape) != 4 or shape[1] != shape[2] or shape[3] < 3 or dtype != np.uint8:
            msg = (
                f"Patches of HEST sample {sample!r} ({path.name}): {img_key!r} has shape {shape} and type {dtype}; "
                "expected (N, P, P, 3) uint8 RGB patches."
            )
            raise ValueError(msg)
        raw = np.asarray(f[bc_key][()]).reshape(len(f[bc_key]), -1)[:, 0]
        barcodes = np.array([b.decode() if isinstance(b, bytes) else str(b) for b in raw], dtype=object)
        if len(barcodes) != shape[0]:
            msg = (
                f"Patches of HEST sample {sample!r} ({path.name}): {len(barcodes)} barcodes for {shape[0]} patches. "
                f"The file is damaged; download patches/{sample}.h5 again."
            )
            raise ValueError(msg)
        coords = np.asarray(f["coords"][()], dtype=float).reshape(shape[0], -1)[:, :2] if "coords" in f else None
        mpp = patch_mpp
        if mpp is None:
            for obj in (img, f):
                key = next((k for k in PATCH_MPP_ATTRS if k in obj.attrs), None)
                if key is not None:
                    mpp = float(np.asarray(obj.attrs[key]).ravel()[0])
                    break
        mpp = HEST_PATCH_MPP if mpp is None else float(mpp)
    if not (np.isfinite(mpp) and mpp > 0):
        msg = f"Pixel size of the patches of HEST sample {sample!r} must be a positive number of µm/px, got {mpp!r}."
        raise ValueError(msg)
    return _PatchFile(path, img_key, int(shape[0]), int(shape[1]), barcodes, coords, mpp)


def _sample_files(
    root: Path, sample: str, *, patches: bool, wsi: bool, patch_mpp: float | None, available: list[str]
) -> _Sample:
    st = root / "st" / f"{sample}.h5ad"
    meta_path = root / "metadata" / f"{sample}.json"
    if sample not in available:
        shown = ", ".join(available[:20]) + (f", ... ({len(available)} in all)" if len(available) > 20 else "")
        msg = (
            f"Unknown HEST sample {sample!r}: no file of it under {str(root)!r} (samples there: {shown or 'none'}). "
            f"Check the id (e.g. 'TENX95'), or {_fix(sample, 'st', 'metadata', 'patches')}."
        )
        raise ValueError(msg)
    for path, folder in ((st, "st"), (meta_path, "metadata")):
        if not path.is_file():
            msg = (
                f"HEST sample {sample!r}: {folder}/{path.name} is missing under {str(root)!r}; {_fix(sample, folder)}."
            )
            raise FileNotFoundError(msg)
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as e:
        msg = f"HEST sample {sample!r}: metadata/{meta_path.name} is not valid JSON ({e}); {_fix(sample, 'metadata')}."
        raise ValueError(msg) from e
    mpp = None
    for key in MPP_KEYS:
        value = meta.get(key)
        try:
            value = float(value)
        except (TypeError, ValueError):
            continue
        if np.isfinite(value) and value > 0:
            mpp = value
            break
    if mpp is None:
        msg = (
            f"HEST sample {sample!r}: metadata/{meta_path.name} states no pixel size ({' or '.join(MPP_KEYS)}, µm per "
            "WSI pixel). Add one to the file, or download it again."
        )
        raise ValueError(msg)
    out = _Sample(sample, st, meta, mpp)
    patch_path = root / "patches" / f"{sample}.h5"
    if patches and patch_path.is_file():
        out.patches = _read_patch_file(patch_path, sample=sample, patch_mpp=patch_mpp)
    if wsi:
        candidates = [root / "wsis" / f"{sample}{s}" for s in (".tif", ".tiff")]
        out.wsi = next((p for p in candidates if p.is_file()), None)
        if out.wsi is None:
            msg = f"HEST sample {sample!r}: wsis/{sample}.tif is missing under {str(root)!r} (wsi=True); {_fix(sample, 'wsis')}."
            raise FileNotFoundError(msg)
    if out.patches is None and out.wsi is None:
        why = "patches=False" if not patches else f"patches/{sample}.h5 is missing"
        msg = (
            f"HEST sample {sample!r} has no image to tile: {why} and wsi=False. Pass wsi=True to tile the whole-slide "
            f"image (wsis/{sample}.tif), or {_fix(sample, 'patches')}."
        )
        raise FileNotFoundError(msg)
    return out


# --- one sample ---------------------------------------------------------------------------------------------------
def _spot_diameter_um(meta: dict[str, Any], spacing_um: float) -> float:
    """The spot diameter stated by the metadata when it fits the spot spacing, else the spacing (pooled square bins)."""
    try:
        d = float(meta.get("spot_diameter"))
    except (TypeError, ValueError):
        d = float("nan")
    if not np.isfinite(spacing_um):
        return d if np.isfinite(d) and d > 0 else C.VISIUM_SPOT_DIAMETER_UM
    if np.isfinite(d) and 0.2 * spacing_um <= d <= 1.5 * spacing_um:
        return d
    # Xenium and Visium HD samples are pooled into square bins: no stated diameter, or the 2 µm bin of the chip
    return spacing_um


def _check_coords(pf: _PatchFile, centres: np.ndarray, *, sample: str, footprint_px: float) -> None:
    """Warn when the patches were not cut around the spots (top-left corner or centre convention)."""
    if pf.coords is None or not len(centres):
        return
    ok = np.isfinite(centres).all(axis=1)
    if not ok.any():
        return
    topleft = np.median(np.linalg.norm(pf.coords[ok] + footprint_px / 2 - centres[ok], axis=1))
    centre = np.median(np.linalg.norm(pf.coords[ok] - centres[ok], axis=1))
    if min(topleft, centre) > footprint_px / 4:
        warnings.warn(
            f"HEST sample {sample!r}: the patches' coords lie {topleft:.0f} px (median) from where their spots are "
            f"(patch footprint {footprint_px:.0f} WSI px): patches/{sample}.h5 and st/{sample}.h5ad may come from "
            "different HEST versions. Download both again if the tiles look misplaced.",
            UserWarning,
            stacklevel=4,
        )


def _patch_tiles(one, s: _Sample, adata, *, region: str):
    """The tiles frame of a sample's patches (rows of matched spots) and the mosaic image element."""
    import geopandas as gpd
    from shapely import box

    from ..pp._tiles import TILE_COLUMNS

    pf = s.patches
    table = one.tables[C.TABLE_KEY]
    bc = pd.Index(pf.barcodes)
    if bc.has_duplicates:
        logger.warning(
            "HEST sample %s: %d duplicated patch barcodes; the first patch of each is used",
            s.sample,
            int(bc.duplicated().sum()),
        )
    known = bc.isin(adata.obs_names)
    n_unknown = int((~known).sum())
    if n_unknown and (known.sum() == 0 or n_unknown > MAX_UNMATCHED * len(bc)):
        msg = (
            f"HEST sample {s.sample!r}: {n_unknown} of {len(bc)} patch barcodes (e.g. {list(bc[~known][:3])}) are not "
            f"spots of st/{s.sample}.h5ad (e.g. {list(adata.obs_names[:3])}). The patch file and the st file do not "
            f"belong together; {_fix(s.sample, 'st', 'patches')} again, or pass patches=False, wsi=True."
        )
        raise ValueError(msg)
    if n_unknown:
        warnings.warn(
            f"HEST sample {s.sample!r}: {n_unknown} of {len(bc)} patches have a barcode that is not a spot of "
            f"st/{s.sample}.h5ad (e.g. {list(bc[~known][:3])}); they get no tile.",
            UserWarning,
            stacklevel=3,
        )
    footprint = pf.size * pf.mpp / s.mpp  # the patch's side in level-0 WSI pixels
    xy_all = np.asarray(adata.obsm["spatial"], dtype=float)[:, :2]
    pos = adata.obs_names.get_indexer(bc)
    _check_coords(
        pf, np.where((pos >= 0)[:, None], xy_all[np.maximum(pos, 0)], np.nan), sample=s.sample, footprint_px=footprint
    )

    rows = table.obs[table.obs[C.REGION_KEY] == region]
    by_spot = pd.Series(np.arange(len(rows)), index=rows["spot"].astype(str).to_numpy())
    row = by_spot.reindex(bc.astype(str)).to_numpy()
    keep = ~pd.isna(row) & ~bc.duplicated()
    idx = np.flatnonzero(keep)
    row = row[keep].astype(np.int64)
    n_dropped = int(known.sum() - len(idx) - bc[known].duplicated().sum())
    if n_dropped > 0:
        logger.info(
            "HEST sample %s: %d patches of spots left out of the table (e.g. in_tissue == 0) dropped",
            s.sample,
            n_dropped,
        )
    if len(idx) < len(rows):
        logger.info(
            "HEST sample %s: %d of %d spots have no patch and get no tile", s.sample, len(rows) - len(idx), len(rows)
        )
    shapes = one.shapes[region]
    spot_id = rows[C.INSTANCE_KEY].to_numpy()[row]
    geom = shapes.geometry.loc[spot_id]
    cx, cy = geom.x.to_numpy(), geom.y.to_numpy()
    cols = mosaic_columns(pf.n)
    df = pd.DataFrame(
        {
            "region": region,
            C.INSTANCE_KEY: spot_id,
            "obs_name": rows.index.to_numpy()[row].astype(str),
            "image": f"{s.sample}{PATCHES_SUFFIX}",
            "level": 0,
            "x0": (idx % cols) * pf.size,
            "y0": (idx // cols) * pf.size,
            "size": pf.size,
            "inside": 1.0,
            "tile_size_um": float(pf.size * pf.mpp),
            "tile_size_px": int(pf.size),
        }
    )[TILE_COLUMNS]
    half = footprint / 2
    gdf = gpd.GeoDataFrame(df, geometry=box(cx - half, cy - half, cx + half, cy + half))
    return gdf, _mosaic_element(pf, sample=s.sample)


def _read_sample(s: _Sample, *, tile_size_um: float, tile_size_px: int, harmonize_genes: bool):
    """``(images, shapes, table, tiles frame, tiles transformation)`` of one HEST sample."""
    import anndata as ad
    from spatialdata.transformations import Scale, get_transformation

    from .._spatial import nearest_neighbour_spacing
    from ._anndata import _is_counts, from_anndata

    try:
        adata = ad.read_h5ad(s.st)
    except (OSError, ValueError, KeyError) as e:
        msg = f"HEST sample {s.sample!r}: st/{s.st.name} could not be read ({type(e).__name__}: {e}); {_fix(s.sample, 'st')}."
        raise ValueError(msg) from e
    if "spatial" not in adata.obsm:
        msg = f"HEST sample {s.sample!r}: st/{s.st.name} has no obsm['spatial'] (spot centres in WSI pixels); {_fix(s.sample, 'st')}."
        raise ValueError(msg)
    if adata.X is None or not _is_counts(adata.X):
        msg = (
            f"HEST sample {s.sample!r}: X of st/{s.st.name} is not raw counts (non-integer or negative values); "
            "ct.io.hest reads HEST's raw counts. Leave the sample out of sample_ids, or download it again."
        )
        raise ValueError(msg)
    obs = adata.obs.copy()
    for key in ("st_technology", "species", "organ"):
        if isinstance(s.meta.get(key), str) and key not in obs:
            obs[key] = s.meta[key]
    # uns['spatial'] ('ST' library, downscaled thumbnail) is left out: the sample is its own section
    bare = ad.AnnData(X=adata.X, obs=obs, var=adata.var, obsm={"spatial": np.asarray(adata.obsm["spatial"])})
    one = from_anndata(
        bare,
        library_id=s.sample,
        image=s.wsi,
        mpp=s.mpp,
        library_key="_comtip_hest_sample",
        harmonize_genes=harmonize_genes,
    )
    region = f"{s.sample}{C.SPOTS_SUFFIX}"
    shapes = one.shapes[region]
    xy = np.column_stack([shapes.geometry.x.to_numpy(), shapes.geometry.y.to_numpy()])
    diameter = _spot_diameter_um(s.meta, nearest_neighbour_spacing(xy) * s.mpp)
    shapes["radius"] = diameter / 2 / s.mpp
    s.extra["spot_diameter_um"] = diameter
    if s.patches is not None:
        gdf, mosaic = _patch_tiles(one, s, adata, region=region)
        one.images[f"{s.sample}{PATCHES_SUFFIX}"] = mosaic
        transform = Scale([s.mpp, s.mpp], axes=("x", "y"))
        source = f"{len(gdf)} tiles from patches/{s.patches.path.name}"
    else:
        from ..pp._tiles import spot_tiles

        spot_tiles(one, tile_size_um=tile_size_um, tile_size_px=tile_size_px)
        tiles = one.shapes[C.TILES_KEY]
        del one.shapes[C.TILES_KEY]
        transform = get_transformation(tiles, s.sample)
        gdf = tiles
        source = f"{len(gdf)} tiles from wsis/{s.wsi.name}"
    table = one.tables[C.TABLE_KEY].copy()
    table.uns.pop("spatialdata_attrs", None)
    table.uns.pop(C.INPUT_KEY, None)
    logger.info("HEST sample %s: %d spots, %d genes, %s", s.sample, table.n_obs, table.n_vars, source)
    return dict(one.images), dict(one.shapes), table, gdf, transform


def hest(
    root: str | os.PathLike,
    sample_ids: str | Sequence[str] | None = None,
    *,
    patches: bool = True,
    wsi: bool = False,
    patch_mpp: float | None = None,
    harmonize_genes: bool = True,
) -> SpatialData:
    """Read HEST-1k samples, with a tile per spot ready for :func:`comtip.tl.pretrain` and :func:`comtip.tl.embed`.

    ``root`` is a folder in HEST-1k's layout (download it as on the docs page *Pretraining data from HEST-1k*):
    ``st/{id}.h5ad`` (raw counts, ``obsm['spatial']`` = spot centres in full-resolution WSI pixels),
    ``metadata/{id}.json`` (``pixel_size_um_estimated``, else ``pixel_size_um_embedded``: µm per WSI pixel;
    ``spot_diameter``, ``st_technology``, ``species``, ``organ``, ...), ``patches/{id}.h5`` (``img``: N x 224 x 224
    x 3 uint8 patches at 0.5 µm/px around the spots, ``barcode``, ``coords``) and ``wsis/{id}.tif`` (pyramidal TIFF).
    Each sample becomes a section (coordinate system ``id``, in µm), as the sections of
    :func:`comtip.datasets.her2st`.

    Tiles come from the patch file when there is one and ``patches=True``: HEST's patches are 112 µm at 224 px,
    comtip's default tile, so they are used as they are, read lazily from the HDF5 file (a mosaic image
    ``"{id}_patches"`` whose cells are the patches; nothing is copied). Otherwise, with ``wsi=True``, the
    whole-slide image is opened lazily (as :func:`comtip.io.wsi` does) and tiled by :func:`comtip.pp.spot_tiles`
    at the patches' size (112 µm, 224 px by default). ``wsi=True`` also adds the slide itself, so that
    ``ct.pp.spot_tiles(sdata, ..., overwrite=True)`` can tile it at another size; without it the patches are the only
    image (and ``ct.pp.spot_tiles`` has nothing to tile).

    Parameters
    ----------
    root
        The HEST-1k folder (holding ``st/``, ``metadata/``, ``patches/``, ``wsis/``).
    sample_ids
        Sample id(s) to read, e.g. ``["TENX95", "NCBI785"]``; by default every sample of ``st/``.
    patches
        Take the tiles from ``patches/{id}.h5`` where it exists.
    wsi
        Add the whole-slide image ``wsis/{id}.tif`` as image ``"{id}_he"``; samples without a patch file (or all, with
        ``patches=False``) are tiled from it.
    patch_mpp
        µm per pixel of the patches; by default the file's attribute, else 0.5 (HEST's).
    harmonize_genes
        Upper-case gene symbols and map old ones to current HGNC symbols, summing duplicates (as the other readers).

    Returns
    -------
    SpatialData with, per sample ``id``: shapes ``"{id}_spots"`` (circles, radius in WSI pixels; the metadata's
    ``spot_diameter``, or the spot spacing for pooled Xenium / Visium HD bins), image ``"{id}_patches"`` (the mosaic of
    patches, own coordinate system ``"{id}_patches"``) and/or ``"{id}_he"`` (the slide, ``wsi=True``); one table
    ``"table"`` with raw counts in ``X`` and ``layers['counts']``, ``obs['section']`` = the sample id,
    ``obs['spot']`` = the barcode, the st file's ``obs`` columns and ``st_technology``, ``species``, ``organ``; and
    shapes ``"comtip_tiles"`` with the columns :func:`comtip.pp.spot_tiles` writes (spots without a patch get no tile).
    ``sdata.attrs['comtip']['hest']`` holds each sample's metadata.

    Raises
    ------
    ValueError
        An unknown sample id (the message lists the samples found), a metadata file without pixel size, counts that
        are not raw counts, patch barcodes that are not spots of the st file, ``patches=False`` with ``wsi=False``.
    FileNotFoundError
        A missing ``st/`` or ``metadata/`` file; a missing patch file with ``wsi=False``; a missing slide with
        ``wsi=True``. The message says which files to download.

    Warns
    -----
    UserWarning
        Patch files of different sizes; a few patch barcodes that are not spots (those patches are left out); patch
        ``coords`` far from their spots (patch and st files of different HEST versions).

    Examples
    --------
    >>> sdata = ct.io.hest("hest_data/", ["TENX95", "TENX99"])
    >>> model = ct.tl.pretrain(sdata)
    >>> sdata = ct.io.hest("hest_data/", "TENX95", patches=False, wsi=True)  # tiles cut from the slide
    """
    import geopandas as gpd
    from spatialdata.models import ShapesModel

    from .._progress import progress
    from .._spatial import set_units
    from ._utils import combine_sections

    root = Path(root).expanduser()
    if not root.is_dir():
        msg = f"HEST folder not found: {str(root)!r}. Download HEST-1k there first (docs: 'Pretraining data from HEST-1k')."
        raise FileNotFoundError(msg)
    if not patches and not wsi:
        msg = "patches=False and wsi=False leave no image to tile: pass patches=True (HEST's patch files) or wsi=True."
        raise ValueError(msg)
    available = _available(root)
    if sample_ids is None:
        st_dir = root / "st"
        sample_ids = sorted(p.name[: -len(".h5ad")] for p in st_dir.glob("*.h5ad")) if st_dir.is_dir() else []
        if not sample_ids:
            msg = f"No HEST sample under {str(root)!r}: st/ holds no .h5ad file. Download HEST-1k there first."
            raise FileNotFoundError(msg)
    elif isinstance(sample_ids, str):
        sample_ids = [sample_ids]
    sample_ids = list(dict.fromkeys(str(s) for s in sample_ids))
    if not sample_ids:
        msg = "sample_ids is empty: pass HEST sample ids (e.g. ['TENX95']) or None for every sample of root/st."
        raise ValueError(msg)
    samples = [
        _sample_files(root, s, patches=patches, wsi=wsi, patch_mpp=patch_mpp, available=available) for s in sample_ids
    ]
    # slides are tiled at the size of the patches (when there are some), so that all tiles are alike
    first = next((s.patches for s in samples if s.patches is not None), None)
    kinds = {(s.patches.size, s.patches.mpp): s.sample for s in samples if s.patches is not None}
    if len(kinds) > 1:
        seen = ", ".join(f"{sample}: {p} px at {m:g} µm/px" for (p, m), sample in kinds.items())
        warnings.warn(
            f"The HEST patch files differ in size ({seen}): the tiles do not all cover the same tissue area. Read "
            "those samples separately, or pass patches=False, wsi=True to cut every tile alike from the slides.",
            UserWarning,
            stacklevel=2,
        )
    tile_size_um = first.size * first.mpp if first is not None else C.TILE_SIZE_UM
    tile_size_px = first.size if first is not None else C.TILE_SIZE_PX

    parts, frames, transforms = [], [], {}
    for s in progress(samples, desc="HEST samples", total=len(samples)):
        images, shapes, table, gdf, transform = _read_sample(
            s, tile_size_um=tile_size_um, tile_size_px=tile_size_px, harmonize_genes=harmonize_genes
        )
        parts.append((images, shapes, table, s.sample))
        frames.append(gdf)
        transforms[s.sample] = transform
    sdata = combine_sections(parts)
    sdata.tables[C.TABLE_KEY].uns[C.INPUT_KEY] = {"x_is_counts": True, "x_transform": None, "source": "X"}
    tiles = gpd.GeoDataFrame(pd.concat([pd.DataFrame(f) for f in frames], ignore_index=True), geometry="geometry")
    tiles["obs_name"] = tiles["obs_name"].astype(str)
    sdata.shapes[C.TILES_KEY] = ShapesModel.parse(tiles, transformations=transforms)
    for s in samples:
        if s.patches is not None:
            set_units(sdata, f"{s.sample}{PATCHES_SUFFIX}", "um")
    sdata.attrs.setdefault(C.ATTRS_KEY, {})["hest"] = {s.sample: dict(s.meta) for s in samples}
    logger.info("read %d HEST samples: %d spots, %d tiles", len(samples), sdata.tables[C.TABLE_KEY].n_obs, len(tiles))
    return sdata
