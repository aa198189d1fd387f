"""The torch Dataset of spots: tiles read in batches, gene sentences, panel expression and depth."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np
import pandas as pd

from .. import _constants as C
from ._augment import augment
from ._reader import TileReader
from ._sentences import gene_sentences


def worker_init_fn(worker_id: int) -> None:
    """DataLoader worker set-up: dask's synchronous scheduler (spatialdata + dask threads deadlock in forked workers)."""
    import dask

    dask.config.set(scheduler="synchronous")


class SpotDataset:
    """Spots of a SpatialData table as training/inference samples for CoMTIP.

    Each sample is a dict of tensors: ``image`` (3, P, P) float in [0, 1] (when tiles are used),
    ``gene_idx``/``gene_val``/``gene_mask`` (L,) — the spot's gene sentence over the model's panel —,
    ``expr`` (G,) the log-normalised panel expression, ``depth`` () the log total count, and ``index``
    (row of the table). Tiles are read in batches: use it with a DataLoader whose sampler yields
    batches of indices (``make_loader``), so :meth:`__getitems__` reads a whole batch at once.

    Build it once for all the spots a task needs, then take :meth:`subset` views (training, validation, with or
    without augmentation or tiles): they share the tiles read (or cached) once and the expression normalised once.

    Parameters
    ----------
    sdata
        SpatialData with the table and, for images, the tiles of ``ct.pp.spot_tiles``.
    genes
        The gene panel (model order). ``None``: no expression (image-only inference).
    table_key
        Table of the spots.
    tiles_key
        Shapes element with the tile boxes; ``None`` for expression only (count-only sections).
    obs_names
        Restrict to these spots (in this order); by default every spot with a tile (or every spot when
        ``tiles_key`` is ``None``).
    sentence_length
        L, genes per sentence.
    layer
        Raw-count layer (default: ``layers['counts']`` or ``X``).
    augment
        Random dihedral transforms and colour jitter (training).
    colour_jitter
        Strength of the colour jitter.
    seed
        Seed of the augmentation; with :meth:`set_epoch`, sample i of epoch e is always augmented alike.
    cache_tiles
        Read all tiles once, up front, and keep them in memory (uint8); for training on a few thousand spots.
    cache_mb
        Size of the chunk cache of the tile reader; ``None`` sizes it to what reading in
        :meth:`TileReader.read_order` needs (it does not grow with the slide).
    """

    def __init__(
        self,
        sdata,
        *,
        genes: Sequence[str] | None,
        table_key: str = C.TABLE_KEY,
        tiles_key: str | None = C.TILES_KEY,
        obs_names: Sequence[str] | None = None,
        sentence_length: int = 64,
        layer: str | None = None,
        augment: bool = False,
        colour_jitter: float = 0.1,
        seed: int = 0,
        cache_tiles: bool = False,
        cache_mb: float | None = None,
    ) -> None:
        from .._spatial import get_table

        table = get_table(sdata, table_key)
        self.reader: TileReader | None = None
        if tiles_key is not None:
            if tiles_key not in sdata.shapes:
                msg = f"No tiles {tiles_key!r} in the SpatialData object; run ct.pp.spot_tiles(sdata) first."
                raise KeyError(msg)
            tiles = pd.DataFrame(sdata.shapes[tiles_key].drop(columns="geometry"))
            tiles = tiles.drop_duplicates("obs_name").set_index("obs_name")
            if obs_names is None:
                obs_names = [o for o in table.obs_names if o in tiles.index]
            else:
                lacking = [o for o in obs_names if o not in tiles.index]
                if lacking:
                    msg = f"{len(lacking)} spots have no tile (e.g. {lacking[:3]}); run ct.pp.spot_tiles or leave them out."
                    raise ValueError(msg)
            self.reader = TileReader(sdata, tiles.loc[list(obs_names)].reset_index(), cache_mb=cache_mb)
        elif obs_names is None:
            obs_names = list(table.obs_names)
        self.obs_names = pd.Index(list(obs_names))
        self.rows = table.obs_names.get_indexer(self.obs_names)
        if (self.rows < 0).any():
            msg = f"Spots {list(self.obs_names[self.rows < 0][:3])} are not in table {table_key!r}."
            raise KeyError(msg)
        self.genes = None if genes is None else list(genes)
        self.sentence_length = sentence_length
        if self.genes is not None:
            from ..pp._expression import log_depth, log_normalized

            sub = table[self.rows]
            expr = log_normalized(sub, layer=layer, genes=self.genes).toarray()
            self.expr = expr.astype(np.float32)
            self.depth = log_depth(sub, layer=layer)
            self.gene_idx, self.gene_val, self.gene_mask = gene_sentences(self.expr, sentence_length)
        self.augment = augment
        self.colour_jitter = colour_jitter
        self.seed = seed
        self.epoch = 0
        self._tiles = None
        # each sample's row of the tile reader and of the cached tiles (None: sample i is row i): set in views
        self._reader_rows: np.ndarray | None = None
        self._cache_rows: np.ndarray | None = None
        if cache_tiles and self.reader is not None:
            self.cache_tiles()

    def __len__(self) -> int:
        return len(self.obs_names)

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch, so augmentation differs between epochs but is reproducible."""
        self.epoch = int(epoch)

    def _reader(self, idx: np.ndarray) -> np.ndarray:
        """Rows of the tile reader of samples ``idx``."""
        return idx if self._reader_rows is None else self._reader_rows[idx]

    def _cached(self, idx: np.ndarray) -> np.ndarray:
        """Rows of the cached tiles of samples ``idx``."""
        return idx if self._cache_rows is None else self._cache_rows[idx]

    def tile_read_order(self) -> np.ndarray:
        """An order of this dataset's samples that reads the image chunks about once (:meth:`TileReader.read_order`)."""
        return self.reader.read_order(self._reader_rows)

    def read_all_tiles(self, batch_size: int = 256):
        """All tiles as one uint8 tensor ``(n, 3, P, P)``, read in batches sorted by image."""
        import torch

        from .._progress import progress

        if self._tiles is not None:  # cached already
            return self._tiles[torch.from_numpy(self._cached(np.arange(len(self))))]
        order = self.tile_read_order()
        out = torch.empty((len(self), 3, self.reader.out_size, self.reader.out_size), dtype=torch.uint8)
        for i in progress(range(0, len(order), batch_size), desc="reading tiles"):
            idx = order[i : i + batch_size]
            out[torch.from_numpy(idx)] = self.reader.read(self._reader(idx))
        return out

    def cache_tiles(self) -> None:
        """Read all tiles now, once, and keep them in memory (uint8); views taken afterwards share them."""
        if self.reader is None or self._tiles is not None:
            return
        self._tiles = self.read_all_tiles()
        self._cache_rows = None

    def images(self, indices: Sequence[int]):
        """Float tiles in [0, 1] ``(n, 3, P, P)`` of the given samples (augmented if the dataset augments)."""
        import torch

        idx = np.asarray(indices, dtype=np.int64)
        if self._tiles is not None:
            raw = self._tiles[torch.from_numpy(self._cached(idx))]
        else:
            raw = self.reader.read(self._reader(idx))
        img = raw.float().div_(255.0)
        if self.augment:
            out = []
            for j, i in enumerate(idx):
                rng = np.random.default_rng([self.seed, self.epoch, int(i)])
                out.append(augment(img[j : j + 1], rng, colour_jitter=self.colour_jitter))
            img = torch.cat(out)
        return img

    def subset(
        self,
        indices: Sequence[int],
        *,
        images: bool = True,
        augment: bool | None = None,
        seed: int | None = None,
    ) -> SpotDataset:
        """A view of some samples: sample i of the view is sample ``indices[i]`` here.

        The view shares this dataset's tile reader and cached tiles (nothing is read again) and takes its rows of
        the expression, depth and gene sentences (nothing is normalised again). Augmentation of the view is seeded
        by (seed, epoch, index in the view), as in a dataset built on those spots alone.

        Parameters
        ----------
        indices
            Positions of the samples in this dataset.
        images
            Keep the tiles (``False``: expression only, as with ``tiles_key=None``).
        augment
            Augment the view's tiles (``None``: as this dataset).
        seed
            Seed of the view's augmentation (``None``: this dataset's).

        Returns
        -------
        A :class:`SpotDataset`.
        """
        idx = np.asarray(indices, dtype=np.int64)
        view = copy.copy(self)
        view.obs_names = self.obs_names[idx]
        view.rows = self.rows[idx]
        if self.genes is not None:
            for name in ("expr", "depth", "gene_idx", "gene_val", "gene_mask"):
                setattr(view, name, getattr(self, name)[idx])
        if images and self.reader is not None:
            view._reader_rows = self._reader(idx)
            view._cache_rows = self._cached(idx) if self._tiles is not None else None
        else:
            view.reader, view._tiles, view._reader_rows, view._cache_rows = None, None, None, None
        view.augment = self.augment if augment is None else bool(augment)
        view.seed = self.seed if seed is None else int(seed)
        view.epoch = 0
        return view

    @classmethod
    def concat(cls, parts: Sequence[SpotDataset]) -> SpotDataset:
        """One expression-only dataset (no tiles) with the samples of ``parts`` in order (same panel and length).

        Parameters
        ----------
        parts
            Datasets with the same ``genes`` and ``sentence_length``.

        Returns
        -------
        A :class:`SpotDataset`.
        """
        parts = list(parts)
        if not parts or len({tuple(p.genes or ()) for p in parts}) != 1 or parts[0].genes is None:
            msg = "SpotDataset.concat needs at least one dataset, all with the same gene panel."
            raise ValueError(msg)
        if len({p.sentence_length for p in parts}) != 1:
            msg = "SpotDataset.concat: the datasets have different sentence lengths."
            raise ValueError(msg)
        out = parts[0].subset(np.arange(len(parts[0])), images=False)
        out.obs_names = pd.Index([o for p in parts for o in p.obs_names])
        out.rows = np.concatenate([p.rows for p in parts])
        for name in ("expr", "depth", "gene_idx", "gene_val", "gene_mask"):
            setattr(out, name, np.concatenate([getattr(p, name) for p in parts]))
        out.augment = False
        return out

    def __getitems__(self, indices: Sequence[int]) -> list[dict]:
        import torch

        idx = np.asarray(indices, dtype=np.int64)
        batch: dict[str, torch.Tensor] = {"index": torch.from_numpy(idx)}
        if self.reader is not None:
            batch["image"] = self.images(idx)
        if self.genes is not None:
            batch["gene_idx"] = torch.from_numpy(self.gene_idx[idx])
            batch["gene_val"] = torch.from_numpy(self.gene_val[idx])
            batch["gene_mask"] = torch.from_numpy(self.gene_mask[idx])
            batch["expr"] = torch.from_numpy(self.expr[idx])
            batch["depth"] = torch.from_numpy(self.depth[idx])
        return [{k: v[j] for k, v in batch.items()} for j in range(len(idx))]

    def __getitem__(self, i: int) -> dict:
        return self.__getitems__([i])[0]


def make_loader(
    dataset: SpotDataset,
    *,
    batch_size: int,
    shuffle: bool = False,
    drop_last: bool = False,
    num_workers: int = 0,
    seed: int = 0,
    **kwargs,
):
    """A DataLoader that hands whole batches of indices to :meth:`SpotDataset.__getitems__` (one read per batch)."""
    import torch
    from torch.utils.data import DataLoader

    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        drop_last=drop_last,
        num_workers=num_workers,
        worker_init_fn=worker_init_fn if num_workers > 0 else None,
        generator=generator,
        persistent_workers=num_workers > 0,
        **kwargs,
    )
