"""``ct.tl.pretrain``: build the gene panel and gene text, then train CoMTIP on the spots of a SpatialData."""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from .. import _constants as C
from .._logging import logger
from .._settings import settings

if TYPE_CHECKING:
    from ..model import CoMTIP, CoMTIPConfig


def _split_sections(table, tiles_obs: set[str], validation) -> tuple[list[str], list[str], list[str]]:
    """(training sections with images, validation sections, count-only sections) in table order."""
    sections = list(dict.fromkeys(table.obs[C.SECTION_KEY].astype(str))) if C.SECTION_KEY in table.obs else ["all"]
    sec = table.obs[C.SECTION_KEY].astype(str).to_numpy() if C.SECTION_KEY in table.obs else np.full(table.n_obs, "all")
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
    return train, val, count_only


def pretrain(
    sdata,
    *,
    config: CoMTIPConfig | None = None,
    table_key: str = C.TABLE_KEY,
    tiles_key: str = C.TILES_KEY,
    layer: str | None = None,
    validation: str | Sequence[str] | Literal["auto"] | None = "auto",
    n_genes: int = 512,
    text_model: str = "all-MiniLM-L6-v2",
    max_epochs: int = 20,
    batch_size: int = 32,
    lr: float = 1e-3,
    weight_decay: float = 0.05,
    image_tower_lr_scale: float = 0.1,
    gene_pretrain_epochs: int = 0,
    readout_epochs: int = 30,
    readout_lr: float | None = 1e-3,
    readout_refit: bool = False,
    augment: bool = True,
    early_stopping_patience: int | None = None,
    cache_image_features: bool | Literal["auto"] = "auto",
    accelerator: str = "auto",
    devices: int | str | list[int] = "auto",
    num_nodes: int = 1,
    strategy: str = "auto",
    precision: str | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = True,
    seed: int = 0,
    num_workers: int | None = None,
    show_progress_bar: bool | None = None,
    samples: Sequence[str] | None = None,
    buffer_size: int = 4096,
    checkpoint_every_n_steps: int | None = None,
    n_reference: int = 10_000,
) -> CoMTIP:
    """Pretrain a CoMTIP model on the spots of a SpatialData (image tiles + expression), or on a corpus on disk.

    The gene panel, the gene text embeddings and the prompt value levels are built from the training spots;
    then image tiles and gene sentences are aligned with every loss part of the config (InfoNCE, the value-level
    prompt loss, MFM, PAAT). With several imaged sections one is held out for validation (``"auto"``: the
    last), which monitors image→gene Recall@5 and the depth-controlled zero-shot correlation; the weights of the
    best validation epoch are kept. Count-only sections (no image) can pretrain the gene side first
    (``gene_pretrain_epochs``, masked value modeling; needs ``config.mvm_weight > 0``).

    A corpus (:func:`comtip.pp.write_corpus`; its folder or :func:`comtip.io.read_corpus`) is streamed instead:
    its shards are split across DDP ranks and DataLoader workers (every spot once per epoch across all ranks), a
    shuffle buffer mixes samples, and validation runs on held-out samples. The panel is chosen from the samples'
    statistics, where a gene that a sample did not measure is masked, not read as zero; genes without a gene-text
    entry are dropped (counted in the log). Nothing held in memory grows with the corpus: no feature cache, prompt
    levels from a bounded sample of spots, a reference bank of ``n_reference`` spots. With
    ``checkpoint_every_n_steps`` a killed run resumes mid-epoch, exactly where it stopped.

    Parameters
    ----------
    sdata
        SpatialData with a table of raw counts and tiles from :func:`comtip.pp.spot_tiles`; or a corpus (its folder
        or a :class:`comtip.Corpus`).
    config
        Model configuration; default :meth:`comtip.CoMTIPConfig.cpu` (offline CPU default).
    table_key
        Table of the spots.
    tiles_key
        Shapes element with the tiles.
    layer
        Raw-count layer (default ``layers['counts']``, else ``X``).
    validation
        Validation section(s), ``"auto"`` or ``None``.
    n_genes
        Size of the gene panel (genes detected in >= 10 % of training spots, by mean and by variance).
    text_model
        Sentence-transformers model for the gene descriptions (offline default: all-MiniLM-L6-v2).
    max_epochs
        Epochs of the contrastive stage.
    batch_size
        Spots per batch (per device).
    lr, weight_decay, image_tower_lr_scale
        AdamW learning rate, weight decay, and the factor on the learning rate of the pretrained image tower.
    readout_epochs
        Epochs of the read-out stage after the contrastive stage: with the image tower fixed, the zero-shot
        read-out (gene encoder, prompt heads, read-out temperatures) trains on the prompt loss alone, on pooled image
        features computed once per tile and dihedral transform (0 = no read-out stage).
    readout_lr
        Learning rate of the read-out stage (``None``: ``lr``).
    readout_refit
        With a validation section: once validation has picked the read-out's best epoch, train the read-out again
        from the same start for that many epochs on the training and validation spots together (the contrastive
        stage keeps its validated weights). Off by default: on HER2ST it raised the plain correlations but not the
        depth-controlled ones (``benchmarks/README.md``).
    augment
        Augment the training tiles: a random flip/rotation (one of 8) per spot and epoch, plus colour jitter when
        the tower is not cached (see ``cache_image_features``). Validation scores are always computed on the tiles
        as they are; with ``readout_refit``, the validation spots are augmented like the training spots when the
        read-out is refitted on them.
    gene_pretrain_epochs
        Epochs of masked value modeling on the count-only spots before the contrastive stage (0 = none).
    early_stopping_patience
        Stop after this many epochs without validation improvement (``None`` = never).
    cache_image_features
        Compute the frozen part of the image tower once per tile and dihedral transform (``"auto"``: when the
        tower has a frozen part and training runs on the CPU). Colour jitter is then not applied.
    accelerator, devices, num_nodes, strategy
        Lightning's: ``devices=4`` trains with DDP on 4 GPUs; the same call runs under ``torchrun`` or SLURM.
    precision
        Lightning precision; default bf16 mixed precision on GPUs, fp32 on CPU.
    checkpoint_dir
        Folder for ``*-last.ckpt``; with ``resume=True`` an interrupted run continues from there.
    resume
        Continue from a checkpoint in ``checkpoint_dir``.
    seed
        Seed of everything (initialisation, sampling, augmentation).
    num_workers
        DataLoader workers (default :attr:`comtip.settings.num_workers`).
    show_progress_bar
        Progress bars (default :attr:`comtip.settings.show_progress_bar`).
    samples
        Corpus only: the samples to train and validate on (default: all). ``validation`` then names samples
        (``"auto"``: the last one).
    buffer_size
        Corpus only: spots in the shuffle buffer of the stream.
    checkpoint_every_n_steps
        Corpus only: also write the checkpoint every that many steps (mid-epoch resume).
    n_reference
        Corpus only: training spots kept as the reference bank of retrieval and probe prediction.

    Returns
    -------
    The trained :class:`comtip.CoMTIP`, also set as the current model (:attr:`comtip.settings.model`). Its
    ``history`` holds the loss parts and validation metrics per epoch, its ``training_summary`` the sections,
    panel, tile size, timings and the HVG50/HEG250 panels that :func:`comtip.tl.score_expression` uses: those of
    every spot the model was fitted or validated on (the training sections of EVAL.md), as in
    ``benchmarks/accuracy.py``.

    Examples
    --------
    >>> sdata = ct.datasets.her2st(sections=["C2", "C3", "C4", "C5"])
    >>> ct.pp.spot_tiles(sdata)
    >>> model = ct.tl.pretrain(sdata, max_epochs=20)
    >>> model.save("her2st_model/")
    """
    import torch

    from .._spatial import get_table
    from ..data import SpotDataset
    from ..model import CoMTIP, CoMTIPConfig
    from ..pp import eval_panels, gene_panel, gene_text_embeddings, log_normalized, value_levels
    from ..train import PooledFeatureDataset, PrefixFeatureDataset, fit, prefix_is_frozen
    from ._data import check_tile_resolution, check_training_data

    t_start = time.perf_counter()
    config = config or CoMTIPConfig.cpu()
    show = settings.show_progress_bar if show_progress_bar is None else show_progress_bar
    num_workers = settings.num_workers if num_workers is None else num_workers
    from ._pretrain_corpus import is_corpus, pretrain_corpus

    if is_corpus(sdata):
        if gene_pretrain_epochs or readout_refit:
            msg = "gene_pretrain_epochs and readout_refit are not available for a corpus: leave them at 0 / False."
            raise ValueError(msg)
        return pretrain_corpus(
            sdata,
            config=config,
            samples=samples,
            validation=validation,
            n_genes=n_genes,
            text_model=text_model,
            max_epochs=max_epochs,
            batch_size=batch_size,
            lr=lr,
            weight_decay=weight_decay,
            image_tower_lr_scale=image_tower_lr_scale,
            readout_epochs=readout_epochs,
            readout_lr=readout_lr,
            augment=augment,
            early_stopping_patience=early_stopping_patience,
            buffer_size=buffer_size,
            checkpoint_every_n_steps=checkpoint_every_n_steps,
            n_reference=n_reference,
            common={
                "accelerator": accelerator,
                "devices": devices,
                "num_nodes": num_nodes,
                "strategy": strategy,
                "precision": precision,
                "checkpoint_dir": checkpoint_dir,
                "resume": resume,
                "seed": seed,
                "num_workers": num_workers,
                "show_progress_bar": show,
            },
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
    if gene_pretrain_epochs and config.mvm_weight <= 0:
        msg = "gene_pretrain_epochs > 0 needs a model with a masked-value head: pass config=CoMTIPConfig.cpu(mvm_weight=0.1)."
        raise ValueError(msg)
    train_secs, val_secs, count_secs = _split_sections(table, tile_obs, validation)
    sec = table.obs[C.SECTION_KEY].astype(str).to_numpy() if C.SECTION_KEY in table.obs else np.full(table.n_obs, "all")
    has_tile = np.isin(table.obs_names.to_numpy(), list(tile_obs))
    train_obs = list(table.obs_names[np.isin(sec, train_secs) & has_tile])
    val_obs = list(table.obs_names[np.isin(sec, val_secs) & has_tile])
    check_training_data(
        table,
        table_key=table_key,
        layer=layer,
        train_obs=train_obs,
        val_obs=val_obs,
        train_sections=train_secs,
        val_sections=val_secs,
    )
    if len(train_obs) < 2 * batch_size:
        logger.warning("only %d training spots for batch_size=%d: consider a smaller batch", len(train_obs), batch_size)
    logger.info(
        "training sections %s (%d spots), validation %s (%d spots)", train_secs, len(train_obs), val_secs, len(val_obs)
    )

    # gene panel, text and levels: from the training spots only
    train_table = table[train_obs]
    panel = gene_panel(train_table, n_top=n_genes, layer=layer)
    if len(panel) < 2:
        msg = (
            f"Only {len(panel)} genes are detected in >= 10 % of the training spots; is the table empty or not counts?"
        )
        raise ValueError(msg)
    text = gene_text_embeddings(panel, model=text_model, fallback=True) if config.gene_embedding != "learned" else None
    expr = log_normalized(train_table, layer=layer, genes=panel)
    levels = value_levels(expr, n_levels=config.n_value_levels)
    # the validation metric's genes: from the training spots alone, so the validation section picks no gene
    panels = eval_panels(train_table, layer=layer)
    torch.manual_seed(seed)
    model = CoMTIP(config, panel, text, levels)
    check_tile_resolution(model, tiles, tiles_key=tiles_key)

    tile_size_um = float(tiles["tile_size_um"].iloc[0])
    tile_size_px = int(tiles["tile_size_px"].iloc[0])
    if tile_size_px != config.image_size:
        logger.info("tiles of %d px are resized to the model's %d px", tile_size_px, config.image_size)
    sentence_length = config.sentence_length
    summary_stages = []

    common = {
        "weight_decay": weight_decay,
        "accelerator": accelerator,
        "devices": devices,
        "num_nodes": num_nodes,
        "strategy": strategy,
        "precision": precision,
        "checkpoint_dir": checkpoint_dir,
        "resume": resume,
        "seed": seed,
        "num_workers": num_workers,
        "show_progress_bar": show,
    }

    def spots(obs_names: list[str], *, images: bool = True, **kw) -> SpotDataset:
        """The panel's sentences (and, with ``images``, the tiles) of these spots."""
        return SpotDataset(
            sdata,
            genes=panel,
            table_key=table_key,
            tiles_key=tiles_key if images else None,
            obs_names=obs_names,
            sentence_length=sentence_length,
            layer=layer,
            **kw,
        )

    # optional gene-side pretraining on count-only spots
    if gene_pretrain_epochs:
        count_obs = list(table.obs_names[np.isin(sec, count_secs)]) + train_obs
        genes_ds = spots(count_obs, images=False)
        stage = fit(
            model,
            genes_ds,
            None,
            stage="genes",
            max_epochs=gene_pretrain_epochs,
            batch_size=max(batch_size, 64),
            lr=lr,
            monitor=None,
            **common,
        )
        summary_stages.append(stage)

    train_ds = spots(train_obs, augment=augment, seed=seed, cache_tiles=True)
    val_ds = spots(val_obs, cache_tiles=True) if val_obs else None
    on_gpu = accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    use_cache = cache_image_features
    if use_cache == "auto":
        use_cache = prefix_is_frozen(model) and not on_gpu
    if use_cache and prefix_is_frozen(model):
        train_ds = PrefixFeatureDataset(train_ds, model, augment=augment, seed=seed)
        if val_ds is not None:
            val_ds = PrefixFeatureDataset(val_ds, model, augment=False, seed=seed)
    val_genes = (
        model.gene_index([g for g in dict.fromkeys(panels["hvg50"] + panels["heg250"]) if g in set(panel)])
        .cpu()
        .numpy()
    )
    readout = readout_epochs > 0 and config.uses_prompt
    summary_stages.append(
        fit(
            model,
            train_ds,
            val_ds,
            stage="contrastive",
            max_epochs=max_epochs,
            batch_size=batch_size,
            lr=lr,
            image_tower_lr_scale=image_tower_lr_scale,
            val_genes=val_genes,
            # with a read-out stage to follow, this stage is judged by the alignment of the two modalities
            monitor="val/recall5" if readout else "val/pcc_adj",
            early_stopping_patience=early_stopping_patience,
            **common,
        )
    )
    if readout:
        # the read-out stage: the tower is fixed now, so its pooled features are computed once per tile and
        # dihedral transform, and the zero-shot read-out (prompt loss alone) trains on them
        # on its own copy of the gene encoder, so that the sentence embeddings stay those of the contrastive stage
        model.split_prompt_encoder()
        start = {k: v.detach().clone() for k, v in model.state_dict().items()} if readout_refit and val_ds else None
        ro_device = "cuda" if on_gpu else "cpu"
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
                max_epochs=readout_epochs,
                batch_size=batch_size,
                lr=readout_lr or lr,
                val_genes=val_genes,
                monitor="val/pcc_adj",
                **common,
            )
        )
        best_epoch = summary_stages[-1].get("best_epoch")
        if start is not None and best_epoch is not None:
            # refit: same start, the validated number of epochs, training + validation spots
            model.load_state_dict(start)
            val_aug = spots(val_obs, augment=augment, seed=seed, cache_tiles=True)
            if isinstance(train_ds, PrefixFeatureDataset):
                val_aug = PrefixFeatureDataset(val_aug, model, augment=augment, seed=seed)
            ro_val_aug = PooledFeatureDataset(val_aug, model, augment=augment, seed=seed, device=ro_device)
            ro_all = PooledFeatureDataset.concat(
                spots(train_obs + val_obs, images=False), [ro_train, ro_val_aug], seed=seed
            )
            n_hist = len(model.history)
            refit = fit(
                model,
                ro_all,
                None,
                stage="readout",
                max_epochs=int(best_epoch) + 1,
                batch_size=batch_size,
                lr=readout_lr or lr,
                monitor=None,
                **{**common, "checkpoint_dir": None if checkpoint_dir is None else Path(checkpoint_dir) / "refit"},
            )
            for entry in model.history[n_hist:]:
                entry["stage"] = "readout_refit"
            summary_stages.append({**refit, "stage": "readout_refit", "sections": train_secs + val_secs})
    model.eval()
    _store_reference(model, train_ds, sdata, tiles_key=tiles_key, obs_names=train_obs, table_key=table_key)
    model.training_summary.update(
        {
            "sections": train_secs,
            "validation_sections": val_secs,
            "count_only_sections": count_secs if gene_pretrain_epochs else [],
            "n_train_spots": len(train_obs),
            "n_val_spots": len(val_obs),
            "tile_size_um": tile_size_um,
            "tile_size_px": tile_size_px,
            "text_model": text_model,
            "epochs": sum(s["epochs"] for s in summary_stages if s["stage"] == "contrastive"),
            "readout_epochs": sum(s["epochs"] for s in summary_stages if s["stage"] == "readout"),
            "steps": sum(s["steps"] for s in summary_stages),
            "stages": summary_stages,
            "eval_panels": _score_panels(table, train_obs, val_obs, panels, layer=layer),
            "cached_image_features": bool(use_cache),
            "augment": augment,
            "wall_s": round(time.perf_counter() - t_start, 1),
        }
    )
    settings.model = model
    logger.info("pretrained %s in %.0f s; it is now the current model", model.name, time.perf_counter() - t_start)
    return model


def _score_panels(table, train_obs: list[str], val_obs: list[str], train_panels: dict, *, layer: str | None) -> dict:
    """HVG50/HEG250 of the training and validation spots together (EVAL.md's training sections)."""
    from ..pp import eval_panels

    p = eval_panels(table[train_obs + val_obs], layer=layer) if val_obs else train_panels
    return {"hvg50": list(p["hvg50"]), "heg250": list(p["heg250"])}


def _store_reference(model, train_ds, sdata, *, tiles_key: str, table_key: str, obs_names: list[str]) -> None:
    """Keep the training spots' image embeddings (8-fold dihedral average), panel expression and positions."""
    import torch

    from ..train import PrefixFeatureDataset
    from ._data import Spots

    spots = Spots(sdata, sdata.tables[table_key], np.asarray(obs_names, dtype=object), tiles_key)
    if isinstance(train_ds, PrefixFeatureDataset):
        from ..model._inference import embed_prefix_features

        emb = embed_prefix_features(model, train_ds.features)["image"]
        expr = train_ds.dataset.expr
    else:
        from ._embed import image_embeddings

        emb = image_embeddings(
            model, spots, list(obs_names), batch_size=64, device=None, dihedral=True, num_workers=0, prompt=False
        )["image"]
        expr = train_ds.expr
    # spot centres and sections, so that predict_expression(spatial_context=...) can mix the reference spots too
    xy, regions = spots.centres(list(obs_names))
    _, section = np.unique(regions, return_inverse=True)
    model.reference = {
        "embeddings": torch.from_numpy(np.ascontiguousarray(emb, dtype=np.float32)),
        "expression": torch.from_numpy(np.ascontiguousarray(expr, dtype=np.float32)),
        "xy": torch.from_numpy(np.ascontiguousarray(xy, dtype=np.float64)),
        "section": torch.from_numpy(np.ascontiguousarray(section, dtype=np.int64)),
    }
