"""Where a tool reads spots from and writes results to: SpatialData tables, or AnnData with ``uns['spatial']``."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import _constants as C
from .._logging import logger
from ._utils import is_spatialdata


@dataclass
class Spots:
    """The spots a tool works on.

    Attributes
    ----------
    sdata
        A SpatialData holding images, tiles and the table (the user's, or one converted from AnnData).
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


def resolve_spots(data, *, table_key: str, tiles_key: str, model=None, need_tiles: bool = True) -> Spots:
    """Spots of ``data`` with their tiles; AnnData with scanpy's ``uns['spatial']`` is converted on the fly.

    For an AnnData, tiles are computed with the model's tile size (they cannot be stored in an AnnData); for a
    SpatialData they must exist (``ct.pp.spot_tiles``), so the user decides their size.
    """
    from anndata import AnnData

    if is_spatialdata(data):
        from .._spatial import get_table

        table = get_table(data, table_key)
        if need_tiles and tiles_key not in data.shapes:
            msg = f"No tiles {tiles_key!r} in the SpatialData object: run ct.pp.spot_tiles(sdata) first (112 µm tiles at 224 px)."
            raise KeyError(msg)
        if need_tiles:
            _check_tiles_match(data, table, tiles_key, model)
        return Spots(data, table, table.obs_names.to_numpy(dtype=object), tiles_key)
    if isinstance(data, AnnData):
        if "spatial" not in data.uns:
            msg = (
                "This AnnData has no uns['spatial'] (scanpy's Visium layout with the H&E image and scale factors), so "
                "its spots cannot be placed on an image. Read the data with ct.io.visium / ct.io.read_st, or pass a SpatialData."
            )
            raise ValueError(msg)
        from ..io import from_anndata
        from ..pp import spot_tiles

        sdata = from_anndata(data)
        if need_tiles:
            um, px = _model_tiles(model)
            spot_tiles(sdata, tile_size_um=um, tile_size_px=px, key_added=tiles_key)
        t = sdata.tables[table_key if table_key in sdata.tables else C.TABLE_KEY]
        by_spot = dict(zip(t.obs["spot"].astype(str), t.obs_names, strict=True))
        rows = np.array([by_spot.get(str(o)) for o in data.obs_names], dtype=object)
        return Spots(sdata, data, rows, tiles_key)
    msg = f"Expected a SpatialData or an AnnData, got {type(data).__name__}."
    raise TypeError(msg)


def _model_tiles(model) -> tuple[float, int]:
    if model is None:
        return C.TILE_SIZE_UM, C.TILE_SIZE_PX
    s = model.training_summary
    return float(s.get("tile_size_um", C.TILE_SIZE_UM)), int(s.get("tile_size_px", model.config.image_size))


def _check_tiles_match(sdata, table, tiles_key: str, model) -> None:
    if model is None:
        return
    tiles = sdata.shapes[tiles_key]
    um, _ = _model_tiles(model)
    got = float(tiles["tile_size_um"].iloc[0]) if len(tiles) else um
    if abs(got - um) > 1e-6 * um:
        logger.warning(
            "tiles are %.0f µm but the model was trained on %.0f µm tiles: its embeddings may be off", got, um
        )
