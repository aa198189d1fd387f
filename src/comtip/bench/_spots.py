"""Spots and their image embeddings as the protocol reads them: tiled spots of a SpatialData, embedded in batches."""

from __future__ import annotations

import numpy as np

from .. import _constants as C
from ..tl._data import Spots


def load_spots(sdata, *, table_key: str = C.TABLE_KEY, tiles_key: str = C.TILES_KEY) -> tuple[Spots, list[str]]:
    """The spots of a SpatialData that have a tile, as :func:`evaluate` reads them.

    Tiles are made first (:func:`comtip.pp.spot_tiles` with its defaults: EVAL.md's 112 µm at 224 px) when
    ``sdata`` has none under ``tiles_key``.

    Parameters
    ----------
    sdata
        SpatialData with images, spots and the table.
    table_key
        Its table.
    tiles_key
        Shapes element with the tiles.

    Returns
    -------
    ``(spots, obs_names)``: the :class:`Spots` of the table and the obs names of the spots that have a tile, in
    table order.

    Examples
    --------
    >>> spots, names = ct.bench.load_spots(sdata)
    >>> spots.table[names].n_obs
    """
    from .._spatial import get_table

    if tiles_key not in sdata.shapes:
        from ..pp import spot_tiles

        spot_tiles(sdata, key_added=tiles_key)
    table = get_table(sdata, table_key)
    spots = Spots(sdata, table, table.obs_names.to_numpy(dtype=object), tiles_key)
    _, names = spots.tiled_rows()
    return spots, names


def resolve_spots(
    data, *, table_key: str = C.TABLE_KEY, tiles_key: str = C.TILES_KEY, model=None, need_tiles: bool = True
) -> Spots:
    """The spots of ``data`` with their tiles, checked as :mod:`comtip.tl` checks them.

    Parameters
    ----------
    data
        SpatialData (its tiles must exist: :func:`comtip.pp.spot_tiles`), or AnnData with scanpy's ``uns['spatial']``
        (converted on the fly, tiles made with the model's tile size).
    table_key
        Table of a SpatialData.
    tiles_key
        Shapes element with the tiles.
    model
        The model whose tile size an AnnData's tiles take, and against which existing tiles are checked.
    need_tiles
        Require (and check) the tiles.

    Returns
    -------
    The :class:`Spots`; ``spots.tiled_rows()`` gives the positions and obs names of those with a tile.
    """
    from ..tl._data import resolve_spots as _resolve_spots

    return _resolve_spots(data, table_key=table_key, tiles_key=tiles_key, model=model, need_tiles=need_tiles)


def image_embeddings(
    model,
    spots: Spots,
    obs_names: list[str],
    *,
    batch_size: int = 64,
    device: str | None = None,
    dihedral: bool = True,
    num_workers: int = 0,
    prompt: bool = True,
    spatial_context: float = 0.0,
) -> dict[str, np.ndarray]:
    """CoMTIP image embeddings of the tiles of ``obs_names``, in the contrastive and the prompt space.

    The loop of :func:`comtip.tl.embed` and :func:`comtip.tl.predict_expression`, without writing anything.

    Parameters
    ----------
    model
        A :class:`comtip.CoMTIP`.
    spots
        From :func:`load_spots` or :func:`resolve_spots`.
    obs_names
        The spots to embed (they must have a tile).
    batch_size
        Tiles per forward pass.
    device
        ``None``: CUDA when available, else CPU.
    dihedral
        Average each embedding over the 8 flips/rotations of its tile.
    num_workers
        DataLoader workers.
    prompt
        Also compute the prompt-space embeddings (those zero-shot prediction reads).
    spatial_context
        Mix each embedding with the mean of its neighbouring spots' (among ``obs_names``, same section); 0 = alone.

    Returns
    -------
    ``{"image": (n, d), "prompt": (n, d)}`` float32 arrays in the order of ``obs_names`` (``"prompt"`` only with
    ``prompt``).
    """
    from ..tl._embed import image_embeddings as _image_embeddings

    return _image_embeddings(
        model,
        spots,
        obs_names,
        batch_size=batch_size,
        device=device,
        dihedral=dihedral,
        num_workers=num_workers,
        prompt=prompt,
        spatial_context=spatial_context,
    )


def with_spatial_context(
    arrays: dict[str, np.ndarray], spots: Spots, obs_names: list[str], spatial_context: float
) -> dict[str, np.ndarray]:
    """Each array's rows mixed with the mean of their spots' spatial neighbours (same section, within 1.5 spacings).

    Parameters
    ----------
    arrays
        ``{name: (n, d)}``, rows in the order of ``obs_names``.
    spots
        The spots ``obs_names`` belong to.
    obs_names
        One per row.
    spatial_context
        ``(1 - w) * own + w * mean(neighbours)``; 0 returns ``arrays`` unchanged.

    Returns
    -------
    ``{name: mixed array}`` (the same dtypes), from one neighbour graph for all arrays.
    """
    from ..tl._embed import with_spatial_context as _with_spatial_context

    return _with_spatial_context(arrays, spots, obs_names, spatial_context)


def embed_gene_sentences(model, adata, *, device: str | None = None) -> np.ndarray:
    """Gene-sentence embeddings of an AnnData's spots over the model's panel, in the contrastive space.

    What EVAL.md's shared-space Recall@5 ranks each spot's image embedding against.

    Parameters
    ----------
    model
        A :class:`comtip.CoMTIP`.
    adata
        Spots x genes with raw counts (log-normalised as :func:`comtip.pp.log_normalized` does).
    device
        ``None``: CUDA when available, else CPU.

    Returns
    -------
    ``(n_obs, d)`` float32; NaN rows for spots without any of the panel's genes.
    """
    from ..data import gene_sentences
    from ..model._inference import embed_genes
    from ..pp import log_normalized

    expr = log_normalized(adata, genes=model.genes).toarray()
    gidx, gval, gmask = gene_sentences(expr, model.config.sentence_length)
    import torch

    batches = (
        {
            "gene_idx": torch.from_numpy(gidx[i : i + 256]),
            "gene_val": torch.from_numpy(gval[i : i + 256]),
            "gene_mask": torch.from_numpy(gmask[i : i + 256]),
        }
        for i in range(0, len(gidx), 256)
    )
    emb = embed_genes(model, batches, device=device)
    emb[~gmask.any(1)] = np.nan
    return emb
