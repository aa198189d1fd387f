"""EVAL.md's protocol in one call: CoMTIP zero-shot / retrieval / probe next to ImageNet baselines, same run."""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from .. import _constants as C
from .._logging import logger
from .._metrics import panel_metrics, profile_recall, recall_at_k
from ._predict import reference_predict, zero_shot
from ._spots import embed_gene_sentences, image_embeddings, load_spots, with_spatial_context

METHODS = (
    "comtip_zero_shot",
    "comtip_retrieval",
    "comtip_probe",
    "imagenet_probe",
    "imagenet_retrieval",
    "imagenet_probe_dihedral",
    "imagenet_retrieval_dihedral",
    "mean",
)


def evaluate(
    model,
    train,
    test,
    *,
    methods: Sequence[str] | None = None,
    shuffled_control: bool = True,
    dihedral: bool = True,
    spatial_context: float = C.SPATIAL_CONTEXT,
    table_key: str = C.TABLE_KEY,
    tiles_key: str = C.TILES_KEY,
    batch_size: int = 64,
    device: str | None = None,
    seed: int = 0,
) -> dict:
    """Score CoMTIP and the baselines of EVAL.md on ``test``, with panels from ``train`` (same run, same spots).

    Parameters
    ----------
    model
        The :class:`comtip.CoMTIP` to evaluate (it must not have seen ``test``).
    train
        SpatialData of the training sections (the panels HVG50/HEG250 and all reference-based methods use only these).
    test
        SpatialData of the evaluation sections.
    methods
        Subset of ``comtip_zero_shot, comtip_retrieval, comtip_probe, imagenet_probe, imagenet_retrieval,
        imagenet_probe_dihedral, imagenet_retrieval_dihedral, mean``. The ``*_dihedral`` baselines average the
        ImageNet features over the 8 flips/rotations of each tile, the test-time averaging that ``dihedral`` gives
        CoMTIP (EVAL.md's baselines use one view). ``None`` (default): all of them, less the ``*_dihedral``
        baselines when ``dihedral`` is off (CoMTIP then reads one view too).
    shuffled_control
        Also score ``comtip_zero_shot`` with the image embeddings shuffled across spots (should be ~0).
    dihedral
        Average CoMTIP image embeddings over the 8 dihedral transforms (as :func:`comtip.tl.predict_expression`
        does by default).
    spatial_context
        Mix every method's image features (CoMTIP's and ImageNet's, training and evaluation spots alike) with the
        mean of their neighbouring spots' (see :func:`comtip.tl.predict_expression`, whose default it shares). 0 is
        EVAL.md's protocol to the letter, each spot alone. CoMTIP's shared-space ``recall_at5`` ranks each spot's own
        image embedding either way, the one :func:`comtip.tl.embed` writes and :func:`comtip.tl.retrieve` ranks.

    table_key
        Table of both SpatialData objects.
    tiles_key
        Their tiles (made with :func:`comtip.pp.spot_tiles`' defaults where missing).
    batch_size
        Tiles per forward pass.
    device
        ``None``: CUDA when available, else CPU.
    seed
        Of the shuffled control's permutation.

    Returns
    -------
    ``{"methods": {name: {pcc_hvg50, pcc_heg250, pcc_hvg50_adj, pcc_heg250_adj, spearman_hvg50, spearman_heg250,
    mse_hvg50, mse_heg250, recall_at5}}, "panels": ..., "n_train_spots", "n_eval_spots", "dihedral",
    "spatial_context", "seconds": ...}``; metrics rounded to 4 decimals. ``comtip evaluate`` prints and writes it.

    Examples
    --------
    >>> train = ct.datasets.her2st(["C2", "C3", "C4", "C5"])
    >>> test = ct.datasets.her2st(["C6"])
    >>> res = ct.bench.evaluate(model, train, test)
    >>> res["methods"]["comtip_zero_shot"]["pcc_hvg50_adj"]
    """
    from ..pp import eval_panels, log_depth, log_normalized
    from ..tl._embed import check_spatial_context

    check_spatial_context(spatial_context)
    if methods is None:
        methods = METHODS if dihedral else tuple(m for m in METHODS if not m.endswith("_dihedral"))
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        msg = f"Unknown methods {unknown}; choose from {METHODS}."
        raise ValueError(msg)
    t0 = time.perf_counter()
    secs: dict[str, float] = {}
    tr_spots, tr_names = load_spots(train, table_key=table_key, tiles_key=tiles_key)
    te_spots, te_names = load_spots(test, table_key=table_key, tiles_key=tiles_key)
    tr_tab, te_tab = tr_spots.table[tr_names], te_spots.table[te_names]
    panels = eval_panels(tr_tab)
    genes = list(dict.fromkeys(panels["hvg50"] + panels["heg250"]))
    idx = {p: np.array([genes.index(g) for g in panels[p]]) for p in ("hvg50", "heg250")}
    missing = [g for g in genes if g not in set(te_tab.var_names)]
    if missing:
        logger.warning("%d panel genes are not measured in the evaluation sections: they score 0", len(missing))
    y_tr = log_normalized(tr_tab, genes=genes).toarray().astype(np.float64)
    y_te = log_normalized(te_tab, genes=genes).toarray().astype(np.float64)
    depth = log_depth(te_tab)
    mu, sd = y_tr.mean(0), y_tr.std(0)
    sd[sd == 0] = 1.0
    res: dict[str, dict] = {}

    need_comtip = any(m.startswith("comtip") for m in methods)
    if need_comtip:
        t = time.perf_counter()
        e_te = image_embeddings(
            model,
            te_spots,
            te_names,
            batch_size=batch_size,
            device=device,
            dihedral=dihedral,
            num_workers=0,
            prompt=True,
            spatial_context=0.0,
        )
        # Recall@5 ranks each spot's own image embedding, as ct.tl.embed writes it and ct.tl.retrieve ranks it;
        # the spatial context is for the predictions
        own_image = e_te["image"]
        e_te = with_spatial_context(e_te, te_spots, te_names, spatial_context)
        secs["comtip_embed_eval"] = time.perf_counter() - t
    if "comtip_zero_shot" in methods:
        t = time.perf_counter()
        pred = zero_shot(model, e_te["prompt"], genes, descriptions=None, n_levels=None).astype(np.float64)
        secs["comtip_zero_shot"] = time.perf_counter() - t
        r = panel_metrics(pred, y_te, depth, idx)
        # shared space: image embedding of spot i against the gene-sentence embeddings of all evaluation spots
        emb_rows = embed_gene_sentences(model, te_tab, device=device)
        ok = np.isfinite(emb_rows).all(1)
        r["recall_at5"] = recall_at_k(own_image[ok], emb_rows[ok], 5)
        r["recall_at5_profile"] = profile_recall(pred, y_te, mu, sd)
        res["comtip_zero_shot"] = r
        if shuffled_control:
            perm = np.random.default_rng(seed).permutation(len(te_names))
            pred_s = zero_shot(model, e_te["prompt"][perm], genes, descriptions=None, n_levels=None).astype(np.float64)
            rs = panel_metrics(pred_s, y_te, depth, idx)
            rs["recall_at5"] = recall_at_k(own_image[perm][ok], emb_rows[ok], 5)
            res["comtip_zero_shot_shuffled_images"] = rs
    if "comtip_retrieval" in methods or "comtip_probe" in methods:
        t = time.perf_counter()
        e_tr = image_embeddings(
            model,
            tr_spots,
            tr_names,
            batch_size=batch_size,
            device=device,
            dihedral=dihedral,
            num_workers=0,
            prompt=False,
            spatial_context=spatial_context,
        )
        secs["comtip_embed_train"] = time.perf_counter() - t
        for m in ("comtip_retrieval", "comtip_probe"):
            if m in methods:
                pred = reference_predict(m, e_tr["image"], y_tr, e_te["image"], idx, genes)
                r = panel_metrics(pred, y_te, depth, idx)
                r["recall_at5"] = profile_recall(pred, y_te, mu, sd)
                res[m] = r
    # the ImageNet baselines: one view and/or the mean of the 8 flips/rotations, from one pass over the tiles
    wanted = {
        suffix: [m for m in (f"imagenet_probe{suffix}", f"imagenet_retrieval{suffix}") if m in methods]
        for suffix in ("", "_dihedral")
    }
    wanted = {k: v for k, v in wanted.items() if v}
    if wanted:
        from ._imagenet import imagenet_features  # imports torch

        t = time.perf_counter()
        views = "both" if len(wanted) == 2 else "_dihedral" in wanted
        kw = {"batch_size": batch_size, "device": device, "dihedral": views, "spatial_context": spatial_context}
        f_tr = imagenet_features(tr_spots, tr_names, **kw)
        f_te = imagenet_features(te_spots, te_names, **kw)
        if views == "both":
            feats = {"": (f_tr[0], f_te[0]), "_dihedral": (f_tr[1], f_te[1])}
        else:
            feats = {next(iter(wanted)): (f_tr, f_te)}
        secs["imagenet_features"] = time.perf_counter() - t
        for suffix, ms in wanted.items():
            fs_tr, fs_te = feats[suffix]
            for m in ms:
                pred = reference_predict(m, fs_tr, y_tr, fs_te, idx, genes)
                r = panel_metrics(pred, y_te, depth, idx)
                r["recall_at5"] = profile_recall(pred, y_te, mu, sd)
                res[m] = r
    if "mean" in methods:
        pred = np.repeat(y_tr.mean(0, keepdims=True), len(y_te), 0)
        r = panel_metrics(pred, y_te, depth, idx)
        r["recall_at5"] = float("nan")
        res["mean"] = r
    return {
        "methods": {k: {kk: round(v, 4) for kk, v in r.items()} for k, r in res.items()},
        "panels": {"hvg50": panels["hvg50"], "heg250": panels["heg250"], "from": "training sections"},
        "n_train_spots": len(tr_names),
        "n_eval_spots": len(te_names),
        "dihedral": dihedral,
        "spatial_context": spatial_context,
        "seconds": {k: round(v, 1) for k, v in secs.items()} | {"evaluate": round(time.perf_counter() - t0, 1)},
    }
