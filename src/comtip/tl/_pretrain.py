"""``ct.tl.pretrain``: build the gene panel and gene text, then train CoMTIP on the spots of a SpatialData."""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from .. import _constants as C
from .._logging import logger
from .._settings import settings

if TYPE_CHECKING:
    from ..model import CoMTIP, CoMTIPConfig
    from ..train import TrainConfig


@dataclass
class _Split:
    """Sections of a table for pretraining, and their spots (obs names, table order)."""

    train_sections: list[str]
    val_sections: list[str]
    count_sections: list[str]
    train_obs: list[str]
    val_obs: list[str]
    count_obs: list[str]  # every spot of the count-only sections


def _split_sections(table, tiles_obs: set[str], validation) -> _Split:
    """Training sections with images, validation sections and count-only sections (table order), with their spots."""
    has_sections = C.SECTION_KEY in table.obs
    sec = table.obs[C.SECTION_KEY].astype(str).to_numpy() if has_sections else np.full(table.n_obs, "all")
    sections = list(dict.fromkeys(sec))
    has_tiles = np.isin(table.obs_names.to_numpy(), list(tiles_obs))
    imaged = [s for s in sections if has_tiles[sec == s].any()]
    count_only = [s for s in sections if s not in imaged]
    if validation == "auto":
        val = imaged[-1:] if len(imaged) >= 2 else []
    elif validation is None:
        val = []
    else:
        val = [validation] if isinstance(validation, str) else list(validation)
        unknown = [s for s in val if s not in imaged]
        if unknown:
            msg = f"Validation sections {unknown} are not sections with tiles ({imaged}); pass some of those, or validation=None."
            raise ValueError(msg)
    train = [s for s in imaged if s not in val]
    if not train:
        msg = f"No training section left with tiles (sections with tiles: {imaged}, validation: {val}); keep at least one for training."
        raise ValueError(msg)
    names = table.obs_names
    return _Split(
        train_sections=train,
        val_sections=val,
        count_sections=count_only,
        train_obs=list(names[np.isin(sec, train) & has_tiles]),
        val_obs=list(names[np.isin(sec, val) & has_tiles]),
        count_obs=list(names[np.isin(sec, count_only)]),
    )


def training_settings(training=None, overrides: dict[str, Any] | None = None, *, caller: str = "pretrain"):
    """The :class:`comtip.train.TrainConfig` of a call: ``training`` (default: the defaults) with ``overrides``."""
    from ..train import TrainConfig

    if training is not None and not isinstance(training, TrainConfig):
        msg = f"training= takes a comtip.train.TrainConfig, got {type(training).__name__}; pass TrainConfig(...)."
        raise TypeError(msg)
    base = training if training is not None else TrainConfig()
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(TrainConfig.fields()))
    if unknown:
        msg = (
            f"{caller}() got unexpected keyword argument(s) {unknown}. Its training settings are the fields of "
            f"comtip.train.TrainConfig: {', '.join(TrainConfig.fields())}."
        )
        raise TypeError(msg)
    return base.replace(**overrides) if overrides else base


def _fit_settings(tc, *, show: bool, num_workers: int) -> dict[str, Any]:
    """The keywords of :func:`comtip.train.fit` that every stage shares."""
    return {
        "weight_decay": tc.weight_decay,
        "accelerator": tc.accelerator,
        "devices": tc.devices,
        "num_nodes": tc.num_nodes,
        "strategy": tc.strategy,
        "precision": tc.precision,
        "checkpoint_dir": tc.checkpoint_dir,
        "resume": tc.resume,
        "seed": tc.seed,
        "num_workers": num_workers,
        "show_progress_bar": show,
    }


@dataclass
class _Prepared:
    """What pretraining needs of a SpatialData, each computed once.

    ``spots`` holds the training then the validation spots: their panel expression, depth and gene sentences
    (normalised once) and, after :meth:`comtip.data.SpotDataset.cache_tiles`, their tiles (read once); every dataset
    of the stages is a view of it. ``counts``: the spots of count-only sections (expression only), for gene
    pretraining.
    """

    panel: list[str]
    text: Any
    levels: np.ndarray
    spots: Any
    counts: Any
    n_train: int
    val_panels: dict  # HVG50/HEG250 of the training spots (the validation metric's genes)
    score_panels: dict  # of the training and validation spots (score_expression's, EVAL.md's training sections)

    def train(self, *, augment: bool, seed: int):
        return self.spots.subset(np.arange(self.n_train), augment=augment, seed=seed)

    def val(self, *, augment: bool = False, seed: int = 0):
        return self.spots.subset(np.arange(self.n_train, len(self.spots)), augment=augment, seed=seed)

    def genes_only(self, *, with_counts: bool):
        """Expression-only samples: count-only spots (``with_counts``) then training spots; else training + validation."""
        from ..data import SpotDataset

        if not with_counts:
            return self.spots.subset(np.arange(len(self.spots)), images=False, augment=False)
        train = self.spots.subset(np.arange(self.n_train), images=False, augment=False)
        return SpotDataset.concat([self.counts, train]) if self.counts is not None else train


def _prepare(
    sdata, table, split: _Split, *, config, table_key, tiles_key, layer, n_genes, text_model, with_counts: bool
) -> _Prepared:
    """Gene panel, gene text, prompt levels, the spots' expression (normalised once) and the eval panels."""
    from ..data import SpotDataset
    from ..pp import eval_panels, gene_panel, gene_text_embeddings, value_levels

    # gene panel, text and levels: from the training spots only
    train_table = table[split.train_obs]
    panel = gene_panel(train_table, n_top=n_genes, layer=layer)
    if len(panel) < 2:
        msg = (
            f"Only {len(panel)} genes are detected in >= 10 % of the training spots; is the table empty or not counts?"
        )
        raise ValueError(msg)
    text = gene_text_embeddings(panel, model=text_model, fallback=True) if config.gene_embedding != "learned" else None
    kw = {"genes": panel, "table_key": table_key, "sentence_length": config.sentence_length, "layer": layer}
    # the training then the validation spots, with their tiles (read later, once, by cache_tiles)
    spots = SpotDataset(sdata, tiles_key=tiles_key, obs_names=split.train_obs + split.val_obs, **kw)
    counts = (
        SpotDataset(sdata, tiles_key=None, obs_names=split.count_obs, **kw) if with_counts and split.count_obs else None
    )
    n_train = len(split.train_obs)
    levels = value_levels(spots.expr[:n_train], n_levels=config.n_value_levels)
    # the validation metric's genes: from the training spots alone, so the validation section picks no gene
    val_panels = eval_panels(train_table, layer=layer)
    score_panels = eval_panels(table[split.train_obs + split.val_obs], layer=layer) if split.val_obs else val_panels
    return _Prepared(
        panel=panel,
        text=text,
        levels=levels,
        spots=spots,
        counts=counts,
        n_train=n_train,
        val_panels=val_panels,
        score_panels={"hvg50": list(score_panels["hvg50"]), "heg250": list(score_panels["heg250"])},
    )


def pretrain(
    sdata,
    *,
    config: CoMTIPConfig | None = None,
    training: TrainConfig | None = None,
    table_key: str = C.TABLE_KEY,
    tiles_key: str = C.TILES_KEY,
    layer: str | None = None,
    validation: str | Sequence[str] | Literal["auto"] | None = "auto",
    samples: Sequence[str] | None = None,
    n_genes: int = 512,
    text_model: str = C.TEXT_MODEL,
    **training_kwargs: Any,
) -> CoMTIP:
    """Pretrain a CoMTIP model on the spots of a SpatialData (image tiles + expression), or on a corpus on disk.

    The gene panel, the gene text embeddings and the prompt value levels are built from the training spots, and the
    spots' expression, gene sentences and tiles are prepared once; then image tiles and gene sentences are aligned
    with every loss part of the config (InfoNCE, the value-level prompt loss, MFM, PAAT) in up to three stages, each
    a Lightning run: gene pretraining on count-only sections (optional), the contrastive stage, and the read-out
    stage. With several imaged sections one is held out for validation (``"auto"``: the last), which monitors
    image→gene Recall@5 and the depth-controlled zero-shot correlation; the weights of each stage's best validation
    epoch are kept. Count-only sections (no image) can pretrain the gene side first (``gene_pretrain_epochs``,
    masked value modeling; needs ``config.mvm_weight > 0``).

    A corpus (:func:`comtip.pp.write_corpus`; its folder or :func:`comtip.io.read_corpus`) is streamed instead:
    its shards are split across DDP ranks and DataLoader workers (every spot once per epoch across all ranks), a
    shuffle buffer mixes samples, and validation runs on held-out samples. The panel is chosen from the samples'
    statistics, where a gene that a sample did not measure is masked, not read as zero; genes without a gene-text
    entry are dropped (counted in the log). Nothing held in memory grows with the corpus: no feature cache, prompt
    levels from a bounded sample of spots, a reference bank of ``n_reference`` spots. With
    ``checkpoint_every_n_steps`` a killed run resumes mid-epoch, exactly where it stopped.

    Defaults: the model is :meth:`comtip.CoMTIPConfig.cpu` (the offline CPU preset) and the training settings are
    those of :class:`comtip.train.TrainConfig` (20 contrastive epochs, 30 read-out epochs, batches of 32, AdamW at
    1e-3); there is no other default.

    Parameters
    ----------
    sdata
        SpatialData with a table of raw counts and tiles from :func:`comtip.pp.spot_tiles`; or a corpus (its folder
        or a :class:`comtip.Corpus`).
    config
        Model configuration (``None``: :meth:`comtip.CoMTIPConfig.cpu`).
    training
        Training settings (``None``: the defaults of :class:`comtip.train.TrainConfig`).
    table_key
        Table of the spots.
    tiles_key
        Shapes element with the tiles.
    layer
        Raw-count layer (default ``layers['counts']``, else ``X``).
    validation
        Validation section(s), ``"auto"`` (the last section with tiles, when there are at least two) or ``None``.
    samples
        Corpus only: the samples to train and validate on (default: all). ``validation`` then names samples
        (``"auto"``: the last one).
    n_genes
        Size of the gene panel (genes detected in >= 10 % of training spots, by mean and by variance).
    text_model
        Sentence-transformers model for the gene descriptions (offline default: all-MiniLM-L6-v2).
    **training_kwargs
        Any field of :class:`comtip.train.TrainConfig`, overriding that of ``training`` (``max_epochs=20``); see
        there for each. In groups: the stages and optimiser (``max_epochs``, ``batch_size``, ``lr``,
        ``weight_decay``, ``image_tower_lr_scale``, ``early_stopping_patience``, ``gene_pretrain_epochs``,
        ``readout_epochs``, ``readout_lr``, ``readout_refit``); the data during training (``augment``,
        ``cache_image_features``, ``num_workers``; for a corpus ``buffer_size``, ``n_reference``); the hardware
        (``accelerator``, ``devices``, ``num_nodes``, ``strategy``, ``precision``); checkpoints
        (``checkpoint_dir``, ``resume``; for a corpus ``checkpoint_every_n_steps``); ``seed`` and
        ``show_progress_bar``.

    Returns
    -------
    The trained :class:`comtip.CoMTIP`, also set as the current model (:attr:`comtip.settings.model`). Its
    ``history`` holds the loss parts and validation metrics per epoch, its ``training_summary`` the sections,
    panel, tile size, timings and the HVG50/HEG250 panels that :func:`comtip.tl.score_expression` uses: those of
    every spot the model was fitted or validated on (the training sections of EVAL.md), as in
    ``benchmarks/accuracy.py``.

    See Also
    --------
    comtip.train.TrainConfig : the training settings.
    comtip.train.fit : one training stage (a Lightning run) on datasets of your own.

    Examples
    --------
    >>> sdata = ct.datasets.her2st(sections=["C2", "C3", "C4", "C5"])
    >>> ct.pp.spot_tiles(sdata)
    >>> model = ct.tl.pretrain(sdata, max_epochs=20)
    >>> model.save("her2st_model/")
    >>> from comtip.train import TrainConfig
    >>> gpu = TrainConfig(batch_size=256, accelerator="gpu", devices=4)
    >>> model = ct.tl.pretrain(sdata, config=ct.CoMTIPConfig.paper(), training=gpu)
    """
    import torch

    from .._spatial import get_table
    from ..model import CoMTIP, CoMTIPConfig
    from ..train import PooledFeatureDataset, PrefixFeatureDataset, fit, prefix_is_frozen
    from ._data import check_tile_resolution, check_training_data
    from ._pretrain_corpus import is_corpus, pretrain_corpus

    t_start = time.perf_counter()
    config = config or CoMTIPConfig.cpu()
    tc = training_settings(training, training_kwargs)
    show = settings.show_progress_bar if tc.show_progress_bar is None else tc.show_progress_bar
    num_workers = settings.num_workers if tc.num_workers is None else tc.num_workers

    if is_corpus(sdata):
        if tc.gene_pretrain_epochs or tc.readout_refit:
            msg = "gene_pretrain_epochs and readout_refit are not available for a corpus: leave them at 0 / False."
            raise ValueError(msg)
        return pretrain_corpus(
            sdata,
            config=config,
            training=tc,
            samples=samples,
            validation=validation,
            n_genes=n_genes,
            text_model=text_model,
            common=_fit_settings(tc, show=show, num_workers=num_workers),
        )
    if isinstance(sdata, (str, os.PathLike)):
        msg = f"{sdata} is not a corpus folder (no manifest.json): write one with ct.pp.write_corpus, or pass a SpatialData."
        raise FileNotFoundError(msg)
    table = get_table(sdata, table_key)
    if tiles_key not in sdata.shapes:
        msg = f"No tiles {tiles_key!r}: run ct.pp.spot_tiles(sdata) (112 µm tiles at 224 px) before ct.tl.pretrain."
        raise KeyError(msg)
    tiles = sdata.shapes[tiles_key]
    missing_image = ~tiles["image"].astype(str).isin(list(sdata.images))
    if missing_image.any():
        gone = sorted(set(tiles.loc[missing_image, "image"].astype(str)))
        warnings.warn(
            f"{int(missing_image.sum())} tiles of {tiles_key!r} refer to images that are not in the SpatialData "
            f"object ({', '.join(gone)}): their spots are left out of training. Run ct.pp.spot_tiles again after "
            "subsetting to silence this.",
            UserWarning,
            stacklevel=2,
        )
        tiles = tiles[~missing_image]
    tile_obs = set(tiles["obs_name"].astype(str))
    if tc.gene_pretrain_epochs and config.mvm_weight <= 0:
        msg = "gene_pretrain_epochs > 0 needs a model with a masked-value head: pass config=CoMTIPConfig.cpu(mvm_weight=0.1)."
        raise ValueError(msg)
    split = _split_sections(table, tile_obs, validation)
    train_obs, val_obs = split.train_obs, split.val_obs
    check_training_data(
        table,
        table_key=table_key,
        layer=layer,
        train_obs=train_obs,
        val_obs=val_obs,
        train_sections=split.train_sections,
        val_sections=split.val_sections,
    )
    batch_size, seed, augment = tc.batch_size, tc.seed, tc.augment
    if len(train_obs) < 2 * batch_size:
        logger.warning("only %d training spots for batch_size=%d: consider a smaller batch", len(train_obs), batch_size)
    logger.info(
        "training sections %s (%d spots), validation %s (%d spots)",
        split.train_sections,
        len(train_obs),
        split.val_sections,
        len(val_obs),
    )

    prep = _prepare(
        sdata,
        table,
        split,
        config=config,
        table_key=table_key,
        tiles_key=tiles_key,
        layer=layer,
        n_genes=n_genes,
        text_model=text_model,
        with_counts=bool(tc.gene_pretrain_epochs),
    )
    torch.manual_seed(seed)
    model = CoMTIP(config, prep.panel, prep.text, prep.levels)
    model.cpu_chunk_size = settings.cpu_chunk_size
    check_tile_resolution(model, tiles, tiles_key=tiles_key)
    prep.spots.cache_tiles()  # every training and validation tile, read once

    tile_size_um = float(tiles["tile_size_um"].iloc[0])
    tile_size_px = int(tiles["tile_size_px"].iloc[0])
    if tile_size_px != config.image_size:
        logger.info("tiles of %d px are resized to the model's %d px", tile_size_px, config.image_size)
    summary_stages = []
    common = _fit_settings(tc, show=show, num_workers=num_workers)

    # optional gene-side pretraining on count-only spots (and the training spots)
    if tc.gene_pretrain_epochs:
        stage = fit(
            model,
            prep.genes_only(with_counts=True),
            None,
            stage="genes",
            max_epochs=tc.gene_pretrain_epochs,
            batch_size=max(batch_size, 64),
            lr=tc.lr,
            monitor=None,
            **common,
        )
        summary_stages.append(stage)

    train_ds = prep.train(augment=augment, seed=seed)
    val_ds = prep.val() if val_obs else None
    on_gpu = tc.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    use_cache = tc.cache_image_features
    if use_cache == "auto":
        use_cache = prefix_is_frozen(model) and not on_gpu
    if use_cache and prefix_is_frozen(model):
        train_ds = PrefixFeatureDataset(train_ds, model, augment=augment, seed=seed)
        if val_ds is not None:
            val_ds = PrefixFeatureDataset(val_ds, model, augment=False, seed=seed)
    panels = prep.val_panels
    val_genes = (
        model.gene_index([g for g in dict.fromkeys(panels["hvg50"] + panels["heg250"]) if g in set(prep.panel)])
        .cpu()
        .numpy()
    )
    readout = tc.readout_epochs > 0 and config.uses_prompt
    summary_stages.append(
        fit(
            model,
            train_ds,
            val_ds,
            stage="contrastive",
            max_epochs=tc.max_epochs,
            batch_size=batch_size,
            lr=tc.lr,
            image_tower_lr_scale=tc.image_tower_lr_scale,
            val_genes=val_genes,
            # with a read-out stage to follow, this stage is judged by the alignment of the two modalities
            monitor="val/recall5" if readout else "val/pcc_adj",
            early_stopping_patience=tc.early_stopping_patience,
            **common,
        )
    )
    if readout:
        # the read-out stage: the tower is fixed now, so its pooled features are computed once per tile and
        # dihedral transform, and the zero-shot read-out (prompt loss alone) trains on them
        # on its own copy of the gene encoder, so that the sentence embeddings stay those of the contrastive stage
        model.split_prompt_encoder()
        start = {k: v.detach().clone() for k, v in model.state_dict().items()} if tc.readout_refit and val_ds else None
        ro_device = "cuda" if on_gpu else "cpu"
        ro_lr = tc.readout_lr or tc.lr
        ro_train = PooledFeatureDataset(train_ds, model, augment=augment, seed=seed, device=ro_device)
        ro_val = (
            PooledFeatureDataset(val_ds, model, augment=False, seed=seed, device=ro_device)
            if val_ds is not None
            else None
        )
        summary_stages.append(
            fit(
                model,
                ro_train,
                ro_val,
                stage="readout",
                max_epochs=tc.readout_epochs,
                batch_size=batch_size,
                lr=ro_lr,
                val_genes=val_genes,
                monitor="val/pcc_adj",
                **common,
            )
        )
        best_epoch = summary_stages[-1].get("best_epoch")
        if start is not None and best_epoch is not None:
            # refit: same start, the validated number of epochs, training + validation spots
            model.load_state_dict(start)
            val_aug = prep.val(augment=augment, seed=seed)
            if isinstance(train_ds, PrefixFeatureDataset):
                val_aug = PrefixFeatureDataset(val_aug, model, augment=augment, seed=seed)
            ro_val_aug = PooledFeatureDataset(val_aug, model, augment=augment, seed=seed, device=ro_device)
            ro_all = PooledFeatureDataset.concat(prep.genes_only(with_counts=False), [ro_train, ro_val_aug], seed=seed)
            n_hist = len(model.history)
            checkpoint_dir = tc.checkpoint_dir
            refit = fit(
                model,
                ro_all,
                None,
                stage="readout",
                max_epochs=int(best_epoch) + 1,
                batch_size=batch_size,
                lr=ro_lr,
                monitor=None,
                **{**common, "checkpoint_dir": None if checkpoint_dir is None else Path(checkpoint_dir) / "refit"},
            )
            for entry in model.history[n_hist:]:
                entry["stage"] = "readout_refit"
            summary_stages.append(
                {**refit, "stage": "readout_refit", "sections": split.train_sections + split.val_sections}
            )
    model.eval()
    _store_reference(model, train_ds, sdata, tiles_key=tiles_key, obs_names=train_obs, table_key=table_key)
    model.training_summary.update(
        {
            "sections": split.train_sections,
            "validation_sections": split.val_sections,
            "count_only_sections": split.count_sections if tc.gene_pretrain_epochs else [],
            "n_train_spots": len(train_obs),
            "n_val_spots": len(val_obs),
            "tile_size_um": tile_size_um,
            "tile_size_px": tile_size_px,
            "text_model": text_model,
            "epochs": sum(s["epochs"] for s in summary_stages if s["stage"] == "contrastive"),
            "readout_epochs": sum(s["epochs"] for s in summary_stages if s["stage"] == "readout"),
            "steps": sum(s["steps"] for s in summary_stages),
            "stages": summary_stages,
            "eval_panels": prep.score_panels,
            "cached_image_features": bool(use_cache),
            "augment": augment,
            "wall_s": round(time.perf_counter() - t_start, 1),
        }
    )
    settings.model = model
    logger.info("pretrained %s in %.0f s; it is now the current model", model.name, time.perf_counter() - t_start)
    return model


def _store_reference(model, train_ds, sdata, *, tiles_key: str, table_key: str, obs_names: list[str]) -> None:
    """Keep the training spots' image embeddings (8-fold dihedral average), panel expression and positions.

    The embeddings come from the training dataset as it is (its cached prefix features, or its tiles read once), in
    the same batches as :func:`comtip.tl.embed` would read them.
    """
    import torch

    from ..train import PrefixFeatureDataset
    from ._data import Spots

    if isinstance(train_ds, PrefixFeatureDataset):
        from ..model._inference import embed_prefix_features

        emb = embed_prefix_features(model, train_ds.features)["image"]
        expr = train_ds.dataset.expr
    else:
        from ..model._inference import embed_images

        plain = train_ds.subset(np.arange(len(train_ds)), augment=False)
        order = plain.tile_read_order()
        batches = ({"image": plain.images(order[i : i + 64])} for i in range(0, len(order), 64))
        emb = embed_images(model, batches, dihedral=True, device=None, prompt=False)["image"]
        inv = np.empty_like(order)
        inv[order] = np.arange(len(order))
        emb = emb[inv]
        expr = train_ds.expr
    # spot centres and sections, so that predict_expression(spatial_context=...) can mix the reference spots too
    spots = Spots(sdata, sdata.tables[table_key], np.asarray(obs_names, dtype=object), tiles_key)
    xy, regions = spots.centres(list(obs_names))
    _, section = np.unique(regions, return_inverse=True)
    model.reference = {
        "embeddings": torch.from_numpy(np.ascontiguousarray(emb, dtype=np.float32)),
        "expression": torch.from_numpy(np.ascontiguousarray(expr, dtype=np.float32)),
        "xy": torch.from_numpy(np.ascontiguousarray(xy, dtype=np.float64)),
        "section": torch.from_numpy(np.ascontiguousarray(section, dtype=np.int64)),
    }
