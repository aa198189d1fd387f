"""``ct.tl.retrieve``: cross-modal nearest neighbours (image -> gene sentences, or back) and Recall@k."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd

from .. import _constants as C
from .._logging import logger
from .._metrics import self_rank
from ._data import copy_data
from ._utils import check_free, record, resolve_table

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData


def retrieve(
    data,
    model=None,
    *,
    query: Literal["image", "gene"] = "image",
    k: int = C.RECALL_K,
    use_rep: str = C.EMBED_KEY,
    table_key: str = C.TABLE_KEY,
    tiles_key: str = C.TILES_KEY,
    batch_size: int = C.BATCH_SIZE,
    dihedral: bool = C.EMBED_DIHEDRAL,
    device: str | None = None,
    num_workers: int | None = None,
    key_added: str = C.RETRIEVAL_KEY,
    overwrite: bool = False,
    copy: bool = False,
) -> pd.DataFrame | AnnData | SpatialData:
    """Cross-modal retrieval between the spots' image and gene-sentence embeddings, with Recall@k.

    For each spot, the ``k`` spots whose embedding of the other modality is most similar (cosine) to its own
    ``query`` embedding. Recall@k is the share of spots that retrieve themselves (EVAL.md; ties count as misses).

    Parameters
    ----------
    data
        SpatialData or AnnData; embeddings from :func:`comtip.tl.embed` (computed with ``model`` when missing).
    model
        Used only when the embeddings are missing; ``None`` = the current model.
    query
        ``"image"`` (image -> gene sentences) or ``"gene"`` (gene sentence -> images).
    k
        Neighbours per spot.
    use_rep
        Prefix of the embeddings in ``.obsm``.
    table_key
        Table of a SpatialData.
    tiles_key, batch_size, dihedral, device, num_workers
        Passed to :func:`comtip.tl.embed` when the embeddings are missing (same defaults).
    key_added
        ``.obsm`` key of the neighbour indices.
    overwrite
        Replace an existing key.
    copy
        Work on a copy of ``data`` (an AnnData's :meth:`~anndata.AnnData.copy`; for a SpatialData, a new object with
        copies of its tables, sharing its images and shapes) and return it; ``data`` is left as it was.

    Returns
    -------
    With ``copy=False``, a DataFrame with, per spot, its neighbours (``neighbor_1`` …, obs names), their
    similarities and ``hit`` (whether the spot found itself); with ``copy=True``, the copy (the neighbours are in
    its ``.obsm[key_added]`` and Recall@k in its ``.uns``; call without ``copy`` for the DataFrame). Sets
    ``.obsm[key_added]`` (n_obs x k positions, -1 for spots without both embeddings) and
    ``.uns['comtip']['retrieve']`` with ``recall_at_k``, ``chance`` and the model that made the embeddings
    (``model``, ``comtip_version``, ``weights_sha256``, copied from ``.uns['comtip']['embed']``).

    Examples
    --------
    >>> ct.tl.embed(test)
    >>> ct.tl.retrieve(test, k=5)["hit"].mean()
    """
    from ._embed import embed

    if query not in ("image", "gene"):
        msg = f"query must be 'image' or 'gene', got {query!r}."
        raise ValueError(msg)
    if copy:
        data = copy_data(data)
    adata = resolve_table(data, table_key)
    keys = (f"{use_rep}{C.IMAGE_EMBED_SUFFIX}", f"{use_rep}{C.GENE_EMBED_SUFFIX}")
    check_free(adata.obsm, [key_added], where=".obsm", overwrite=overwrite)
    if not all(kk in adata.obsm for kk in keys):
        logger.info("embeddings missing: running ct.tl.embed first")
        embed(
            data,
            model,
            table_key=table_key,
            tiles_key=tiles_key,
            batch_size=batch_size,
            dihedral=dihedral,
            device=device,
            num_workers=num_workers,
            key_added=use_rep,
            overwrite=True,
        )
        if not all(kk in adata.obsm for kk in keys):
            msg = f"Retrieval needs both {keys}; these spots have no expression over the model's panel, so no gene embedding."
            raise ValueError(msg)
    img, gene = (np.asarray(adata.obsm[kk], dtype=np.float64) for kk in keys)
    ok = np.flatnonzero(np.isfinite(img).all(1) & np.isfinite(gene).all(1))
    if len(ok) < 2:
        msg = f"Only {len(ok)} spots have both an image and a gene embedding; retrieval needs at least 2."
        raise ValueError(msg)
    q, keys_emb = (img[ok], gene[ok]) if query == "image" else (gene[ok], img[ok])
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    keys_emb = keys_emb / np.linalg.norm(keys_emb, axis=1, keepdims=True)
    sim = q @ keys_emb.T
    k_eff = min(k, len(ok))
    top = np.argsort(-sim, axis=1, kind="stable")[:, :k_eff]
    hit = self_rank(sim) < k_eff  # Recall@k as EVAL.md counts it (ties are misses)
    nbr = np.full((adata.n_obs, k_eff), -1, dtype=np.int64)
    nbr[ok] = ok[top]
    adata.obsm[key_added] = nbr
    names = adata.obs_names.to_numpy()
    df = pd.DataFrame(index=pd.Index(names[ok], name="spot"))
    for j in range(k_eff):
        df[f"neighbor_{j + 1}"] = names[ok[top[:, j]]]
        df[f"similarity_{j + 1}"] = np.take_along_axis(sim, top[:, j : j + 1], 1).ravel()
    df["hit"] = hit
    recall = float(hit.mean())
    # the embeddings' provenance: which model wrote them
    made_by = adata.uns.get(C.UNS_KEY, {}).get("embed", {})
    provenance = {k: made_by[k] for k in ("model", "comtip_version", "weights_sha256") if k in made_by}
    record(
        adata,
        "retrieve",
        {
            "query": query,
            "k": k_eff,
            "recall_at_k": recall,
            "chance": k_eff / len(ok),
            "n_spots": len(ok),
            "use_rep": use_rep,
            **provenance,
        },
    )
    logger.info(
        "Recall@%d (%s -> %s) = %.3f (chance %.3f)",
        k_eff,
        query,
        "gene" if query == "image" else "image",
        recall,
        k_eff / len(ok),
    )
    return data if copy else df
