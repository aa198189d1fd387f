"""``ct.tl.pretrain`` on a corpus on disk: the panel from per-sample statistics, then streamed training."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from .._logging import logger
from .._settings import settings

MIN_FRAC = 0.1  # EVAL.md: candidate genes are detected in >= 10 % of the training spots
LEVEL_SPOTS = 20_000  # spots whose counts fix the prompt value levels (a bounded sample, whatever the corpus size)


def is_corpus(data) -> bool:
    """Whether ``data`` is a corpus: a :class:`comtip.Corpus` or the path of a corpus folder."""
    if isinstance(data, (str, os.PathLike)):
        return (Path(data) / "manifest.json").is_file()
    return hasattr(data, "shards") and hasattr(data, "sample_stats")


def open_corpus(data):
    """The :class:`comtip.Corpus` of a path (clear error when it is none) or the object itself."""
    if not isinstance(data, (str, os.PathLike)):
        return data
    if not (Path(data) / "manifest.json").is_file():
        msg = f"{data} is not a corpus folder (no manifest.json): write one with ct.pp.write_corpus(sources, {str(data)!r})."
        raise FileNotFoundError(msg)
    from ..corpus import read_corpus

    return read_corpus(data)


def split_samples(corpus, samples, validation) -> tuple[list[str], list[str]]:
    """(training samples, validation samples) of a corpus, in corpus order."""
    known = list(corpus.samples.index.astype(str))
    chosen = known if samples is None else [str(s) for s in samples]
    unknown = [s for s in chosen if s not in set(known)]
    if unknown:
        msg = f"Samples {unknown[:5]} are not in the corpus at {corpus.path}; it has {known[:10]}{'...' if len(known) > 10 else ''}."
        raise KeyError(msg)
    if validation == "auto":
        val = chosen[-1:] if len(chosen) >= 2 else []
    elif validation is None:
        val = []
    else:
        val = [validation] if isinstance(validation, str) else [str(v) for v in validation]
        bad = [v for v in val if v not in set(chosen)]
        if bad:
            msg = f"Validation samples {bad} are not among the samples to train on ({chosen[:10]}); pass some of those, or validation=None."
            raise ValueError(msg)
    train = [s for s in chosen if s not in set(val)]
    if not train:
        msg = f"No training sample left (samples {chosen}, validation {val}); keep at least one for training."
        raise ValueError(msg)
    return train, val


def gene_statistics(corpus, samples: Sequence[str]) -> pd.DataFrame:
    """Per gene of the union, over the given samples: spots that measured it, detected it, mean and variance.

    Computed from the per-sample statistics of the manifest, without reading a shard. A gene that a sample did not
    measure does not count for that sample (its spots are not zeros of it).
    """
    n_genes = len(corpus.genes)
    n_meas = np.zeros(n_genes, dtype=np.float64)
    n_det = np.zeros(n_genes, dtype=np.float64)
    s1 = np.zeros(n_genes, dtype=np.float64)
    s2 = np.zeros(n_genes, dtype=np.float64)
    for s in samples:
        st = corpus.sample_stats(s)
        g = np.asarray(st["genes"], dtype=np.int64)
        n_meas[g] += float(st["n_spots"])
        n_det[g] += np.asarray(st["n_detected"], dtype=np.float64)
        s1[g] += np.asarray(st["sum"], dtype=np.float64)
        s2[g] += np.asarray(st["sumsq"], dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(n_meas > 0, s1 / n_meas, 0.0)
        var = np.where(n_meas > 0, s2 / n_meas - mean**2, 0.0)
        frac = np.where(n_meas > 0, n_det / n_meas, 0.0)
    return pd.DataFrame(
        {"n_measured": n_meas, "frac_detected": frac, "mean": mean, "var": np.maximum(var, 0.0)},
        index=pd.Index(corpus.genes, name="gene"),
    )


def corpus_panel(stats: pd.DataFrame, *, n_top: int, with_text: set[str] | None) -> tuple[list[str], list[str]]:
    """The gene panel from :func:`gene_statistics`: candidates ranked by mean and by variance, interleaved.

    Returns the panel and the candidate genes dropped for lack of a gene-text entry.
    """
    cand = stats[stats["frac_detected"] >= MIN_FRAC]
    dropped: list[str] = []
    if with_text is not None:
        has = cand.index.isin(list(with_text))
        dropped = list(cand.index[~has])
        cand = cand[has]
    by_mean = list(cand.index[np.argsort(-cand["mean"].to_numpy(), kind="stable")])
    by_var = list(cand.index[np.argsort(-cand["var"].to_numpy(), kind="stable")])
    panel: dict[str, None] = {}
    for a, b in zip(by_mean, by_var, strict=True):
        for g in (a, b):
            if len(panel) < n_top:
                panel.setdefault(g, None)
    return list(panel), dropped


def corpus_eval_panels(stats: pd.DataFrame, *, n_hvg: int = 50, n_heg: int = 250) -> dict[str, list[str]]:
    """EVAL.md's HVG50 / HEG250 from :func:`gene_statistics` of the training samples."""
    cand = stats[stats["frac_detected"] >= MIN_FRAC]
    hvg = cand.index[np.argsort(-cand["var"].to_numpy(), kind="stable")[:n_hvg]]
    heg = cand.index[np.argsort(-cand["mean"].to_numpy(), kind="stable")[:n_heg]]
    return {f"hvg{n_hvg}": list(hvg), f"heg{n_heg}": list(heg)}


def pretrain_corpus(
    data,
    *,
    config,
    training,
    samples: Sequence[str] | None,
    validation,
    n_genes: int,
    text_model: str,
    common: dict,
):
    """Pretrain on a corpus (see :func:`comtip.tl.pretrain`); nothing held in memory grows with the corpus.

    ``training`` is the call's :class:`comtip.train.TrainConfig`; ``common`` the keywords of
    :func:`comtip.train.fit` that every stage shares (with ``num_workers`` and ``show_progress_bar`` resolved).
    """
    tc = training
    batch_size, augment, n_reference = tc.batch_size, tc.augment, tc.n_reference
    import torch

    from .._gene_text import gene_text_table
    from ..data import CorpusStream
    from ..model import CoMTIP
    from ..model._inference import embed_images
    from ..pp import gene_text_embeddings, value_levels
    from ..train import fit

    t_start = time.perf_counter()
    corpus = open_corpus(data)
    train_s, val_s = split_samples(corpus, samples, validation)
    stats = gene_statistics(corpus, train_s)
    with_text = set(gene_text_table().index) if config.gene_embedding != "learned" else None
    panel, dropped = corpus_panel(stats, n_top=n_genes, with_text=with_text)
    if dropped:
        logger.warning(
            "dropped %d of %d candidate genes without a gene-text entry (symbols are harmonised to human ones; "
            "e.g. %s)",
            len(dropped),
            len(dropped) + int((stats["frac_detected"] >= MIN_FRAC).sum()) - len(dropped),
            ", ".join(dropped[:5]),
        )
    if len(panel) < 2:
        msg = f"Only {len(panel)} genes are detected in >= 10 % of the training spots of the corpus at {corpus.path}; are the samples' counts empty?"
        raise ValueError(msg)
    union = pd.Index(corpus.genes)
    cols = union.get_indexer(panel)
    for s in train_s + val_s:
        if not np.isin(cols, corpus.sample_genes(s)).any():
            msg = (
                f"Sample {s!r} of the corpus at {corpus.path} shares no gene with the panel (its genes are not among "
                f"the {len(panel)} chosen, e.g. {panel[:3]}): check its gene symbols (species?) or leave it out with "
                "samples=[...]."
            )
            raise ValueError(msg)
    logger.info(
        "corpus %s: %d training samples (%d spots), %d validation samples; panel of %d genes",
        corpus.path,
        len(train_s),
        int(corpus.samples.loc[train_s, "n_spots"].sum()),
        len(val_s),
        len(panel),
    )
    seed = int(common["seed"])
    stream_kw = {"sentence_length": config.sentence_length, "batch_size": batch_size, "seed": seed}
    train_ds = CorpusStream(
        corpus,
        panel,
        samples=train_s,
        shuffle=True,
        buffer_size=tc.buffer_size,
        augment=augment,
        drop_last=True,
        **stream_kw,
    )
    val_ds = CorpusStream(corpus, panel, samples=val_s, shuffle=False, pad=False, **stream_kw) if val_s else None

    # value levels from a bounded sample of training spots (counts only)
    sample_items = []
    for batch in CorpusStream(
        corpus, panel, samples=train_s, shuffle=True, buffer_size=1, batch_size=1024, seed=seed
    ).batches(0):
        sample_items.extend(batch)
        if len(sample_items) >= LEVEL_SPOTS:
            break
    expr, mask, _, _ = train_ds.read_expression(sample_items[:LEVEL_SPOTS])
    levels = value_levels(np.where(mask, expr, 0.0), n_levels=config.n_value_levels)
    text = gene_text_embeddings(panel, model=text_model, fallback=True) if config.gene_embedding != "learned" else None
    eval_train = corpus_eval_panels(stats)
    torch.manual_seed(seed)
    model = CoMTIP(config, panel, text, levels)
    model.cpu_chunk_size = settings.cpu_chunk_size

    # validation genes: the training panels' genes of the model that every validation sample measured
    val_genes = None
    if val_s:
        measured = np.all([np.isin(cols, corpus.sample_genes(s)) for s in val_s], axis=0)
        names = [g for g in dict.fromkeys(eval_train["hvg50"] + eval_train["heg250"]) if g in set(panel)]
        names = [g for g in names if measured[panel.index(g)]]
        val_genes = model.gene_index(names).cpu().numpy() if names else None

    common = {**common, "checkpoint_every_n_steps": tc.checkpoint_every_n_steps}
    readout = tc.readout_epochs > 0 and config.uses_prompt
    stages = [
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
            monitor="val/recall5" if readout else "val/pcc_adj",
            early_stopping_patience=tc.early_stopping_patience,
            **common,
        )
    ]
    if readout:
        # the tower is fixed now; its pooled features are computed per batch (no cache that grows with the corpus)
        model.split_prompt_encoder()
        stages.append(
            fit(
                model,
                train_ds,
                val_ds,
                stage="readout",
                max_epochs=tc.readout_epochs,
                batch_size=batch_size,
                lr=tc.readout_lr or tc.lr,
                val_genes=val_genes,
                monitor="val/pcc_adj",
                **common,
            )
        )
    model.eval()

    # a bounded reference bank (retrieval / probe prediction): n_reference training spots, 8-view embeddings
    ref_stream = CorpusStream(corpus, panel, samples=train_s, shuffle=True, buffer_size=1, batch_size=64, seed=seed + 1)
    ref_items: list = []
    for batch in ref_stream.batches(0):
        ref_items.append(batch[: max(0, n_reference - sum(len(b) for b in ref_items))])
        if sum(len(b) for b in ref_items) >= n_reference:
            break
    ref_items = [b for b in ref_items if b]
    if ref_items:
        emb = embed_images(
            model,
            ({"image": ref_stream.read(b, 0)["image"]} for b in ref_items),
            dihedral=True,
            device="cuda" if torch.cuda.is_available() and common["accelerator"] in ("auto", "gpu", "cuda") else "cpu",
            prompt=False,
        )["image"]
        ref_expr = np.concatenate([ref_stream.read_expression(b)[0] for b in ref_items])
        model.reference = {
            "embeddings": torch.from_numpy(np.ascontiguousarray(emb, dtype=np.float32)),
            "expression": torch.from_numpy(np.ascontiguousarray(ref_expr, dtype=np.float32)),
        }
    eval_all = corpus_eval_panels(gene_statistics(corpus, train_s + val_s)) if val_s else eval_train
    model.training_summary.update(
        {
            "corpus": str(corpus.path),
            "sections": train_s,
            "validation_sections": val_s,
            "count_only_sections": [],
            "n_train_spots": int(train_ds.n_spots),
            "n_val_spots": int(val_ds.n_spots) if val_ds is not None else 0,
            "tile_size_um": float(corpus.tile_size_um),
            "tile_size_px": int(corpus.tile_size_px),
            "text_model": text_model,
            "genes_dropped_no_text": len(dropped),
            "epochs": sum(s["epochs"] for s in stages if s["stage"] == "contrastive"),
            "readout_epochs": sum(s["epochs"] for s in stages if s["stage"] == "readout"),
            "steps": sum(s["steps"] for s in stages),
            "stages": stages,
            "eval_panels": eval_all,
            "cached_image_features": False,
            "augment": augment,
            "n_reference": int(sum(len(b) for b in ref_items)),
            "wall_s": round(time.perf_counter() - t_start, 1),
        }
    )
    settings.model = model
    logger.info(
        "pretrained %s on the corpus in %.0f s; it is now the current model", model.name, time.perf_counter() - t_start
    )
    return model
