"""Where a tool reads spots from and writes results to: SpatialData tables, or AnnData with ``uns['spatial']``.

An AnnData is converted to a SpatialData (:func:`comtip.io.from_anndata`) and tiled (:func:`comtip.pp.spot_tiles`)
once: the conversion is kept, for as long as the AnnData lives, in a cache of this module keyed by the AnnData's
identity, and used again while everything the conversion read from it (names, ``obs``, ``var``, ``X``,
``obsm['spatial']``, ``uns['spatial']``) is unchanged and the tile size is the same. Nothing is written into the
AnnData, so nothing of it is saved with ``adata.write_h5ad``.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .. import _constants as C
from .._logging import logger
from ._utils import digest, is_spatialdata


@dataclass
class Spots:
    """The spots a tool works on.

    Attributes
    ----------
    sdata
        A SpatialData holding images, tiles and the table (the user's, or one converted from AnnData, which may be
        shared with other calls: treat it as read-only).
    table
        The AnnData results are written to (the user's own object).
    rows
        For each row of ``table``, its obs name in ``sdata``'s table.
    tiles_key
        Shapes element with the tiles.
    """

    sdata: object
    table: object
    rows: np.ndarray
    tiles_key: str

    def tiled_rows(self) -> tuple[np.ndarray, list[str]]:
        """Positions in ``table`` of the spots that have a tile, and their obs names in ``sdata``."""
        tiles = self.sdata.shapes[self.tiles_key]
        have = set(tiles["obs_name"].astype(str))
        pos = np.flatnonzero([r in have for r in self.rows])
        return pos, [self.rows[i] for i in pos]

    def centres(self, obs_names: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Tile centres (n, 2) of ``obs_names`` and the shapes element (section) each spot belongs to."""
        tiles = self.sdata.shapes[self.tiles_key].drop_duplicates("obs_name").set_index("obs_name")
        sub = tiles.loc[list(obs_names)]
        c = sub.geometry.centroid
        return np.column_stack([c.x.to_numpy(), c.y.to_numpy()]), sub["region"].astype(str).to_numpy()

    def tiles_digest(self, obs_names: list[str]) -> str:
        """A digest of ``obs_names`` (in this order) and their tiles (image, level, box, size in pixels)."""
        import pandas as pd

        tiles = pd.DataFrame(self.sdata.shapes[self.tiles_key].drop(columns="geometry"))
        tiles = tiles.drop_duplicates("obs_name").set_index("obs_name").loc[list(obs_names)]
        return digest([self.tiles_key, tiles.reset_index()])


def resolve_spots(data, *, table_key: str, tiles_key: str, model=None, need_tiles: bool = True) -> Spots:
    """Spots of ``data`` with their tiles; AnnData with scanpy's ``uns['spatial']`` is converted on the fly.

    For an AnnData, tiles are computed with the model's tile size (they cannot be stored in an AnnData); for a
    SpatialData they must exist (``ct.pp.spot_tiles``), so the user decides their size.
    """
    from anndata import AnnData

    from .._checks import check_has_spots, check_names

    if is_spatialdata(data):
        from .._spatial import get_table

        table = get_table(data, table_key)
        check_names(table, element=f"Table {table_key!r}")
        check_has_spots(table, element=f"Table {table_key!r}")
        if need_tiles and tiles_key not in data.shapes:
            msg = f"No tiles {tiles_key!r} in the SpatialData object: run ct.pp.spot_tiles(sdata) first (112 µm tiles at 224 px)."
            raise KeyError(msg)
        if need_tiles:
            _check_tiles_match(data, table, tiles_key, model)
        return Spots(data, table, table.obs_names.to_numpy(dtype=object), tiles_key)
    if isinstance(data, AnnData):
        check_names(data, element="The AnnData")
        check_has_spots(data, element="The AnnData")
        if "spatial" not in data.uns:
            msg = (
                "This AnnData has no uns['spatial'] (scanpy's Visium layout with the H&E image and scale factors), so "
                "its spots cannot be placed on an image. Read the data with ct.io.visium / ct.io.read_st, or pass a SpatialData."
            )
            raise ValueError(msg)
        sdata, rows = _converted(data, table_key=table_key, tiles_key=tiles_key, model=model, need_tiles=need_tiles)
        if need_tiles and model is not None:
            check_tile_resolution(model, sdata.shapes[tiles_key], tiles_key=tiles_key)
        return Spots(sdata, data, rows, tiles_key)
    msg = f"Expected a SpatialData or an AnnData, got {type(data).__name__}."
    raise TypeError(msg)


@dataclass
class _Conversion:
    """The SpatialData objects converted from one AnnData, by tiling: ``{(tiles_key, µm, px) | None: (sdata, rows)}``."""

    ref: weakref.ref
    fingerprint: str
    converted: dict[Any, tuple[Any, np.ndarray]] = field(default_factory=dict)
    finalizer: Any = None


# by id(adata): AnnData is not hashable (no WeakKeyDictionary); an entry goes when its AnnData is garbage collected
_CONVERSIONS: dict[int, _Conversion] = {}


def _fingerprint(adata) -> str | None:
    """A digest of what :func:`comtip.io.from_anndata` reads from ``adata``; ``None`` when it is not cheap to take.

    ``None`` (backed or dask ``X``, unhashable values in ``obs``) means the conversion is not cached.
    """
    from scipy import sparse

    if adata.isbacked:
        return None
    X = adata.X
    if X is None:
        x_parts: list = ["X is None"]
    elif sparse.issparse(X):
        x_parts = [
            X.format,
            X.shape,
            *(getattr(X, a) for a in ("data", "indices", "indptr", "row", "col") if hasattr(X, a)),
        ]
    elif isinstance(X, np.ndarray):
        x_parts = [X]
    else:
        return None
    spatial = adata.obsm.get("spatial")
    parts = [adata.shape, adata.obs, adata.var, *x_parts, np.asarray(spatial) if spatial is not None else None]
    parts += list(_flatten(adata.uns.get("spatial"))) + ["log1p" in adata.uns]
    try:
        return digest(parts)
    except (TypeError, ValueError):
        return None


def _flatten(obj, prefix: str = ""):
    """Items of a nested mapping (``uns['spatial']``) in a fixed order: arrays as arrays, everything else as repr."""
    from collections.abc import Mapping

    if isinstance(obj, Mapping):
        for k in sorted(obj, key=str):
            yield f"{prefix}/{k}"
            yield from _flatten(obj[k], f"{prefix}/{k}")
    elif isinstance(obj, np.ndarray):
        yield obj
    else:
        yield repr(obj)


def _entry(adata, fingerprint: str) -> _Conversion:
    """The cache entry of ``adata``, emptied when ``adata`` changed since its conversions."""
    entry = _CONVERSIONS.get(id(adata))
    if entry is not None and entry.ref() is adata:
        if entry.fingerprint != fingerprint:
            logger.debug("the AnnData changed since it was converted to SpatialData: converting it again")
            entry.fingerprint, entry.converted = fingerprint, {}
        return entry
    if entry is not None and entry.finalizer is not None:
        entry.finalizer.detach()
    entry = _Conversion(weakref.ref(adata), fingerprint)
    entry.finalizer = weakref.finalize(adata, _CONVERSIONS.pop, id(adata), None)
    _CONVERSIONS[id(adata)] = entry
    return entry


def share_conversion(source, copy) -> None:
    """Let ``copy`` (an AnnData copied from ``source``) use the conversions of ``source`` (checked again on use)."""
    entry = _CONVERSIONS.get(id(source))
    if entry is None or entry.ref() is not source or not entry.converted:
        return
    _entry(copy, entry.fingerprint).converted.update(entry.converted)


def _converted(adata, *, table_key: str, tiles_key: str, model, need_tiles: bool) -> tuple[Any, np.ndarray]:
    """The SpatialData converted from ``adata`` (tiled at the model's tile size), and each row's obs name there.

    From the cache when ``adata`` has not changed since it was converted with these tiles.
    """
    from ..io import from_anndata
    from ..pp import spot_tiles

    um, px = _model_tiles(model)
    key = (tiles_key, um, px) if need_tiles else None
    fingerprint = _fingerprint(adata)
    entry = _entry(adata, fingerprint) if fingerprint is not None else None
    if entry is not None:
        hit = entry.converted.get(key)
        if hit is None and key is None and entry.converted:
            hit = next(iter(entry.converted.values()))  # any conversion holds the table
        if hit is not None:
            logger.debug("using the SpatialData converted from this AnnData before")
            return hit
    sdata = from_anndata(adata)
    if need_tiles:
        spot_tiles(sdata, tile_size_um=um, tile_size_px=px, key_added=tiles_key)
    t = sdata.tables[table_key if table_key in sdata.tables else C.TABLE_KEY]
    by_spot = dict(zip(t.obs["spot"].astype(str), t.obs_names, strict=True))
    rows = np.array([by_spot.get(str(o)) for o in adata.obs_names], dtype=object)
    if entry is not None:
        entry.converted[key] = (sdata, rows)
    return sdata, rows


def _model_tiles(model) -> tuple[float, int]:
    if model is None:
        return C.TILE_SIZE_UM, C.TILE_SIZE_PX
    s = model.training_summary
    return float(s.get("tile_size_um", C.TILE_SIZE_UM)), int(s.get("tile_size_px", model.config.image_size))


def patch_size(model) -> int | None:
    """Side in pixels of one input patch of the model's image tower (ViTs), ``None`` for towers without patches."""
    pe = getattr(model.image.backbone, "patch_embed", None)
    p = getattr(pe, "patch_size", None)
    if p is None:
        return None
    return int(max(p)) if isinstance(p, tuple | list) else int(p)


def check_tile_resolution(model, tiles, *, tiles_key: str) -> None:
    """Refuse tiles that hold fewer pixels than one patch of the model's image tower (a ViT).

    A tile's resolution is the smaller of its stored size (``tile_size_px``) and its native size at the pyramid
    level it is read from (``size``): below one patch, every patch of the tower would see less than a pixel of
    the tile (it is only upsampled to the model's ``image_size``).

    Parameters
    ----------
    model
        A :class:`comtip.CoMTIP`.
    tiles
        The tiles table (``sdata.shapes[tiles_key]``).
    tiles_key
        Its name, for messages.
    """
    patch = patch_size(model)
    if patch is None or not len(tiles):
        return
    px = int(tiles["tile_size_px"].min())
    native = int(tiles["size"].min())
    if min(px, native) >= patch:
        return
    um = float(tiles["tile_size_um"].iloc[0])
    if px < patch:
        fix = (
            f"recompute them at the model's size: ct.pp.spot_tiles(sdata, tile_size_um={um:g}, "
            f"tile_size_px={model.config.image_size}, key_added={tiles_key!r}, overwrite=True)"
        )
    else:
        fix = (
            "use a larger tile_size_um or a finer pyramid level (target_mpp=) in ct.pp.spot_tiles(..., "
            f"key_added={tiles_key!r}, overwrite=True)"
        )
    msg = (
        f"Tiles {tiles_key!r} hold {min(px, native)} px per side (tile_size_px={px}, {native} px read from the "
        f"image), fewer than one {patch} px patch of the model's image encoder {model.config.image_encoder!r} "
        f"({model.config.image_size} px input): {fix}."
    )
    raise ValueError(msg)


def _check_tiles_match(sdata, table, tiles_key: str, model) -> None:
    if model is None:
        return
    tiles = sdata.shapes[tiles_key]
    check_tile_resolution(model, tiles, tiles_key=tiles_key)
    um, _ = _model_tiles(model)
    got = float(tiles["tile_size_um"].iloc[0]) if len(tiles) else um
    if abs(got - um) > 1e-6 * um:
        logger.warning(
            "tiles are %.0f µm but the model was trained on %.0f µm tiles: its embeddings may be off", got, um
        )


def check_training_data(
    table,
    *,
    table_key: str,
    layer: str | None,
    train_obs: list[str],
    val_obs: list[str],
    train_sections: list[str],
    val_sections: list[str],
) -> None:
    """Refuse data that :func:`comtip.tl.pretrain` cannot learn from, before any work (names, genes, counts, spots).

    Parameters
    ----------
    table
        The spots' table.
    table_key
        Its name, for messages.
    layer
        The raw-count layer pretrain was given.
    train_obs, val_obs
        Training and validation spots (with tiles).
    train_sections, val_sections
        Their sections, for messages.
    """
    import warnings

    from .._checks import check_expression, check_has_spots, check_names

    element = f"Table {table_key!r}"
    check_names(table, element=element)
    check_has_spots(table, element=element)
    if table.n_vars == 0:
        msg = (
            f"{element} has no genes (0 columns), e.g. image-only spots from ct.pp.grid_spots: pretraining needs the "
            "spots' expression. Pretrain on spatial transcriptomics data; image-only slides can then be embedded "
            "and predicted with the trained model."
        )
        raise ValueError(msg)
    check_expression(table, layer=layer, element=element)
    if len(train_obs) < 2:
        msg = (
            f"Only {len(train_obs)} training spot with a tile (sections {train_sections}): contrastive pretraining "
            "compares the spots of a batch with each other and needs at least 2. Train on more spots or sections"
            f"{' (or use the validation sections ' + str(val_sections) + ' for training: validation=None)' if val_sections else ''}."
        )
        raise ValueError(msg)
    if 0 < len(val_obs) < 3:
        warnings.warn(
            f"The validation sections {val_sections} have only {len(val_obs)} spot(s) with a tile, too few for "
            "validation metrics (Recall@5, correlations): the best epoch is chosen on noise. Pass validation= with a "
            "larger section, or validation=None.",
            UserWarning,
            stacklevel=3,
        )


def copy_data(data):
    """The object a tool called with ``copy=True`` writes to: a copy of ``data`` that the tool may change freely.

    An AnnData is copied (:meth:`anndata.AnnData.copy`). A SpatialData gets its tables copied, which is all that
    the tools write to, while images, labels, points and shapes are shared with ``data``: the tools only read them,
    and :func:`spatialdata.deepcopy` would load every image into memory (and turn the lazy images of ``data`` into
    in-memory ones). The copy of an AnnData with scanpy's ``uns['spatial']`` shares the SpatialData converted from
    it, so it is not converted again (:mod:`comtip.tl._data`).
    """
    import copy as _copy

    from anndata import AnnData

    if isinstance(data, AnnData):
        out = data.copy()
        share_conversion(data, out)
        return out
    if is_spatialdata(data):
        from spatialdata import SpatialData

        return SpatialData(
            images=dict(data.images),
            labels=dict(data.labels),
            points=dict(data.points),
            shapes=dict(data.shapes),
            tables={k: t.copy() for k, t in data.tables.items()},
            attrs=_copy.deepcopy(dict(data.attrs)),
        )
    msg = f"Expected a SpatialData or an AnnData, got {type(data).__name__}."
    raise TypeError(msg)
