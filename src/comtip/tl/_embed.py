"""``ct.tl.embed``: image and gene-sentence embeddings of spots into ``.obsm``."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import numpy as np

from .. import _constants as C
from .._checks import check_expression
from .._logging import logger
from .._settings import settings
from ._data import copy_data, resolve_spots
from ._utils import check_free, get_model, model_provenance, record

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData


def image_embeddings(
    model,
    spots,
    obs_names: list[str],
    *,
    batch_size: int,
    device,
    dihedral: bool,
    num_workers: int,
    prompt: bool = True,
    spatial_context: float = 0.0,
) -> dict[str, np.ndarray]:
    """Run the image tower over the tiles of ``obs_names`` (read in batches); both embedding spaces.

    With ``spatial_context`` > 0, each embedding is mixed with the mean of its neighbouring spots' embeddings (among
    ``obs_names``, same section; :func:`comtip._spatial.neighbour_means`).
    """
    from .._progress import progress
    from ..data import SpotDataset, make_loader
    from ..model._inference import embed_images

    ds = SpotDataset(spots.sdata, genes=None, tiles_key=spots.tiles_key, obs_names=obs_names)
    # read in strips of image chunks: each chunk is decoded about once, with a cache that does not grow with the slide
    order = ds.reader.read_order()
    from torch.utils.data import Subset

    loader = make_loader(Subset(ds, order), batch_size=batch_size, num_workers=num_workers)
    out = embed_images(
        model,
        progress(loader, desc="embedding tiles", total=len(loader)),
        dihedral=dihedral,
        device=device,
        prompt=prompt,
    )
    inv = np.empty_like(order)
    inv[order] = np.arange(len(order))
    return with_spatial_context({k: v[inv] for k, v in out.items()}, spots, obs_names, spatial_context)


def check_spatial_context(spatial_context: float) -> None:
    """``spatial_context`` must be a share in [0, 1]."""
    try:
        ok = 0.0 <= float(spatial_context) <= 1.0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        msg = (
            f"spatial_context must be between 0 (each spot alone) and 1 (only its neighbours' mean), got "
            f"{spatial_context!r}; 0.5 mixes a spot's own image embedding half and half with its neighbours'."
        )
        raise ValueError(msg)


def with_spatial_context(
    arrays: dict[str, np.ndarray], spots, obs_names: list[str], spatial_context: float
) -> dict[str, np.ndarray]:
    """Each array's rows mixed with their spatial neighbours' mean (unchanged when ``spatial_context`` is 0)."""
    if not spatial_context:
        return arrays
    from .._spatial import mix_with_neighbours, neighbour_means

    means = neighbour_means(*spots.centres(obs_names))  # one neighbour graph for every array
    return {k: mix_with_neighbours(v, means, spatial_context).astype(v.dtype, copy=False) for k, v in arrays.items()}


def stored_image_embeddings(
    adata,
    spots,
    pos: np.ndarray,
    names: list[str],
    *,
    weights_sha256: str,
    dihedral: bool,
    batch_size: int,
    device,
    prompt: bool,
) -> dict[str, np.ndarray] | None:
    """The image embeddings of ``names`` that :func:`embed` stored, if exactly what :func:`image_embeddings` gives now.

    They are used when ``.uns['comtip']['embed']`` says they were made by the same weights (checksum), with the same
    ``dihedral``, ``batch_size`` and device, from the same tiles of the same spots (a digest of the spots' names and
    tile boxes), and every one of these spots has them. Spatial context is not in them (embed stores each spot's
    own embedding): the caller mixes them as :func:`image_embeddings` does.
    """
    from collections.abc import Mapping

    from ..model._inference import pick_device

    rec = adata.uns.get(C.UNS_KEY, {}).get("embed")
    if not isinstance(rec, Mapping) or "prompt_key" not in rec or "keys" not in rec:
        return None
    want = {
        "weights_sha256": weights_sha256,
        "dihedral": bool(dihedral),
        "batch_size": int(batch_size),
        "device": str(pick_device(device)),
        "tiles_key": spots.tiles_key,
        "n_spots_with_tiles": len(pos),
    }
    if any(k not in rec or not bool(rec[k] == v) for k, v in want.items()):
        return None
    keys = {"image": str(list(rec["keys"])[0])}
    if prompt:
        keys["prompt"] = str(rec["prompt_key"])
    out = {}
    for name, key in keys.items():
        arr = adata.obsm.get(key)
        if not isinstance(arr, np.ndarray) or arr.ndim != 2 or arr.shape[0] != adata.n_obs:
            return None
        arr = np.asarray(arr[pos], dtype=np.float32)
        if not np.isfinite(arr).all():
            return None
        out[name] = arr
    if rec.get("tiles_digest") != spots.tiles_digest(names):
        return None
    logger.info("using the image embeddings of ct.tl.embed in .obsm%s", list(keys.values()))
    return out


def embed(
    data,
    model=None,
    *,
    layer: str | None = None,
    table_key: str = C.TABLE_KEY,
    tiles_key: str = C.TILES_KEY,
    batch_size: int = C.BATCH_SIZE,
    dihedral: bool = C.EMBED_DIHEDRAL,
    device: str | None = None,
    num_workers: int | None = None,
    key_added: str = C.EMBED_KEY,
    overwrite: bool = False,
    copy: bool = False,
) -> list[str] | AnnData | SpatialData:
    """Embed spots: image tiles and gene sentences into CoMTIP's shared space.

    Parameters
    ----------
    data
        SpatialData with tiles (:func:`comtip.pp.spot_tiles`), or an AnnData with scanpy's ``uns['spatial']``.
    model
        A :class:`comtip.CoMTIP`; ``None`` = the current model.
    layer
        Raw-count layer for the gene sentences (default ``layers['counts']``, else ``X``).
    table_key
        Table of the spots (SpatialData).
    tiles_key
        Shapes element with the tiles (SpatialData).
    batch_size
        Tiles per forward pass.
    dihedral
        Average each image embedding over the 8 flips/rotations (8x the compute). Off by default here, on by
        default in :func:`comtip.tl.predict_expression`.
    device
        ``None``: CUDA when available, else CPU.
    num_workers
        DataLoader workers (default :attr:`comtip.settings.num_workers`).
    key_added
        Prefix of the ``.obsm`` keys.
    overwrite
        Replace existing keys.
    copy
        Work on a copy of ``data`` (an AnnData's :meth:`~anndata.AnnData.copy`; for a SpatialData, a new object with
        copies of its tables, sharing its images and shapes) and return it; ``data`` is left as it was.

    Returns
    -------
    With ``copy=False``, the keys written (the keys in the shared space, as before); with ``copy=True``, the copy.
    Written: ``.obsm['{key_added}_image']`` (n_obs x d; NaN rows for spots without a tile) and, when the spots
    have expression over the model's gene panel, ``.obsm['{key_added}_gene']`` (n_obs x d; NaN rows for spots
    without any panel gene); ``.obsm['{key_added}_image_prompt']`` (n_obs x d), the same tiles in the model's prompt
    space, which :func:`comtip.tl.predict_expression` uses instead of encoding the tiles again (same model, same
    ``dihedral``, ``batch_size``, device and tiles); it goes with ``'{key_added}_image'`` and is replaced with it. Parameters, the model's name, version and weights checksum,
    and a digest of the tiles go to ``.uns['comtip']['embed']``. The embeddings are each spot's own (no spatial
    context).

    Raises
    ------
    ValueError
        Duplicated spot or gene names, an empty table, NaN or negative counts (checked before the image tower
        runs), tiles smaller than one patch of a ViT tower, images that are not 8-bit RGB(A). Nothing is written.

    Warns
    -----
    UserWarning
        None of the model's panel genes is measured (only the image embeddings are written).

    Examples
    --------
    >>> ct.tl.embed(sdata)
    ['X_comtip_image', 'X_comtip_gene']
    >>> embedded = ct.tl.embed(adata, copy=True)  # adata is left as it was
    """
    from ..data import SpotDataset, make_loader
    from ..model._inference import embed_genes, pick_device

    model = get_model(model)
    if copy:
        data = copy_data(data)
    spots = resolve_spots(data, table_key=table_key, tiles_key=tiles_key, model=model)
    adata = spots.table
    keys = [f"{key_added}{C.IMAGE_EMBED_SUFFIX}", f"{key_added}{C.GENE_EMBED_SUFFIX}"]
    prompt_key = f"{key_added}{C.PROMPT_EMBED_SUFFIX}"
    # the prompt-space array goes with the image embedding: free when that is (replaced with it)
    check_free(adata.obsm, keys, where=".obsm", overwrite=overwrite)
    num_workers = settings.num_workers if num_workers is None else num_workers
    d = model.embed_dim

    pos, names = spots.tiled_rows()
    if len(pos) == 0:
        msg = f"None of the {adata.n_obs} spots has a tile in {tiles_key!r}; run ct.pp.spot_tiles on the images of these spots."
        raise ValueError(msg)
    measured = [g for g in model.genes if g in set(adata.var_names)]
    gene_table_key = table_key if table_key in spots.sdata.tables else C.TABLE_KEY
    if measured:
        # before the image tower runs: bad counts fail fast and nothing is written
        check_expression(spots.sdata.tables[gene_table_key], layer=layer, element=f"Table {gene_table_key!r}")
    elif adata.n_vars == 0:
        logger.info("image-only spots (no genes): only image embeddings are written")
    else:
        warnings.warn(
            f"None of the model's {model.n_genes} panel genes (e.g. {model.genes[:3]}) is among the {adata.n_vars} "
            f"genes of these spots (e.g. {list(adata.var_names[:3])}), so only image embeddings are written "
            f"(.obsm[{keys[0]!r}]). Check that var_names are gene symbols like the model's (comtip's readers "
            "harmonise them), or use a model trained on these genes.",
            UserWarning,
            stacklevel=2,
        )
    emb = image_embeddings(
        model,
        spots,
        names,
        batch_size=batch_size,
        device=device,
        dihedral=dihedral,
        num_workers=num_workers,
        prompt=True,  # the prompt head reads the same pooled features: kept for predict_expression
    )
    img = np.full((adata.n_obs, d), np.nan, dtype=np.float32)
    img[pos] = emb["image"]
    prompt = np.full((adata.n_obs, d), np.nan, dtype=np.float32)
    prompt[pos] = emb["prompt"]

    results = {keys[0]: img}
    if measured:
        rows = [r for r in spots.rows if r is not None]
        ds = SpotDataset(
            spots.sdata,
            genes=model.genes,
            table_key=gene_table_key,
            tiles_key=None,
            obs_names=rows,
            sentence_length=model.config.sentence_length,
            layer=layer,
        )
        has_genes = ds.gene_mask.any(axis=1)
        gene_emb = embed_genes(model, make_loader(ds, batch_size=C.GENE_BATCH_SIZE), device=device)
        gene = np.full((adata.n_obs, d), np.nan, dtype=np.float32)
        valid = np.flatnonzero([r is not None for r in spots.rows])
        gene[valid] = np.where(has_genes[:, None], gene_emb, np.nan)
        results[keys[1]] = gene
        logger.info("gene sentences over %d of the model's %d panel genes", len(measured), model.n_genes)
    for k, v in {**results, prompt_key: prompt}.items():
        adata.obsm[k] = v
    record(
        adata,
        "embed",
        {
            "keys": list(results),
            "dihedral": dihedral,
            "n_spots_with_tiles": len(pos),
            "prompt_key": prompt_key,
            # what predict_expression checks before it uses the stored embeddings
            "batch_size": batch_size,
            "device": str(pick_device(device)),
            "tiles_key": tiles_key,
            "tiles_digest": spots.tiles_digest(names),
            **model_provenance(model),
        },
    )
    logger.info("added %s", ", ".join(f".obsm[{k!r}]" for k in [*results, prompt_key]))
    return data if copy else list(results)
