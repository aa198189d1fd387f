"""``ct.tl.predict_expression``: zero-shot from gene–value prompts, or from a reference (retrieval, probe)."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd

from .. import _constants as C
from .._logging import logger
from .._settings import settings
from ._data import copy_data, resolve_spots
from ._embed import check_spatial_context, image_embeddings, stored_image_embeddings, with_spatial_context
from ._utils import check_free, get_model, model_provenance, record, renamed_keyword

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData


def _new_gene_levels(model, n: int, n_levels: int) -> np.ndarray:
    """Levels for genes outside the panel: the median level curve of the panel's genes."""
    lv = model.value_levels.detach().cpu().numpy()
    curve = np.median(lv, axis=0)
    if n_levels != lv.shape[1]:
        curve = np.interp(np.linspace(0, 1, n_levels), np.linspace(0, 1, lv.shape[1]), curve)
    curve = np.maximum.accumulate(curve + np.arange(n_levels) * 1e-4)
    return np.tile(curve.astype(np.float32), (n, 1))


def _zero_shot(model, prompt_emb: np.ndarray, genes: list[str], *, descriptions, n_levels: int | None) -> np.ndarray:
    """Zero-shot predictions (N, G) of image prompt-space embeddings; genes outside the panel from their description."""
    import torch

    from ..pp import gene_text_embeddings

    new = [g for g in genes if g not in set(model.genes)]
    m = model
    if new:
        if model.config.gene_embedding == "learned":
            msg = f"Genes {new[:10]} are not in the model's panel, and this model learned one vector per panel gene (gene_embedding='learned'), so it cannot prompt them."
            raise ValueError(msg)
        text = gene_text_embeddings(
            new, model=model.training_summary.get("text_model", C.TEXT_MODEL), descriptions=descriptions
        )
        m = copy.deepcopy(model)  # the user's model keeps its panel
        m.add_genes(
            new, torch.from_numpy(text), torch.from_numpy(_new_gene_levels(model, len(new), model.n_value_levels))
        )
        logger.info("prompting %d genes outside the panel from their descriptions: %s", len(new), new[:10])
    ids = m.gene_index(genes)
    levels = m.value_levels[ids]
    if n_levels is not None and n_levels != levels.shape[1]:
        lv = levels.cpu().numpy()
        grid = np.linspace(0, 1, n_levels)
        lv = np.stack([np.interp(grid, np.linspace(0, 1, lv.shape[1]), row) for row in lv]).astype(np.float32)
        levels = torch.from_numpy(lv).to(m.device)
        prompts = m.prompt_embeddings(ids, levels)
    else:
        prompts = m.prompt_embeddings(ids)
    with torch.no_grad():
        pred = m.predict_from_image_embeddings(torch.from_numpy(prompt_emb).to(m.device), prompts, levels, gene_ids=ids)
    return pred.float().cpu().numpy()


def _reference(
    model,
    reference,
    genes: list[str],
    *,
    table_key: str,
    tiles_key: str,
    layer,
    batch_size,
    device,
    dihedral,
    spatial_context: float = 0.0,
    num_workers: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Image embeddings (n_ref, d) and log-normalised expression (n_ref, G) of the reference spots."""
    from ..pp import log_normalized

    if reference is None:
        ref = getattr(model, "reference", None)
        if not ref:
            msg = "This model stores no training reference; pass reference= (a SpatialData/AnnData with tiles and counts)."
            raise ValueError(msg)
        missing = [g for g in genes if g not in set(model.genes)]
        if missing:
            msg = f"Genes {missing[:10]} are not in the model's panel, so its training reference has no expression for them; pass reference=."
            raise ValueError(msg)
        idx = [model.genes.index(g) for g in genes]
        emb = ref["embeddings"].cpu().numpy()
        if spatial_context:
            from .._spatial import neighbour_average

            emb = neighbour_average(
                emb, ref["xy"].cpu().numpy(), ref["section"].cpu().numpy(), weight=spatial_context
            ).astype(np.float32)
        return emb, ref["expression"].cpu().numpy()[:, idx]
    rspots = resolve_spots(reference, table_key=table_key, tiles_key=tiles_key, model=model)
    pos, names = rspots.tiled_rows()
    emb = image_embeddings(
        model,
        rspots,
        names,
        batch_size=batch_size,
        device=device,
        dihedral=dihedral,
        num_workers=settings.num_workers if num_workers is None else num_workers,
        prompt=False,
        spatial_context=spatial_context,
    )["image"]
    tab = rspots.table
    missing = [g for g in genes if g not in set(tab.var_names)]
    if missing:
        msg = f"Genes {missing[:10]} are not measured in the reference; predict genes the reference measures."
        raise ValueError(msg)
    expr = log_normalized(tab[pos], layer=layer, genes=genes).toarray()
    return emb, expr


@renamed_keyword("layer_added", "key_added")
def predict_expression(
    data,
    model=None,
    *,
    genes: Sequence[str] | None = None,
    method: Literal["zero_shot", "retrieval", "probe"] = "zero_shot",
    reference=None,
    n_levels: int | None = None,
    k: int = C.RETRIEVAL_NEIGHBOURS,
    descriptions: Mapping[str, str] | None = None,
    layer: str | None = None,
    dihedral: bool = C.PREDICT_DIHEDRAL,
    spatial_context: float = C.SPATIAL_CONTEXT,
    table_key: str = C.TABLE_KEY,
    tiles_key: str = C.TILES_KEY,
    batch_size: int = C.BATCH_SIZE,
    device: str | None = None,
    num_workers: int | None = None,
    key_added: str = C.PRED_LAYER,
    overwrite: bool = False,
    copy: bool = False,
) -> str | AnnData | SpatialData:
    """Predict gene expression from histology alone.

    ``"zero_shot"`` (default) scores, for each gene, single-gene prompts at K value levels against the spot's image
    embedding (averaged over the 8 dihedral transforms) and returns the softmax(cos / τ_read)-weighted mean of the
    levels; no expression of ``data`` is read, and no reference bank is used. Genes outside the model's panel are
    prompted from their description. ``"retrieval"`` is the similarity-weighted mean expression of the ``k``
    nearest reference spots (BLEEP/Loki style); ``"probe"`` a ridge regression from image embeddings fitted on the
    reference (HEST's probe: scaler, PCA(256), ridge with α by 5-fold CV).

    The image embeddings that :func:`comtip.tl.embed` stored are used instead of encoding the tiles again when they
    are exactly what this call would compute: same model weights, ``dihedral``, ``batch_size``, device and tiles
    (so after ``ct.tl.embed(data, dihedral=True)`` with the defaults otherwise); the predictions are the same.

    Parameters
    ----------
    data
        SpatialData with tiles (:func:`comtip.pp.spot_tiles`), or AnnData with ``uns['spatial']``; expression is
        not needed (an image-only table works).
    model
        A :class:`comtip.CoMTIP`; ``None`` = the current model.
    genes
        Genes to predict; default the model's panel.
    method
        ``"zero_shot"``, ``"retrieval"`` or ``"probe"``.
    reference
        Labelled spots for ``"retrieval"``/``"probe"`` (SpatialData with tiles or AnnData); default the model's
        training spots, stored with the model.
    n_levels
        Number of prompt levels per gene (default: the model's K).
    k
        Neighbours of ``"retrieval"``.
    descriptions
        ``{gene: text}`` for genes without an entry in comtip's gene-text table.
    layer
        Raw-count layer of the reference.
    dihedral
        Average image embeddings over the 8 flips/rotations (8x compute; +0.02–0.03 PCC measured on HER2ST). On by
        default here, off by default in :func:`comtip.tl.embed`.
    spatial_context
        Mix each spot's image embedding with the mean of its neighbours' before predicting:
        ``(1 - spatial_context) * own + spatial_context * mean(neighbours)``, where the neighbours are the spots of
        the same section within 1.5 spot spacings (the 8 around a spot of an ST grid, the 6 of a Visium grid).
        Expression varies smoothly across tissue, so a spot's surroundings help: the default 0.5 was chosen on the
        validation section C5 and raised zero-shot and probe correlations on HER2ST's held-out C6 in three of
        three training seeds (see the benchmarks page). 0 predicts each spot from its own tile alone. For
        ``"retrieval"``/``"probe"`` the reference spots are mixed the same way (the model's stored training
        reference keeps their positions; with a model saved by an earlier comtip, whose reference has none, each
        spot is predicted alone, with a warning). The neighbours come from squidpy's radius graph
        (:func:`squidpy.gr.spatial_neighbors_radius`, per section); the graph is written to
        ``.obsp["comtip_spatial_connectivities"]`` so that it can be inspected (replaced by each prediction with
        spatial context: it depends only on the tiles).
    table_key, tiles_key
        Table and tiles of a SpatialData.
    batch_size
        Tiles per forward pass.
    device
        ``None``: CUDA when available, else CPU.
    num_workers
        DataLoader workers (default :attr:`comtip.settings.num_workers`).
    key_added
        Where predictions go (formerly ``layer_added``, still accepted with a :class:`DeprecationWarning`).
    overwrite
        Replace existing keys.
    copy
        Work on a copy of ``data`` (an AnnData's :meth:`~anndata.AnnData.copy`; for a SpatialData, a new object with
        copies of its tables, sharing its images and shapes) and return it; ``data`` is left as it was.

    Returns
    -------
    With ``copy=False``, ``key_added``; with ``copy=True``, the copy. Predictions of measured genes go to
    ``.layers[key_added]`` (n_obs x n_vars, NaN for genes and spots not predicted); genes not in ``var_names`` go
    to ``.obsm[key_added]`` as a DataFrame (spots x genes). A table without any gene (image-only data) is replaced
    by one whose ``var_names`` are the predicted genes, with ``X`` left empty (``None``) and the predictions in
    ``.layers[key_added]``. ``.uns['comtip']['predict_expression']`` records the method, genes and model, and
    whether the embeddings of :func:`comtip.tl.embed` were used (``image_embeddings_reused``).

    Examples
    --------
    >>> ct.tl.predict_expression(test, genes=["ERBB2", "KRT19"])
    'comtip_pred'
    >>> predicted = ct.tl.predict_expression(test, genes=["ERBB2"], copy=True)  # test is left as it was
    """
    model = get_model(model)
    if method not in ("zero_shot", "retrieval", "probe"):
        msg = f"method must be 'zero_shot', 'retrieval' or 'probe', got {method!r}."
        raise ValueError(msg)
    genes = list(model.genes) if genes is None else [str(g) for g in ([genes] if isinstance(genes, str) else genes)]
    if not genes:
        msg = "genes is empty."
        raise ValueError(msg)
    if len(set(genes)) != len(genes):
        msg = "genes has duplicates."
        raise ValueError(msg)
    check_spatial_context(spatial_context)
    num_workers = settings.num_workers if num_workers is None else num_workers
    stored = getattr(model, "reference", None)
    if spatial_context and method != "zero_shot" and reference is None and stored and "xy" not in stored:
        warnings.warn(
            f"This model's stored training reference has no spot positions (it was saved by an earlier comtip), so "
            f"its spots cannot be mixed with their neighbours: predicting each spot alone (spatial_context=0 instead "
            f"of {spatial_context}). Pass reference= (a SpatialData/AnnData with tiles and counts) for spatial context, "
            "or retrain the model.",
            UserWarning,
            stacklevel=3,  # through renamed_keyword's wrapper
        )
        spatial_context = 0.0
    if method == "zero_shot":
        # fail early on genes that cannot be prompted, before any heavy work
        from ..pp import gene_text

        new = [g for g in genes if g not in set(model.genes)]
        if new:
            gene_text(new, descriptions=descriptions)

    if copy:
        data = copy_data(data)
    spots = resolve_spots(data, table_key=table_key, tiles_key=tiles_key, model=model)
    adata = spots.table
    image_only = adata.n_vars == 0
    if image_only and adata is data:
        msg = "This AnnData has no genes, so predictions cannot go into its layers; pass a SpatialData (ct.io.from_anndata(adata))."
        raise ValueError(msg)
    measured = [g for g in genes if g in set(adata.var_names)] if not image_only else []
    unmeasured = [g for g in genes if g not in set(measured)]
    if not image_only:
        check_free(adata.layers, [key_added] if measured else [], where=".layers", overwrite=overwrite)
        check_free(adata.obsm, [key_added] if unmeasured else [], where=".obsm", overwrite=overwrite)

    pos, names = spots.tiled_rows()
    if len(pos) == 0:
        msg = f"None of the {adata.n_obs} spots has a tile in {tiles_key!r}; run ct.pp.spot_tiles first."
        raise ValueError(msg)
    provenance = model_provenance(model)
    emb = stored_image_embeddings(
        adata,
        spots,
        pos,
        names,
        weights_sha256=provenance["weights_sha256"],
        dihedral=dihedral,
        batch_size=batch_size,
        device=device,
        prompt=method == "zero_shot",
    )
    reused = emb is not None
    if reused:
        emb = with_spatial_context(emb, spots, names, spatial_context)
    else:
        emb = image_embeddings(
            model,
            spots,
            names,
            batch_size=batch_size,
            device=device,
            dihedral=dihedral,
            num_workers=num_workers,
            prompt=method == "zero_shot",
            spatial_context=spatial_context,
        )
    if method == "zero_shot":
        pred = _zero_shot(model, emb["prompt"], genes, descriptions=descriptions, n_levels=n_levels)
        extra = {"n_levels": n_levels or model.n_value_levels}
    else:
        ref_emb, ref_expr = _reference(
            model,
            reference,
            genes,
            table_key=table_key,
            tiles_key=tiles_key,
            layer=layer,
            batch_size=batch_size,
            device=device,
            dihedral=dihedral,
            spatial_context=spatial_context,
            num_workers=num_workers,
        )
        if method == "retrieval":
            from ._reference import knn_retrieval

            pred = knn_retrieval(ref_emb, ref_expr, emb["image"], k=k)
            extra = {"k": k}
        else:
            from ._reference import ridge_probe

            pred, alpha = ridge_probe(ref_emb, ref_expr, emb["image"])
            extra = {"alpha": alpha}
        extra["reference"] = "model training spots" if reference is None else "given"
    pred = np.asarray(pred, dtype=np.float32)

    full = np.full((adata.n_obs, len(genes)), np.nan, dtype=np.float32)
    full[pos] = pred
    if image_only:
        adata = _replace_image_only_table(data, adata, genes, full, table_key=table_key, layer_added=key_added)
    else:
        col = {g: i for i, g in enumerate(genes)}
        if measured:
            layer_arr = np.full(adata.shape, np.nan, dtype=np.float32)
            vi = adata.var_names.get_indexer(measured)
            layer_arr[:, vi] = full[:, [col[g] for g in measured]]
            adata.layers[key_added] = layer_arr
        if unmeasured:
            adata.obsm[key_added] = pd.DataFrame(
                full[:, [col[g] for g in unmeasured]], index=adata.obs_names, columns=unmeasured
            )
    graph_key = None
    if spatial_context and not image_only:
        graph_key = _store_spatial_graph(adata, spots, pos, names)
    record(
        adata,
        "predict_expression",
        {
            "method": method,
            "genes": genes,
            "n_measured": len(measured),
            "n_unmeasured": len(unmeasured),
            "dihedral": dihedral,
            "spatial_context": spatial_context,
            "layer_added": key_added,
            "image_embeddings_reused": reused,
            "spatial_graph": graph_key,
            **extra,
            **provenance,
        },
    )
    where = [f".layers[{key_added!r}] ({len(measured)} genes)"] if measured or image_only else []
    where += [f".obsm[{key_added!r}] ({len(unmeasured)} genes)"] if unmeasured and not image_only else []
    logger.info("%s predictions of %d spots in %s", method, len(pos), " and ".join(where))
    return data if copy else key_added


def _store_spatial_graph(adata, spots, pos: np.ndarray, names: list[str]) -> str:
    """Write the neighbour graph the spatial context averaged over to ``.obsp``, for users to inspect; its key.

    The graph of :func:`comtip._spatial.spatial_graph` (squidpy's radius graph per section), over the table's rows
    (spots without a tile have no neighbours). It depends only on the tiles, so a later prediction replaces it.
    """
    from scipy import sparse

    from .._spatial import spatial_graph

    adj = spatial_graph(*spots.centres(names)).tocoo()
    n = adata.n_obs
    adata.obsp[C.SPATIAL_GRAPH_KEY] = sparse.csr_matrix((adj.data, (pos[adj.row], pos[adj.col])), shape=(n, n))
    return C.SPATIAL_GRAPH_KEY


def _replace_image_only_table(data, adata, genes, full, *, table_key: str, layer_added: str):
    """An image-only table (no genes) becomes one whose genes are the predicted ones, X empty, predictions in a layer."""
    import anndata as ad

    new = ad.AnnData(
        X=None,
        obs=adata.obs.copy(),
        var=pd.DataFrame(index=pd.Index(genes, dtype=str)),
        uns=dict(adata.uns),
        obsm=dict(adata.obsm),
    )
    new.layers[layer_added] = full
    new.uns[C.INPUT_KEY] = {"x_is_counts": False, "x_transform": "none: image-only data, X is empty"}
    from ._utils import is_spatialdata

    if is_spatialdata(data):
        from spatialdata.models import TableModel

        attrs = adata.uns.get("spatialdata_attrs", {})
        new.uns.pop("spatialdata_attrs", None)
        data.tables[table_key] = TableModel.parse(
            new, region=attrs.get("region"), region_key=attrs.get("region_key"), instance_key=attrs.get("instance_key")
        )
        return data.tables[table_key]
    msg = "An AnnData without genes cannot be given new genes in place; pass a SpatialData (ct.io.from_anndata)."
    raise ValueError(msg)
