"""Batched tile reads: each image chunk a batch touches is read once, through a small LRU cache."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import pandas as pd

from .._checks import check_image_pixels
from .._images import level_arrays

PAD_VALUE = 255  # glass is white on an H&E scan
STRIP_CHUNKS = 8  # read order: vertical strips this many chunk columns wide, each top to bottom
CACHE_MARGIN = 32 << 20  # bytes added to the computed working set of the chunk cache


def resize_tiles(tiles, size: int):
    """Resize uint8 tiles ``(n, 3, s, s)`` to ``(n, 3, size, size)``: antialiased bicubic on uint8, as PIL's BICUBIC."""
    import torch

    if tiles.shape[-1] == size and tiles.shape[-2] == size:
        return tiles
    return torch.nn.functional.interpolate(
        tiles.contiguous(), size=(size, size), mode="bicubic", antialias=True, align_corners=False
    )


class TileReader:
    """Read spot tiles in batches from the image levels named by a tiles table (``ct.pp.spot_tiles``).

    A batch is grouped by image level; for lazy (dask) images, the chunks the batch touches are computed
    in one call and kept in an LRU cache of ``cache_mb`` megabytes, so a chunk is decoded once however
    many tiles it holds — never one spatial query per tile. Tiles are resized to ``tile_size_px``
    (bicubic, antialiased) and returned as uint8 ``(n, 3, P, P)``. Reading rows in :meth:`read_order`
    decodes each chunk about once with a cache that does not grow with the slide.

    Parameters
    ----------
    sdata
        The SpatialData holding the images.
    tiles
        Rows of ``sdata.shapes['comtip_tiles']`` (columns ``image, level, x0, y0, size, tile_size_px``).
    cache_mb
        Size of the chunk cache. ``None``: what :meth:`read_order` needs (three chunk rows of a strip of
        ``STRIP_CHUNKS + 1`` chunk columns of the largest level read, or its largest chunk, plus a margin), so memory
        stays flat however large the slide. The chunks of the batch being read are always kept.
    """

    def __init__(self, sdata, tiles: pd.DataFrame, *, cache_mb: float | None = None) -> None:
        self.tiles = tiles.reset_index(drop=True)
        self._arrays: dict[tuple[str, int], object] = {}
        for img, lvl in self.tiles[["image", "level"]].drop_duplicates().itertuples(index=False):
            if img not in sdata.images:
                msg = f"Tiles refer to image {img!r}, which is not in the SpatialData object (images: {list(sdata.images)}); recompute ct.pp.spot_tiles."
                raise KeyError(msg)
            check_image_pixels(sdata.images[img], key=img, warn_rgba=False)  # it may have changed since spot_tiles
            levels = level_arrays(sdata.images[img])
            if int(lvl) >= len(levels):
                msg = f"Tiles refer to level {lvl} of image {img!r}, which has {len(levels)} level(s); recompute ct.pp.spot_tiles."
                raise ValueError(msg)
            data = levels[int(lvl)].data
            if hasattr(data, "numblocks") and data.numblocks[0] != 1:
                data = data.rechunk({0: -1})  # all channels in one chunk
            self._arrays[(img, int(lvl))] = data
        self.cache_bytes = self._working_set_bytes() if cache_mb is None else int(cache_mb * 2**20)
        self._cache: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self._cached = 0
        self._graphs: dict[str, dict] = {}
        self.out_size = int(self.tiles["tile_size_px"].iloc[0]) if len(self.tiles) else 0

    def __len__(self) -> int:
        return len(self.tiles)

    def __getstate__(self):
        # workers start with an empty cache
        state = self.__dict__.copy()
        state["_cache"] = OrderedDict()
        state["_cached"] = 0
        state["_graphs"] = {}
        return state

    # -- read order and cache size ----------------------------------------------------------------
    def _strip_px(self, arr) -> int:
        """Width of a read strip in pixels of ``arr``'s level (the whole level for in-memory arrays)."""
        if isinstance(arr, np.ndarray) or not hasattr(arr, "chunks"):
            return max(int(arr.shape[-1]), 1)
        return max(int(arr.chunks[2][0]) * STRIP_CHUNKS, 1)

    def read_order(self, rows: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """Row order that decodes each chunk about once, with a cache that does not grow with the slide.

        Rows go by image and level, then in vertical strips of ``STRIP_CHUNKS`` chunk columns, each read top to
        bottom. Row by row across a whole slide would need two full-width chunk rows in the cache, which grows
        with the slide; strips bound it (the chunk column at a strip's edge is decoded twice: 1 in
        ``STRIP_CHUNKS``).

        Parameters
        ----------
        rows
            Order only these rows (default: all). The result is then a permutation of positions into ``rows``, the
            order a reader of just those rows would give.
        """
        tiles = self.tiles if rows is None else self.tiles.iloc[np.asarray(rows, dtype=np.int64)]
        n = len(tiles)
        strip = np.zeros(n, dtype=np.int64)
        group = np.zeros(n, dtype=np.int64)
        img = tiles["image"].to_numpy()
        lvl = tiles["level"].to_numpy()
        x0 = tiles["x0"].to_numpy(np.int64)
        # groups numbered by first appearance among these rows, as in a reader built on them
        pairs = tiles[["image", "level"]].drop_duplicates().itertuples(index=False)
        for g, (name, level) in enumerate(pairs):
            sel = (img == name) & (lvl == level)
            group[sel] = g
            strip[sel] = np.floor_divide(x0[sel], self._strip_px(self._arrays[(name, int(level))]))
        return np.lexsort((x0, tiles["y0"].to_numpy(np.int64), strip, group))

    def _working_set_bytes(self) -> int:
        """Cache size for :meth:`read_order`: three chunk rows of a strip (+1 column), or the largest chunk."""
        need = 0
        for arr in self._arrays.values():
            if isinstance(arr, np.ndarray) or not hasattr(arr, "chunks"):
                continue
            cy, cx = max(arr.chunks[1]), max(arr.chunks[2])
            chunk = int(arr.shape[0]) * cy * cx * np.dtype(arr.dtype).itemsize
            need = max(need, chunk * min(3, arr.numblocks[1]) * min(STRIP_CHUNKS + 1, arr.numblocks[2]))
        return int(need * 1.5) + CACHE_MARGIN

    # -- chunk cache ---------------------------------------------------------------------------
    def _graph(self, arr) -> dict:
        """The array's low-level task graph, materialised once (computing keys from it skips dask's per-call optimisation)."""
        g = self._graphs.get(arr.name)
        if g is None:
            g = self._graphs[arr.name] = dict(arr.__dask_graph__())
        return g

    def _get_chunks(self, arr, keys: list[tuple[int, int]]) -> dict[tuple[int, int], np.ndarray]:
        import dask.base

        name = arr.name
        out, missing = {}, []
        for k in keys:
            hit = self._cache.get((name, *k))
            if hit is None:
                missing.append(k)
            else:
                self._cache.move_to_end((name, *k))
                out[k] = hit
        if missing:
            get = dask.base.get_scheduler(collections=[arr])  # honours dask.config (synchronous in workers)
            blocks = get(self._graph(arr), [(name, 0, iy, ix) for iy, ix in missing])
            for k, b in zip(missing, blocks, strict=True):
                b = np.asarray(b)
                out[k] = b
                self._cache[(name, *k)] = b
                self._cached += b.nbytes
            while self._cached > self.cache_bytes and len(self._cache) > len(keys):
                _, old = self._cache.popitem(last=False)
                self._cached -= old.nbytes
        return out

    def _read_level(self, arr, boxes: np.ndarray, size: int) -> np.ndarray:
        """``(n, 3, size, size)`` uint8 tiles of one level; boxes are ``(x0, y0)``."""
        c, h, w = arr.shape
        n = len(boxes)
        out = np.full((n, 3, size, size), PAD_VALUE, dtype=np.uint8)
        xa, ya = np.maximum(boxes[:, 0], 0), np.maximum(boxes[:, 1], 0)
        xb, yb = np.minimum(boxes[:, 0] + size, w), np.minimum(boxes[:, 1] + size, h)
        valid = (xb > xa) & (yb > ya)
        if isinstance(arr, np.ndarray):
            for i in np.flatnonzero(valid):
                ox, oy = xa[i] - boxes[i, 0], ya[i] - boxes[i, 1]
                out[i, :, oy : oy + yb[i] - ya[i], ox : ox + xb[i] - xa[i]] = arr[:3, ya[i] : yb[i], xa[i] : xb[i]]
            return out
        ey = np.cumsum((0, *arr.chunks[1]))
        ex = np.cumsum((0, *arr.chunks[2]))
        iy0 = np.searchsorted(ey, ya, "right") - 1
        iy1 = np.searchsorted(ey, yb - 1, "right") - 1
        ix0 = np.searchsorted(ex, xa, "right") - 1
        ix1 = np.searchsorted(ex, xb - 1, "right") - 1
        keys = sorted(
            {
                (iy, ix)
                for i in np.flatnonzero(valid)
                for iy in range(iy0[i], iy1[i] + 1)
                for ix in range(ix0[i], ix1[i] + 1)
            }
        )
        chunks = self._get_chunks(arr, keys)
        for i in np.flatnonzero(valid):
            for iy in range(iy0[i], iy1[i] + 1):
                for ix in range(ix0[i], ix1[i] + 1):
                    blk = chunks[(iy, ix)]
                    # overlap of the tile with this chunk, in image pixels
                    y_a, y_b = max(ya[i], ey[iy]), min(yb[i], ey[iy + 1])
                    x_a, x_b = max(xa[i], ex[ix]), min(xb[i], ex[ix + 1])
                    out[i, :, y_a - boxes[i, 1] : y_b - boxes[i, 1], x_a - boxes[i, 0] : x_b - boxes[i, 0]] = blk[
                        :3, y_a - ey[iy] : y_b - ey[iy], x_a - ex[ix] : x_b - ex[ix]
                    ]
        return out

    def read(self, rows: Sequence[int] | np.ndarray, *, native: bool = False):
        """Tiles of the given rows of the tiles table, in that order.

        Parameters
        ----------
        rows
            Row positions in ``tiles``.
        native
            Return the tiles at the level's native size (a list of uint8 arrays ``(3, s, s)``) instead of resized.

        Returns
        -------
        uint8 tensor ``(n, 3, P, P)`` with ``P = tile_size_px``.
        """
        import torch

        rows = np.asarray(rows, dtype=np.int64)
        sub = self.tiles.iloc[rows]
        native_tiles: list = [None] * len(rows)
        out = None if native else torch.empty((len(rows), 3, self.out_size, self.out_size), dtype=torch.uint8)
        for (img, lvl, size), grp in sub.groupby(["image", "level", "size"], sort=False):
            pos = np.flatnonzero(
                (sub["image"].to_numpy() == img) & (sub["level"].to_numpy() == lvl) & (sub["size"].to_numpy() == size)
            )
            arr = self._arrays[(img, int(lvl))]
            tiles = self._read_level(arr, grp[["x0", "y0"]].to_numpy(np.int64), int(size))
            if native:
                for j, p in enumerate(pos):
                    native_tiles[p] = tiles[j]
            else:
                # antialiased bicubic on uint8 (as PIL's BICUBIC): several times faster than on floats
                out[torch.from_numpy(pos)] = resize_tiles(torch.from_numpy(tiles), self.out_size)
        return native_tiles if native else out
